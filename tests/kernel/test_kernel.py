"""The native CPU kernel (``implementation="kernel"``) against the float64 reference.

Everything the module does is also checked on both paths in test_banded.py
and test_exact_chunking.py; here are the kernel's own promises: ``auto``
takes it on CPU, every instruction set the CPU has agrees with the reference
(units that fill no whole vector included), gradients match finite
differences of the float64 reference, results do not depend on the number of
threads, and a NaN stays in its row.
"""

import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import banded_rnn
from banded_rnn import BandedLSTM
from banded_rnn._backends import _native, _native_layer, _packed

from helpers import SubbandMask, init_model, random_inputs, random_state, run_script, script_env
from reference import lstm_reference, params_from_variables

SCRIPTS = Path(__file__).parent / "scripts"

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the native kernel runs on the CPU backend"
)


@pytest.fixture
def threads():
    """Sets the kernel's thread count for one test, then restores the default."""
    yield _native.set_threads
    _native.set_threads(0)


@pytest.fixture(params=_native.isas())
def isa(request):
    """Every instruction set this CPU can run the kernel with, one test each."""
    default = _native.info()["isa"]
    _native.set_isa(request.param)
    yield request.param
    _native.set_isa(default)


@pytest.fixture(params=[*(f"kernel-{isa}" for isa in _native.isas()), "scan"])
def path(request):
    """The kernel on every instruction set, and the XLA scan: the
    ``implementation`` to build the model with."""
    if request.param == "scan":
        yield "scan"
        return
    default = _native.info()["isa"]
    _native.set_isa(request.param.removeprefix("kernel-"))
    yield "kernel"
    _native.set_isa(default)


def _model(units, num_layers, **kwargs):
    return BandedLSTM(units, num_layers=num_layers, implementation="kernel", **kwargs)


def _variables(model, shape, seed=0):
    x = random_inputs(seed, shape)
    variables = init_model(model, x, seed=seed)
    # Larger recurrent weights than the orthogonal init, so that the state
    # saturates some gates and the check covers the non-linearities' range.
    params = jax.tree.map(lambda w: w * 1.5, variables["params"])
    return {"params": params}, x


def test_the_extension_is_built_and_auto_takes_it_on_cpu():
    assert _native.available(), _native.info()
    model = BandedLSTM(6)
    variables, x = _variables(model, (2, 3, 5, 4))
    before = _native.calls()
    jax.jit(model.apply)(variables, None, x)
    assert _native.calls() == before + 1  # auto ran the kernel, not the scan
    before = _native.calls()
    BandedLSTM(6, implementation="scan").apply(variables, None, x)
    assert _native.calls() == before


