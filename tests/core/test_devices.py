"""BandedLSTM split over two real CPU devices, against the NumPy reference.

JAX fixes its CPU device count once, before it runs anything, and the test
process already runs on one device; so the checks run in a fresh process with
two CPU devices. Sequences or bands are split over the devices with GSPMD
(``jax.jit`` on split inputs), under ``jax.set_mesh`` of ``make_mesh``'s
mesh and of one with explicit axes (where the native kernel runs each
device's rows, gathering nothing), and with ``shard_map``; every result must
equal the float64 NumPy loop.
"""

from __future__ import annotations

from helpers import run_fresh_process

SCRIPT = """
import jax
jax.config.update("jax_num_cpu_devices", 2)
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from banded_rnn import BandedLSTM
from banded_rnn.training import make_mesh
from helpers import init_model, random_inputs, random_state
from reference import lstm_reference, params_from_variables

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
    # Whether the compiled program gathers split arrays: it should not where
    # the kernel runs in shard_map, each device on its own rows.
    return "all-gather" in run.lower(*args).compile().as_text()

explicit = jax.make_mesh((2,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
for axis, spec in {"batch": P("batch"), "bands": P(None, "batch")}.items():
    split = NamedSharding(make_mesh(), spec)
    put = lambda a: jax.device_put(a, split)
    check(f"gspmd-{axis}", "given", *jax.jit(apply)(put(state), put(inputs), put(lengths)))
    check(f"gspmd-{axis}-zero", "zero", *jax.jit(apply)(None, put(inputs), put(lengths)))
    with jax.set_mesh(make_mesh(bands=2 if axis == "bands" else 1)):
        put = lambda a: jax.device_put(a, P("batch") if axis == "batch" else P(None, "bands"))
        run = jax.jit(apply)
        assert not gathers(run, put(state), put(inputs), put(lengths)), axis
        check(f"mesh-{axis}", "given", *run(put(state), put(inputs), put(lengths)))
        check(f"mesh-{axis}-zero", "zero", *run(None, put(inputs), put(lengths)))
    with jax.set_mesh(explicit):
        put = lambda a: jax.device_put(a, spec)
        run = jax.jit(apply)
        assert not gathers(run, put(state), put(inputs), put(lengths)), axis
        check(f"explicit-{axis}", "given", *run(put(state), put(inputs), put(lengths)))
        check(f"explicit-{axis}-zero", "zero", *run(None, put(inputs), put(lengths)))
    mapped = jax.shard_map(
        apply, mesh=make_mesh(), in_specs=(spec, spec, spec), out_specs=(spec, spec)
    )
    check(f"shard_map-{axis}", "given", *jax.jit(mapped)(state, inputs, lengths))
    zero_mapped = jax.shard_map(
        lambda x, n: apply(None, x, n), mesh=make_mesh(), in_specs=(spec, spec),
        out_specs=(spec, spec),
    )
    check(f"shard_map-{axis}-zero", "zero", *jax.jit(zero_mapped)(inputs, lengths))
"""

CHECKS = [
    f"{kind}-{axis}{start}"
    for kind in ("gspmd", "mesh", "explicit", "shard_map")
    for axis in ("batch", "bands")
    for start in ("", "-zero")
]


def test_split_over_two_cpu_devices_matches_reference():
    done = run_fresh_process(SCRIPT)
    assert sorted(done.stdout.split()) == sorted([*CHECKS, *["ok"] * len(CHECKS)]), done.stdout
