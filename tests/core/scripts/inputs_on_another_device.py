"""Arrays on another device than the variables are refused by name before the
jitted call (tests/core/test_faults.py): a model's inputs on both paths, a
chunk given to ``stream_step``, a batch given to a training step; uncommitted
or NumPy inputs go where the variables are.

JAX fixes its CPU device count before it runs anything, so this runs in a
process of its own.
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax.training.train_state import TrainState

from banded_rnn import BandedLSTM, stream_step
from banded_rnn.training import make_train_step

from helpers import init_model, random_inputs

jax.config.update("jax_num_cpu_devices", 2)
first, second = jax.devices()
x = random_inputs(1, (2, 3, 5, 2))
for implementation in ("kernel", "scan"):
    model = BandedLSTM(4, implementation=implementation)
    variables = jax.device_put(init_model(model, x), first)
    with pytest.raises(ValueError, match=r"^inputs: on device\(s\) \[1\], but variables on \[0\]"):
        model.apply(variables, None, jax.device_put(x, second))
    model.apply(variables, None, x)  # uncommitted inputs go where the variables are

    step = stream_step(model)
    state, _ = step(variables, None, x)
    with pytest.raises(ValueError, match=r"^chunk: on device\(s\) \[1\], but variables on \[0\]"):
        step(variables, state, jax.device_put(x, second))
    step(variables, state, jax.device_put(x, first))

    train_step = make_train_step(lambda outputs, targets: jnp.mean((outputs - targets) ** 2))
    train_state = jax.device_put(
        TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.1)),
        first,
    )
    targets = random_inputs(2, (2, 3, 5, 4))
    with pytest.raises(
        ValueError, match=r"^inputs: on device\(s\) \[1\], but train_state on \[0\]"
    ):
        train_step(train_state, None, jax.device_put(x, second), targets)
    train_step(train_state, None, x, targets)
print("ok", flush=True)