def test_info_command_reports_the_kernel():
    """The README's ``python -m banded_rnn info``, in a process of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "banded_rnn", "info"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    isa = _native.info()["isa"]
    assert done.stdout.startswith(f"banded_rnn: native CPU kernel, {isa} "), done.stdout


def test_info_names_the_instruction_set():
    info = banded_rnn.kernel_info()
    assert info["kernel"] == "built"
    assert info["isa"] in info["isas"] == _native.isas()
    assert info["isas"][-1] == "portable"


@pytest.mark.parametrize(
    "shape, units, num_layers",
    [
        ((2, 3, 9, 4), 5, 2),  # units < one vector
        ((1, 7, 6, 3), 20, 1),  # a whole vector and a partial one
        ((3, 2, 4, 5), 64, 2),  # whole vectors only
        ((1, 1, 3, 1), 1, 1),
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_every_instruction_set_matches_reference(isa, shape, units, num_layers, masked):
    model = _model(units, num_layers)
    variables, x = _variables(model, shape)
    batch, bands, time, _ = shape
    state = random_state(model, batch, bands, 1)
    mask = None
    if masked:
        mask = np.random.default_rng(2).random((batch, bands, time)) > 0.3
    final, y = jax.jit(model.apply)(variables, state, x, mask=mask)
    expected_final, expected = lstm_reference(
        params_from_variables(variables), x, [tuple(s) for s in state], mask=mask
    )
    np.testing.assert_allclose(np.asarray(y), expected, rtol=0, atol=2e-6)
    for got, (hidden, cell) in zip(final, expected_final, strict=True):
        np.testing.assert_allclose(np.asarray(got.hidden), hidden, rtol=0, atol=2e-6)
        np.testing.assert_allclose(np.asarray(got.cell), cell, rtol=0, atol=4e-6)


def _reference_loss(params, x, state, weights, mask):
    final, y = lstm_reference(params, x, state, mask=mask)
    out, final_weights = weights
    total = np.sum(y * out)
    for (hidden, cell), (wh, wc) in zip(final, final_weights, strict=True):
        total += np.sum(hidden * wh) + np.sum(cell * wc)
    return total


def _moved(nested, layer, index, delta):
    """A copy of ``nested`` (per-layer lists) with ``delta`` added at ``[layer][index]``."""
    moved = [list(entry) for entry in nested]
    moved[layer][index] = moved[layer][index] + delta
    return moved


@pytest.mark.parametrize("masked", [False, True])
def test_gradients_match_finite_differences_of_the_reference(path, masked):
    """Directional derivatives of a loss on the outputs and the final state:
    the float32 gradient (kernel on every instruction set, and scan) against
    central differences of the float64 NumPy reference, for every parameter
    and the initial state."""
    batch, bands, time, features, units, layers = 2, 3, 7, 3, 9, 2
    model = BandedLSTM(units, num_layers=layers, implementation=path)
    variables, x = _variables(model, (batch, bands, time, features))
    state = random_state(model, batch, bands, 1)
    rng = np.random.default_rng(3)
    mask = rng.random((batch, bands, time)) > 0.3 if masked else None
    out_w = rng.normal(size=(batch, bands, time, units))
    final_w = [tuple(rng.normal(size=(batch, bands, units)) for _ in range(2)) for _ in state]

    def loss(params, state):
        final, y = model.apply({"params": params}, state, x, mask=mask)
        total = jnp.sum(y * out_w)
        for got, (wh, wc) in zip(final, final_w, strict=True):
            total += jnp.sum(got.hidden * wh) + jnp.sum(got.cell * wc)
        return total

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], state)
    params64 = params_from_variables(variables)
    state64 = [tuple(np.asarray(s, np.float64) for s in layer) for layer in state]
    weights, eps = (out_w, final_w), 1e-5

    def central_difference(loss_at):
        return (loss_at(eps) - loss_at(-eps)) / (2 * eps)

    for layer in range(layers):
        for index, name in enumerate(("kernel", "recurrent_kernel", "bias")):
            d = rng.normal(size=params64[layer][index].shape)
            numeric = central_difference(
                lambda step, d=d, index=index, layer=layer: _reference_loss(
                    _moved(params64, layer, index, step * d), x, state64, weights, mask
                )
            )
            analytic = np.sum(np.asarray(grads[0][f"layer_{layer}"][name]) * d)
            np.testing.assert_allclose(analytic, numeric, rtol=2e-4, atol=1e-4, err_msg=name)
        for field, name in enumerate(("h0", "c0")):
            d = rng.normal(size=state64[layer][field].shape)
            numeric = central_difference(
                lambda step, d=d, field=field, layer=layer: _reference_loss(
                    params64, x, _moved(state64, layer, field, step * d), weights, mask
                )
            )
            analytic = np.sum(np.asarray(grads[1][layer][field]) * d)
            np.testing.assert_allclose(analytic, numeric, rtol=2e-4, atol=1e-4, err_msg=name)


# -- the backward kernel's blocks of steps and its weight gradients ---------------------

# 300 steps of 64 rows and 32 units: more gate gradients than one block of the
# backward kernel keeps (4 MiB), so its weight gradients add up three blocks of
# steps (walked last first: 172-299, 44-171, then 0-43, which reads h0).
BLOCKS_SHAPE = dict(time=300, rows=(4, 16), features=5, units=32)


def _layer64(x, kernel, recurrent, bias, h0, c0, valid, dropmask):
    """One LSTM layer in float64 NumPy, rows vectorised: ``x [time, rows...,
    features]``; a false ``valid`` step keeps the state; ``dropmask``
    multiplies h before the recurrent kernel. Returns ``(hs, c_final)``."""
    h, c, hs = h0, c0, []
    for t in range(x.shape[0]):
        z = x[t] @ kernel + (h * dropmask) @ recurrent + bias
        i, f, g, o = np.split(z, 4, axis=-1)
        sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
        c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h_new = sigmoid(o) * np.tanh(c_new)
        keep = valid[t][..., None]
        h, c = np.where(keep, h_new, h), np.where(keep, c_new, c)
        hs.append(h)
    return np.stack(hs), c


def _blocks_case(seed, masked, dropped):
    rng = np.random.default_rng(seed)
    time, rows, features, units = (BLOCKS_SHAPE[k] for k in ("time", "rows", "features", "units"))
    args = dict(
        x=rng.normal(size=(time, *rows, features)),
        kernel=rng.normal(size=(features, 4 * units)) * 0.4,
        recurrent=rng.normal(size=(units, 4 * units)) * 0.3,
        bias=rng.normal(size=(4 * units,)) * 0.5,
        h0=rng.normal(size=(*rows, units)) * 0.5,
        c0=rng.normal(size=(*rows, units)),
    )
    valid = rng.random((time, *rows)) > 0.2 if masked else np.ones((time, *rows), bool)
    dropmask = (rng.random((*rows, units)) > 0.3) / 0.7 if dropped else np.ones((*rows, units))
    weights = (rng.normal(size=(time, *rows, units)), rng.normal(size=(*rows, units)))
    return args, valid, dropmask, weights


@pytest.mark.parametrize("masked, dropped", [(False, False), (True, True)])
def test_gradients_over_several_blocks_match_finite_differences_of_a_float64_loop(
    isa, masked, dropped
):
    """Every gradient of one layer (inputs, the three weights, h0 and c0), with
    a mask and recurrent dropout, over three blocks of the backward kernel:
    directional derivatives against central differences of a float64 loop."""
    args, valid, dropmask, (out_w, c_w) = _blocks_case(0, masked, dropped)

    def loss(args):
        hs, c = _native_layer.recurrence(
            *(args[k] for k in ("x", "kernel", "recurrent", "bias", "h0", "c0")),
            jnp.asarray(valid) if masked else None,
            jnp.asarray(dropmask, jnp.float32) if dropped else None,
            None,
        )
        return jnp.sum(hs * out_w) + jnp.sum(c * c_w)

    grads = jax.jit(jax.grad(loss))(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), args))
    args64 = jax.tree.map(lambda a: np.asarray(np.asarray(a, np.float32), np.float64), args)
    rng, eps = np.random.default_rng(1), 1e-5

    def loss64(moved):
        hs, c = _layer64(**moved, valid=valid, dropmask=dropmask)
        return np.sum(hs * out_w) + np.sum(c * c_w)

    for name, value in args64.items():
        d = rng.normal(size=value.shape)
        numeric = (
            loss64({**args64, name: value + eps * d}) - loss64({**args64, name: value - eps * d})
        ) / (2 * eps)
        analytic = np.sum(np.asarray(grads[name], np.float64) * d)
        np.testing.assert_allclose(analytic, numeric, rtol=2e-4, atol=1e-3, err_msg=name)


def test_the_backward_kernel_computes_only_what_is_differentiated():
    """Gradients for the weights alone or the inputs alone: the custom call is
    given empty results for the rest (so skips them) and returns the bits it
    returns when everything is differentiated, over several blocks."""
    args, _, _, (out_w, c_w) = _blocks_case(2, False, False)
    args = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), args)
    names = ("x", "kernel", "recurrent", "bias", "h0", "c0")

    def loss(*values):
        hs, c = _native_layer.recurrence(*values, None, None, None)
        return jnp.sum(hs * out_w) + jnp.sum(c * c_w)

    values = tuple(args[k] for k in names)
    everything = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*values)
    for argnums in [(1, 2, 3), (0,), (4, 5)]:
        grad = jax.jit(jax.grad(loss, argnums=argnums))
        hlo = grad.lower(*values).as_text()
        call = next(line for line in hlo.splitlines() if _native.BACKWARD in line)
        results = call.rsplit("->", 1)[1]  # dx, dkernel, drecurrent, dbias, dh0, dc0
        empty = (argnums != (0,)) + 3 * (argnums != (1, 2, 3))
        assert results.count("tensor<0xf32>") == empty, call
        for got, index in zip(grad(*values), argnums, strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(everything[index]))


def test_vmapped_gradients_over_several_blocks_match_each_entry(threads):
    """vmap over the weights runs each entry's backward with its own weights
    (groups of the custom call): each entry's gradients equal those of a call
    of its own, and agree with the float64 loop's finite differences."""
    args, valid, _, (out_w, c_w) = _blocks_case(3, True, False)
    args = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), args)

    def loss(weights, x):
        hs, c = _native_layer.recurrence(x, *weights, args["h0"], args["c0"], valid, None, None)
        return jnp.sum(hs * out_w) + jnp.sum(c * c_w)

    weights = tuple(args[k] for k in ("kernel", "recurrent", "bias"))
    stacked = jax.tree.map(lambda w: jnp.stack([w, -0.5 * w]), weights)
    batched = jax.jit(jax.vmap(jax.grad(loss), in_axes=(0, None)))(stacked, args["x"])
    one = jax.jit(jax.grad(loss))
    for entry in range(2):
        alone = one(jax.tree.map(lambda w, e=entry: w[e], stacked), args["x"])
        for got, expected in zip(batched, alone, strict=True):
            np.testing.assert_array_equal(np.asarray(got[entry]), np.asarray(expected))
    args64 = jax.tree.map(lambda a: np.asarray(a, np.float64), args)
    w64 = [np.asarray(w[1], np.float64) for w in stacked]
    d = np.random.default_rng(4).normal(size=w64[1].shape)
    eps = 1e-5

    def loss64(recurrent):
        hs, c = _layer64(
            args64["x"], w64[0], recurrent, w64[2], args64["h0"], args64["c0"], valid, 1.0
        )
        return np.sum(hs * out_w) + np.sum(c * c_w)

    numeric = (loss64(w64[1] + eps * d) - loss64(w64[1] - eps * d)) / (2 * eps)
    analytic = np.sum(np.asarray(batched[1][1], np.float64) * d)
    np.testing.assert_allclose(analytic, numeric, rtol=2e-4, atol=1e-3)


