"""Inputs on another device than the variables are refused by name, on both
paths (tests/core/test_faults.py); uncommitted inputs go where the variables are.

JAX fixes its CPU device count before it runs anything, so this runs in a
process of its own.
"""

import jax
import pytest

from banded_rnn import BandedLSTM

from helpers import init_model, random_inputs

jax.config.update("jax_num_cpu_devices", 2)
x = random_inputs(1, (2, 3, 5, 2))
for implementation in ("kernel", "scan"):
    model = BandedLSTM(4, implementation=implementation)
    variables = jax.device_put(init_model(model, x), jax.devices()[0])
    with pytest.raises(ValueError, match=r"^inputs: on device\(s\) \[1\], but variables on \[0\]"):
        model.apply(variables, None, jax.device_put(x, jax.devices()[1]))
    model.apply(variables, None, x)  # uncommitted inputs go where the variables are
