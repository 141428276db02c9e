"""BandedLSTM split over two CPU devices, against the float64 NumPy reference
(tests/core/test_devices.py); prints ``NAME ok`` for each way of splitting.

JAX fixes its CPU device count before it runs anything, so this runs in a
process of its own.
"""

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from banded_rnn import BandedLSTM
from banded_rnn.training import make_mesh

from helpers import init_model, random_inputs, random_state
from reference import lstm_reference, params_from_variables

jax.config.update("jax_num_cpu_devices", 2)
assert len(jax.devices()) == 2
model = BandedLSTM(units=5, num_layers=2)
inputs = random_inputs(50, (2, 4, 6, 3))
variables = init_model(model, inputs)
params = params_from_variables(variables)
state = random_state(model, 2, 4, seed=51)
lengths = np.array([[6, 3, 5, 0], [2, 6, 6, 4]], np.int32)
references = {
    "given": lstm_reference(params, inputs, [tuple(s) for s in state], lengths),
    "zero": lstm_reference(params, inputs, None, lengths),
}


def check(name, start, final, outputs):
    expected_final, expected = references[start]
    assert len(outputs.sharding.device_set) == 2, (name, outputs.sharding)
    np.testing.assert_allclose(np.asarray(outputs), expected, rtol=0, atol=1e-5, err_msg=name)
    for got, (hidden, cell) in zip(final, expected_final, strict=True):
        np.testing.assert_allclose(np.asarray(got.hidden), hidden, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got.cell), cell, rtol=0, atol=1e-5)
    print(name, "ok")


def apply(state, inputs, lengths):
    return model.apply(variables, state, inputs, seq_lengths=lengths)


def gathers(run, *args):
    """Whether the compiled program gathers split arrays: it should not where
    the kernel runs in shard_map, each device on its own rows."""
    return "all-gather" in run.lower(*args).compile().as_text()


def check_split(name, put, run, *, gathering_allowed=True):
    """``run`` on the arrays placed by ``put``, from the given state and from zeros."""
    args = put(state), put(inputs), put(lengths)
    assert gathering_allowed or not gathers(run, *args), name
    check(name, "given", *run(*args))
    check(f"{name}-zero", "zero", *run(None, *args[1:]))


explicit = jax.make_mesh((2,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
for axis, spec in {"batch": P("batch"), "bands": P(None, "batch")}.items():
    split = NamedSharding(make_mesh(), spec)
    check_split(f"gspmd-{axis}", lambda a, split=split: jax.device_put(a, split), jax.jit(apply))
    with jax.set_mesh(make_mesh(bands=2 if axis == "bands" else 1)):
        mesh_spec = P("batch") if axis == "batch" else P(None, "bands")
        check_split(f"mesh-{axis}", lambda a, s=mesh_spec: jax.device_put(a, s), jax.jit(apply),
                    gathering_allowed=False)  # fmt: skip
    with jax.set_mesh(explicit):
        check_split(f"explicit-{axis}", lambda a, s=spec: jax.device_put(a, s), jax.jit(apply),
                    gathering_allowed=False)  # fmt: skip
    mapped = jax.shard_map(
        apply, mesh=make_mesh(), in_specs=(spec, spec, spec), out_specs=(spec, spec)
    )
    check(f"shard_map-{axis}", "given", *jax.jit(mapped)(state, inputs, lengths))
    zero_mapped = jax.shard_map(
        lambda x, n: apply(None, x, n), mesh=make_mesh(), in_specs=(spec, spec),
        out_specs=(spec, spec),
    )  # fmt: skip
    check(f"shard_map-{axis}-zero", "zero", *jax.jit(zero_mapped)(inputs, lengths))