@pytest.mark.parametrize(
    "shape, units",
    [
        ((4, 9, 40, 6), 32),  # 36 rows: several tiles per thread
        ((4, 16, 300, 6), 32),  # several blocks of steps in the backward kernel
        ((4, 9, 1, 6), 96),  # one step: the forward's threads split the units
    ],
)
def test_results_are_bit_identical_for_one_two_and_three_threads(threads, shape, units):
    model = _model(units, 2, recurrent_dropout=0.3)
    variables, x = _variables(model, shape)
    mask = np.random.default_rng(0).random(shape[:3]) > 0.2
    rngs = {"dropout": jax.random.key(5)}

    def run(params):
        final, y = model.apply(
            {"params": params}, None, x, mask=mask, deterministic=False, rngs=rngs
        )
        return jnp.sum(y**2) + sum(jnp.sum(s.cell) for s in final), y

    step = jax.jit(jax.value_and_grad(run, has_aux=True))
    results = []
    for count in (1, 2, 3):
        threads(count)
        results.append(jax.tree.map(np.asarray, step(variables["params"])))
        assert _native.info()["last_call_threads"] == count
    for other in results[1:]:
        jax.tree.map(np.testing.assert_array_equal, other, results[0])


def test_a_one_step_call_splits_its_units_between_threads(threads):
    """A one-step forward (a streamed frame) hands each thread a share of the
    units rather than of the rows: every thread count gives the same bits,
    and they agree with the float64 reference."""
    model = _model(96, 2)
    variables, x = _variables(model, (4, 9, 1, 6))
    state = random_state(model, 4, 9, 1)
    results = []
    for count in (1, 2, 3):
        threads(count)
        final, y = jax.jit(model.apply)(variables, state, x)
        assert _native.info()["last_call_threads"] == count
        results.append(jax.tree.map(np.asarray, (final, y)))
    for other in results[1:]:
        jax.tree.map(np.testing.assert_array_equal, other, results[0])
    expected_final, expected = lstm_reference(
        params_from_variables(variables), x, [tuple(s) for s in state]
    )
    np.testing.assert_allclose(results[0][1], expected, rtol=0, atol=2e-6)
    for got, (hidden, cell) in zip(results[0][0], expected_final, strict=True):
        np.testing.assert_allclose(got.hidden, hidden, rtol=0, atol=2e-6)
        np.testing.assert_allclose(got.cell, cell, rtol=0, atol=4e-6)


def test_the_last_layer_writes_the_outputs_in_the_layout_returned():
    """In inference the last layer's kernel call returns ``[batch, bands,
    time, units]``: with no mask, nothing moves the outputs after it (no
    transpose, copy or fusion makes an array of their shape). With a mask
    (its steps zeroed) as without, the values agree with the float64
    reference."""
    model = _model(16, 2)
    variables, x = _variables(model, (2, 3, 9, 4))
    lowered = jax.jit(model.apply).lower(variables, None, x)
    calls = [line for line in lowered.as_text().splitlines() if _native.FORWARD in line]
    assert len(calls) == 2
    assert "-> (tensor<9x2x3x16xf32>" in calls[0]  # the first layer feeds the second
    assert "-> (tensor<2x3x9x16xf32>" in calls[1]
    entry = lowered.compile().as_text().split("ENTRY")[1].splitlines()
    moves = [
        line
        for line in entry
        if "f32[2,3,9,16]" in line.partition("=")[2][:40]
        and any(op in line for op in ("fusion(", "copy(", "transpose("))
    ]
    assert not moves, moves
    params = params_from_variables(variables)
    for mask in (None, np.random.default_rng(6).random((2, 3, 9)) > 0.3):
        _, y = jax.jit(model.apply)(variables, None, x, mask=mask)
        _, expected = lstm_reference(params, x, mask=mask)
        np.testing.assert_allclose(np.asarray(y), expected, rtol=0, atol=2e-6)


def test_nan_in_one_row_reaches_no_other_row_nor_its_gradient():
    model = _model(8, 2)
    variables, x = _variables(model, (2, 3, 6, 4))
    x = np.array(x)
    x[1, 2, 3, 0] = np.nan

    def loss(x):
        _, y = model.apply(variables, None, x)
        return jnp.sum(jnp.where(jnp.isnan(y), 0.0, y)), y

    (_, y), dx = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
    y, dx = np.asarray(y), np.asarray(dx)
    assert np.isnan(y[1, 2, 3:]).all()  # the poisoned row from that step on
    clean = np.ones((2, 3), bool)
    clean[1, 2] = False
    assert np.isfinite(y[clean]).all() and np.isfinite(dx[clean]).all()
    _, expected = lstm_reference(
        params_from_variables(variables), np.where(clean[..., None, None], x, 0)
    )
    np.testing.assert_allclose(y[clean], expected[clean], rtol=0, atol=2e-6)


# -- weights packed ahead of time (what a Stream does once) ---------------------------


def _with_packed(model, variables, x):
    """The variables plus the packed collection, as a Stream prepares them."""
    with _packed.packing():
        _, packed = model.apply(variables, None, x, mutable=[_packed.PACKED_COLLECTION])
    return {**variables, **packed}


@pytest.mark.parametrize("units, num_layers", [(5, 2), (20, 1), (64, 1)])
def test_prepacked_weights_give_the_kernels_own_results_bit_for_bit(isa, units, num_layers):
    model = _model(units, num_layers)
    variables, x = _variables(model, (2, 3, 6, 4))
    prepared = _with_packed(model, variables, x[:, :, :1])
    layer = prepared[_packed.PACKED_COLLECTION]["layer_0"]
    assert layer.shape == _packed.packed_shape(4, units)
    state = random_state(model, 2, 3, 1)
    final, y = jax.jit(model.apply)(prepared, state, x)
    expected_final, expected = jax.jit(model.apply)(variables, state, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
    jax.tree.map(np.testing.assert_array_equal, final, expected_final)
    _, reference = lstm_reference(params_from_variables(variables), x, [tuple(s) for s in state])
    np.testing.assert_allclose(np.asarray(y), reference, rtol=0, atol=2e-6)


def test_weights_packed_for_another_instruction_set_are_not_read():
    model = _model(8, 1)
    variables, x = _variables(model, (1, 2, 4, 4))
    default = _native.info()["isa"]
    prepared = _with_packed(model, variables, x)  # laid out for the default set's vector width
    _, expected = lstm_reference(params_from_variables(variables), x)
    try:
        for isa in _native.isas():  # another width: the kernel packs them itself
            _native.set_isa(isa)
            _, y = model.apply(prepared, None, x)
            np.testing.assert_allclose(np.asarray(y), expected, rtol=0, atol=2e-6)
    finally:
        _native.set_isa(default)


def _layer_weights(variables):
    return tuple(variables["params"]["layer_0"][k] for k in ("kernel", "recurrent_kernel", "bias"))


def _one_layer_call(variables, x, packed):
    h0 = jnp.zeros((x.shape[1] * x.shape[0], 8))
    inputs = jnp.moveaxis(x[0], 1, 0)  # [time, rows, features]
    return _native_layer.recurrence(inputs, *_layer_weights(variables), h0, h0, None, None, packed)


def test_packed_weights_are_what_the_kernel_reads():
    model = _model(8, 1)
    variables, x = _variables(model, (1, 2, 4, 4))
    others, _ = _variables(model, (1, 2, 4, 4), seed=3)
    packed = _packed.pack_forward(*_layer_weights(others))
    hs, _ = _one_layer_call(variables, x, packed)  # reads the packed weights, not these
    _, expected = lstm_reference(params_from_variables(others), x)
    np.testing.assert_allclose(np.moveaxis(np.asarray(hs), 0, 1)[None], expected, atol=2e-6)
    # And through a Stream, inside a model: its LSTM reads what was packed for it.
    stream_model = SubbandMask(hidden=8, units=8, num_layers=1)
    stream_variables = init_model(stream_model, x)
    stream = banded_rnn.Stream(stream_model, stream_variables, 1, 2, features=4)
    packed = stream._step_variables[_packed.PACKED_COLLECTION]["lstm"]["layer_0"]
    lstm = stream_variables["params"]["lstm"]["layer_0"]
    weights = (lstm["kernel"], lstm["recurrent_kernel"], lstm["bias"])
    np.testing.assert_array_equal(np.asarray(packed), np.asarray(_packed.pack_forward(*weights)))


def test_a_packed_layout_of_another_width_is_not_read_and_a_wrong_one_is_refused():
    model = _model(8, 1)
    variables, x = _variables(model, (1, 2, 4, 4))
    packed = _packed.pack_forward(*_layer_weights(variables))
    _, expected = lstm_reference(params_from_variables(variables), x)
    vectors, width = packed.shape[-2:]
    narrower = packed.reshape(*packed.shape[:-2], 2 * vectors, width // 2)  # another tile
    hs, _ = _one_layer_call(variables, x, narrower)  # packs its own instead
    np.testing.assert_allclose(np.moveaxis(np.asarray(hs), 0, 1)[None], expected, atol=2e-6)
    swapped = jnp.swapaxes(packed, 0, 2)  # this tile, blocks and rows exchanged
    with pytest.raises(Exception, match=r"packed: expected \[\.\.\., blocks, 4 / vectors"):
        jax.block_until_ready(_one_layer_call(variables, x, swapped))


def test_init_and_training_never_carry_packed_weights():
    model = _model(6, 1)
    x = random_inputs(0, (1, 2, 3, 4))
    variables = model.init(jax.random.key(0), None, x)
    assert set(variables) == {"params"}
    _, mutated = model.apply(variables, None, x, mutable=True)  # every collection mutable
    assert _packed.PACKED_COLLECTION not in mutated

    def loss(variables):
        return model.apply(variables, None, x)[1].sum()

    # The derivative packs its own weights, from the parameters.
    gradient = jax.jit(jax.grad(loss))
    with_packed = gradient(_with_packed(model, variables, x))["params"]
    jax.tree.map(np.testing.assert_array_equal, with_packed, gradient(variables)["params"])


def test_vmap_over_weights_runs_each_entry_with_its_own():
    model = _model(6, 1)
    variables, x = _variables(model, (2, 3, 5, 4))
    stacked = jax.tree.map(lambda w: jnp.stack([w, 0.5 * w, -w]), variables)
    _, y = jax.jit(jax.vmap(lambda v: model.apply(v, None, x)))(stacked)
    for entry in range(3):
        one = jax.tree.map(lambda w, e=entry: w[e], stacked)
        _, expected = lstm_reference(params_from_variables(one), x)
        np.testing.assert_allclose(np.asarray(y[entry]), expected, rtol=0, atol=2e-6)


def test_bad_input_raises_before_the_kernel_runs():
    model = _model(4, 1)
    variables, x = _variables(model, (2, 3, 5, 4))
    before = _native.calls()
    with pytest.raises(ValueError, match="inputs"):
        model.apply(variables, None, x[..., :3])
    with pytest.raises(ValueError, match="state"):
        model.apply(variables, random_state(_model(5, 1), 2, 3, 0), x)
    assert _native.calls() == before


def test_kernel_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="implementation"):
        BandedLSTM(4, implementation="fused")
    jax.config.update("jax_enable_x64", True)
    try:
        model = BandedLSTM(4, implementation="kernel", param_dtype=jnp.float64)
        x = jnp.ones((1, 1, 2, 3), jnp.float64)
        with pytest.raises(ValueError, match="float32 on CPU"):
            model.init(jax.random.key(0), None, x)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_without_the_extension_auto_warns_once_and_runs_the_scan(monkeypatch):
    monkeypatch.setattr(_native, "_lstm_cpu", None)
    monkeypatch.setattr(_native, "_warned", False)
    monkeypatch.setattr(_native, "_IMPORT_ERROR", ImportError("no module _lstm_cpu"))
    model = BandedLSTM(5)
    with pytest.warns(RuntimeWarning, match="not built"):
        variables, x = _variables(model, (1, 2, 4, 3))
        _, y = model.apply(variables, None, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.apply(variables, None, x)  # once per process
    _, expected = lstm_reference(params_from_variables(variables), x)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=0, atol=2e-6)
    with pytest.raises(RuntimeError, match="not built"):
        BandedLSTM(5, implementation="kernel").apply(variables, None, x)


@pytest.mark.parametrize(
    "variable, value", [("BANDED_RNN_ISA", "sse9"), ("BANDED_RNN_THREADS", "two")]
)
def test_a_bad_environment_setting_is_a_clear_error(variable, value):
    env = script_env(**{variable: value})
    done = run_script(SCRIPTS / "kernel_info.py", env=env, timeout=120, check=False)
    assert done.returncode != 0
    assert f"ValueError: {variable}: expected" in done.stderr and repr(value) in done.stderr


def test_environment_settings_apply():
    env = script_env(BANDED_RNN_ISA="portable", BANDED_RNN_THREADS="1")
    done = run_script(SCRIPTS / "kernel_settings.py", env=env, timeout=120)
    assert done.stdout.split() == ["portable", "1", "1"]


def test_forward_mode_needs_the_scan():
    """The kernel has reverse-mode derivatives only; ``jvp`` (``jacfwd``,
    ``hessian``) runs on ``implementation="scan"``, as the docstring says."""
    model = _model(6, 1)
    variables, x = _variables(model, (1, 2, 4, 3))

    def outputs(model, x):
        return model.apply(variables, None, x)[1]

    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: outputs(model, x), (x,), (jnp.ones_like(x),))
    scan = model.clone(implementation="scan")
    _, tangent = jax.jvp(lambda x: outputs(scan, x), (x,), (jnp.ones_like(x),))
    step = 1e-3
    numeric = (outputs(scan, x + step) - outputs(scan, x - step)) / (2 * step)
    np.testing.assert_allclose(tangent, numeric, rtol=0, atol=2e-3)
