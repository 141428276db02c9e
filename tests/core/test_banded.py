"""BandedLSTM against the float64 NumPy loop reference, and under jit/grad/vmap.

Every test runs on both paths: ``auto`` (the native CPU kernel, on CPU) and
the XLA ``scan``.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import banded_rnn
from banded_rnn import LSTMState

from helpers import init_model, jit_apply, random_inputs, random_state
from reference import lstm_reference, params_from_variables

BandedLSTM = banded_rnn.BandedLSTM  # replaced per path by the fixture below


@pytest.fixture(autouse=True, params=["auto", "scan"])
def implementation(request, monkeypatch):
    """Runs the test with every ``BandedLSTM`` of this module on one path."""
    monkeypatch.setitem(
        globals(), "BandedLSTM", partial(banded_rnn.BandedLSTM, implementation=request.param)
    )
    return request.param


SHAPES = [
    # batch, bands, time, features, units
    (2, 3, 7, 4, 5),
    (1, 1, 1, 1, 1),
    (1, 3, 5, 4, 3),
    (3, 1, 6, 2, 4),
    (2, 5, 1, 3, 16),
]


def assert_matches_reference(
    model, variables, inputs, state, outputs, final, atol, seq_lengths=None
):
    ref_state = None if state is None else [tuple(s) for s in state]
    expected_final, expected = lstm_reference(
        params_from_variables(variables), inputs, ref_state, seq_lengths
    )
    np.testing.assert_allclose(np.asarray(outputs), expected, rtol=0, atol=atol)
    assert len(final) == model.num_layers
    for got, (hidden, cell) in zip(final, expected_final, strict=True):
        assert isinstance(got, LSTMState)
        np.testing.assert_allclose(np.asarray(got.hidden), hidden, rtol=0, atol=atol)
        np.testing.assert_allclose(np.asarray(got.cell), cell, rtol=0, atol=atol)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_reference_float32(num_layers, shape, with_state):
    batch, bands, time, features, units = shape
    model = BandedLSTM(units, num_layers=num_layers)
    x = random_inputs(1, (batch, bands, time, features))
    variables = init_model(model, x)
    state = random_state(model, batch, bands, seed=2) if with_state else None
    final, y = model.apply(variables, state, x)
    assert y.shape == (batch, bands, time, units) and y.dtype == jnp.float32
    assert_matches_reference(model, variables, x, state, y, final, atol=1e-5)


@pytest.mark.parametrize("lengths_shape", ["batch", "batch_bands"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_seq_lengths_match_reference(lengths_shape, num_layers):
    batch, bands, time, features, units = 3, 4, 9, 3, 6
    model = BandedLSTM(units, num_layers=num_layers)
    x = random_inputs(3, (batch, bands, time, features))
    variables = init_model(model, x)
    state = random_state(model, batch, bands, seed=4)
    rng = np.random.default_rng(5)
    shape = (batch,) if lengths_shape == "batch" else (batch, bands)
    lengths = rng.integers(0, time + 3, shape)  # 0, partial, full and longer than time
    lengths.flat[0] = 0
    final, y = jit_apply(model, variables, state, x, seq_lengths=lengths)
    assert_matches_reference(model, variables, x, state, y, final, atol=1e-5, seq_lengths=lengths)
    # Steps past a sequence's length output exactly zero.
    mask = np.arange(time) >= np.broadcast_to(lengths.reshape(batch, -1), (batch, bands))[..., None]
    assert np.all(np.asarray(y)[mask] == 0)


@pytest.mark.parametrize("num_layers", [1, 3])
def test_matches_reference_float64(num_layers):
    batch, bands, time, features, units = 2, 3, 8, 4, 5
    with jax.enable_x64(True):
        model = BandedLSTM(units, num_layers=num_layers, param_dtype=jnp.float64)
        x = random_inputs(6, (batch, bands, time, features), np.float64)
        variables = init_model(model, x)
        state = random_state(model, batch, bands, seed=7)
        state = jax.tree.map(lambda a: a.astype(np.float64), state)
        final, y = jit_apply(model, variables, state, x)
        assert y.dtype == jnp.float64
        assert_matches_reference(model, variables, x, state, y, final, atol=1e-10)


def test_initializers_follow_keras():
    model = BandedLSTM(6, num_layers=2)
    variables = model.init(jax.random.key(3), None, jnp.zeros((1, 2, 3, 4)))
    for layer, features in (("layer_0", 4), ("layer_1", 6)):
        p = variables["params"][layer]
        assert p["kernel"].shape == (features, 24)
        assert p["recurrent_kernel"].shape == (6, 24)
        expected_bias = np.zeros(24)
        expected_bias[6:12] = 1.0  # unit_forget_bias: the forget gate's slice
        np.testing.assert_array_equal(p["bias"], expected_bias)
        # Orthogonal recurrent kernel: its rows are orthonormal.
        u = np.asarray(p["recurrent_kernel"], np.float64)
        np.testing.assert_allclose(u @ u.T, np.eye(6), atol=1e-5)
        # Glorot uniform: bounded by sqrt(6 / (fan_in + fan_out)).
        assert np.abs(p["kernel"]).max() <= np.sqrt(6 / (features + 24))
    no_forget = BandedLSTM(6, unit_forget_bias=False).init(
        jax.random.key(3), None, jnp.zeros((1, 2, 3, 4))
    )
    np.testing.assert_array_equal(no_forget["params"]["layer_0"]["bias"], np.zeros(24))


def test_initial_state_needs_no_params():
    state = BandedLSTM(7, num_layers=3).initial_state(2, 5, dtype=jnp.bfloat16)
    assert len(state) == 3
    for s in state:
        assert s.hidden.shape == s.cell.shape == (2, 5, 7)
        assert s.hidden.dtype == jnp.bfloat16
        assert not np.any(np.asarray(s.hidden, np.float32))


def test_none_state_equals_zero_state():
    model = BandedLSTM(4, num_layers=2)
    x = random_inputs(8, (2, 3, 5, 2))
    variables = init_model(model, x)
    _, y_none = jit_apply(model, variables, None, x)
    _, y_zero = jit_apply(model, variables, model.initial_state(2, 3), x)
    np.testing.assert_array_equal(y_none, y_zero)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf, 1e30])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_bands_are_independent(bad_value, num_layers):
    batch, bands, time = 2, 4, 6
    model = BandedLSTM(5, num_layers=num_layers)
    x = random_inputs(9, (batch, bands, time, 3))
    variables = init_model(model, x)
    state = random_state(model, batch, bands, seed=10)
    final, y = jit_apply(model, variables, state, x)
    k = 2
    x_bad = x.copy()
    x_bad[:, k] = bad_value
    final_bad, y_bad = jit_apply(model, variables, state, x_bad)
    others = [j for j in range(bands) if j != k]
    np.testing.assert_array_equal(np.asarray(y_bad)[:, others], np.asarray(y)[:, others])
    for s, s_bad in zip(final, final_bad, strict=True):
        np.testing.assert_array_equal(
            np.asarray(s_bad.cell)[:, others], np.asarray(s.cell)[:, others]
        )
    if not np.isfinite(bad_value):
        assert not np.all(np.isfinite(np.asarray(y_bad)[:, k]))


def test_gradient_never_crosses_bands():
    batch, bands, time = 2, 3, 5
    model = BandedLSTM(4, num_layers=2)
    x = random_inputs(11, (batch, bands, time, 3))
    variables = init_model(model, x)
    state = random_state(model, batch, bands, seed=12)

    def loss(x, state, band):  # of one band's outputs only: ``band`` is one-hot
        _, y = model.apply(variables, state, x)
        return jnp.sum(jnp.sin(y) * band[None, :, None, None])

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    for k in range(bands):
        grad_x, grad_state = grad(x, state, np.eye(bands, dtype=np.float32)[k])
        grad_x = np.asarray(grad_x)
        assert np.any(grad_x[:, k] != 0)
        for j in range(bands):
            if j != k:
                assert np.all(grad_x[:, j] == 0.0)
                for s in grad_state:
                    assert np.all(np.asarray(s.hidden)[:, j] == 0.0)
                    assert np.all(np.asarray(s.cell)[:, j] == 0.0)


def test_jit_traces_once_per_shape():
    model = BandedLSTM(4)
    x = random_inputs(13, (2, 3, 5, 2))
    variables = init_model(model, x)
    traces = []

    @jax.jit
    def run(variables, state, x):
        traces.append(1)
        return model.apply(variables, state, x)

    state, y = run(variables, None, x)
    for seed in range(3):
        state, y = run(variables, state, random_inputs(seed, x.shape))
    assert len(traces) == 2  # once with state=None, once with a state
    _, eager = model.apply(variables, None, x)
    _, jitted = run(variables, None, x)
    np.testing.assert_allclose(jitted, eager, atol=1e-6)
    assert len(traces) == 2


def test_vmap_over_extra_leading_axis_equals_loop():
    model = BandedLSTM(4, num_layers=2)
    xs = random_inputs(14, (3, 2, 2, 5, 3))  # [extra, batch, bands, time, features]
    variables = init_model(model, xs[0])
    states, ys = jax.jit(jax.vmap(lambda x: model.apply(variables, None, x)))(xs)
    for e in range(xs.shape[0]):
        state, y = jit_apply(model, variables, None, xs[e])
        np.testing.assert_allclose(ys[e], y, atol=1e-6)
        np.testing.assert_allclose(states[1].cell[e], state[1].cell, atol=1e-6)


def test_grad_matches_finite_differences_in_float64():
    with jax.enable_x64(True):
        model = BandedLSTM(3, num_layers=2, param_dtype=jnp.float64)
        x = random_inputs(15, (1, 2, 4, 2), np.float64)
        variables = init_model(model, x)

        @jax.jit
        def loss(variables):
            _, y = model.apply(variables, None, x)
            return jnp.sum(y**2)

        grads = jax.jit(jax.grad(loss))(variables)
        kernel = np.asarray(variables["params"]["layer_0"]["kernel"])
        eps = 1e-6
        for index in [(0, 0), (1, 5), (0, 11)]:
            plus, minus = kernel.copy(), kernel.copy()
            plus[index] += eps
            minus[index] -= eps

            def with_kernel(k):
                v = jax.tree.map(lambda a: a, variables)
                v["params"]["layer_0"]["kernel"] = jnp.asarray(k)
                return float(loss(v))

            numeric = (with_kernel(plus) - with_kernel(minus)) / (2 * eps)
            np.testing.assert_allclose(
                grads["params"]["layer_0"]["kernel"][index], numeric, rtol=1e-6, atol=1e-9
            )


def test_bfloat16_inputs_keep_float32_state():
    model = BandedLSTM(6, num_layers=2)
    x = random_inputs(16, (2, 3, 5, 4))
    variables = init_model(model, x)
    x_bf16 = jnp.asarray(x, jnp.bfloat16)
    final, y = jit_apply(model, variables, None, x_bf16)
    assert y.dtype == jnp.float32
    assert all(s.hidden.dtype == s.cell.dtype == jnp.float32 for s in final)
    # The reference sees the same rounded inputs, so only float32 arithmetic differs.
    _, expected = lstm_reference(params_from_variables(variables), np.asarray(x_bf16, np.float64))
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5)


def test_unroll_does_not_change_results():
    x = random_inputs(17, (2, 3, 11, 3))
    base = BandedLSTM(5, num_layers=2)
    variables = init_model(base, x)
    _, y = jit_apply(base, variables, None, x)
    for unroll in (2, 4, 16):
        _, y_unrolled = jit_apply(BandedLSTM(5, num_layers=2, unroll=unroll), variables, None, x)
        np.testing.assert_allclose(y_unrolled, y, atol=1e-6)


class TestDropout:
    model = BandedLSTM(8, num_layers=2, dropout=0.3, recurrent_dropout=0.4)
    x = random_inputs(18, (2, 3, 6, 4))

    def variables(self):
        return init_model(self.model, self.x)

    def test_deterministic_ignores_dropout(self):
        variables = self.variables()
        _, y = jit_apply(self.model, variables, None, self.x)
        _, expected = lstm_reference(params_from_variables(variables), self.x)
        np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5)

    def test_training_drops_and_is_reproducible(self):
        variables = self.variables()
        _, y = jit_apply(self.model, variables, None, self.x)
        run = lambda seed: jit_apply(  # noqa: E731
            self.model, variables, None, self.x, deterministic=False,
            rngs={"dropout": jax.random.key(seed)},
        )[1]  # fmt: skip
        np.testing.assert_array_equal(run(1), run(1))
        assert np.abs(np.asarray(run(1)) - np.asarray(run(2))).max() > 1e-3
        assert np.abs(np.asarray(run(1)) - np.asarray(y)).max() > 1e-3

    def test_input_dropout_equals_reference_with_its_mask(self):
        # One layer, input dropout only: each (sequence, band) keeps one mask
        # over features for every step. Recover it from single-feature probes.
        model = BandedLSTM(4, dropout=0.5)
        x = random_inputs(19, (2, 3, 5, 6))
        variables = init_model(model, x)
        rngs = {"dropout": jax.random.key(7)}
        _, y = jit_apply(model, variables, None, x, deterministic=False, rngs=rngs)
        params = params_from_variables(variables)
        kept = np.zeros((2, 3, 6))
        for f in range(6):
            probe = np.zeros_like(x)
            probe[..., f] = x[..., f]
            _, y_probe = jit_apply(model, variables, None, probe, deterministic=False, rngs=rngs)
            _, zero = lstm_reference(params, np.zeros_like(x))
            kept[..., f] = np.abs(np.asarray(y_probe) - zero).max(axis=(2, 3)) > 1e-7
        assert 0 < kept.mean() < 1
        _, expected = lstm_reference(params, x * kept[:, :, None, :] / 0.5)
        np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5)

    def test_missing_rng_is_a_clear_error(self):
        with pytest.raises(ValueError, match="'dropout' rng"):
            self.model.apply(self.variables(), None, self.x, deterministic=False)


REMAT_X = random_inputs(20, (2, 3, 13, 3))
REMAT_LENGTHS = np.array([[13, 4, 0], [9, 13, 12]])
_remat_base: dict = {}  # per path: the gradients without remat, computed once


def _remat_loss(model):
    def f(variables, state, x):
        final, y = model.apply(variables, state, x, seq_lengths=REMAT_LENGTHS)
        return jnp.sum(jnp.sin(y)) + jnp.sum(final[1].cell ** 2)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))


@pytest.mark.parametrize("remat_chunk", [1, 4, 5, 30])
def test_remat_changes_neither_outputs_nor_gradients(remat_chunk, implementation):
    x, lengths = REMAT_X, REMAT_LENGTHS
    base = BandedLSTM(5, num_layers=2)
    remat = BandedLSTM(5, num_layers=2, remat_chunk=remat_chunk)
    variables = init_model(base, x)
    state = random_state(base, 2, 3, seed=21)
    if implementation not in _remat_base:
        _remat_base[implementation] = _remat_loss(base)(variables, state, x)
    value, grads = _remat_base[implementation]
    value_remat, grads_remat = _remat_loss(remat)(variables, state, x)
    np.testing.assert_allclose(value_remat, value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    _, expected = lstm_reference(
        params_from_variables(variables), x, [tuple(s) for s in state], lengths
    )
    np.testing.assert_allclose(
        jit_apply(remat, variables, state, x, seq_lengths=lengths)[1], expected, atol=1e-5
    )


def test_initial_state_can_be_donated():
    model = BandedLSTM(3, num_layers=2)
    x = random_inputs(22, (1, 2, 1, 2))
    variables = init_model(model, x)
    initial = random_state(model, 1, 2, seed=122)
    step = jax.jit(model.apply, donate_argnums=1)
    donated = jax.tree.map(jnp.asarray, initial)
    state, _ = step(variables, donated, x)
    first = state
    state, y = step(variables, state, x)
    # Both calls took the state's buffers (XLA:CPU honours donation), not the weights'.
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves((donated, first)))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(variables))
    expected_final, expected = lstm_reference(
        params_from_variables(variables),
        np.concatenate([x, x], axis=2),
        [tuple(s) for s in initial],
    )
    np.testing.assert_allclose(y, expected[:, :, 1:], atol=1e-5)
    for got, (hidden, cell) in zip(state, expected_final, strict=True):
        np.testing.assert_allclose(got.hidden, hidden, atol=1e-5)
        np.testing.assert_allclose(got.cell, cell, atol=1e-5)


def test_forward_mode_matches_finite_differences():
    # Research users differentiate both ways: jvp must work through the scan.
    with jax.enable_x64(True):
        model = BandedLSTM(3, num_layers=2, param_dtype=jnp.float64)
        x = random_inputs(23, (1, 2, 5, 2), np.float64)
        variables = init_model(model, x)
        direction = random_inputs(24, x.shape, np.float64)

        def f(x):
            return model.apply(variables, None, x)[1]

        _, tangent = jax.jit(lambda x, d: jax.jvp(f, (x,), (d,)))(x, direction)
        eps = 1e-6
        _, plus = lstm_reference(params_from_variables(variables), x + eps * direction)
        _, minus = lstm_reference(params_from_variables(variables), x - eps * direction)
        np.testing.assert_allclose(tangent, (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mask_shape", ["batch_time", "batch_bands_time"])
def test_mask_with_gaps_matches_reference(mask_shape):
    batch, bands, time, features, units = 2, 3, 9, 3, 4
    model = BandedLSTM(units, num_layers=2)
    x = random_inputs(25, (batch, bands, time, features))
    variables = init_model(model, x)
    state = random_state(model, batch, bands, seed=26)
    shape = (batch, time) if mask_shape == "batch_time" else (batch, bands, time)
    mask = np.random.default_rng(27).random(shape) < 0.6  # gaps anywhere, leading ones too
    mask.flat[0] = False
    final, y = jit_apply(model, variables, state, x, mask=mask)
    ref_state = [tuple(s) for s in state]
    expected_final, expected = lstm_reference(
        params_from_variables(variables), x, ref_state, mask=mask
    )
    np.testing.assert_allclose(np.asarray(y), expected, rtol=0, atol=1e-5)
    for got, (hidden, cell) in zip(final, expected_final, strict=True):
        np.testing.assert_allclose(np.asarray(got.hidden), hidden, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got.cell), cell, rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("spec", ["batch", "bands"])
def test_runs_inside_shard_map(with_state, spec):
    """Sequences or bands split over a mesh with ``shard_map``: the zero
    state made inside the model must vary like the sharded inputs."""
    model = BandedLSTM(units=5, num_layers=2)
    inputs = random_inputs(40, (2, 3, 6, 4))
    variables = init_model(model, inputs)
    state = random_state(model, 2, 3, seed=41) if with_state else None
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), (spec,))
    split = jax.sharding.PartitionSpec(*([None] if spec == "bands" else []), spec)

    def apply(variables, state, inputs):
        return model.apply(variables, state, inputs)

    sharded = jax.jit(
        jax.shard_map(
            apply,
            mesh=mesh,
            in_specs=(jax.sharding.PartitionSpec(), split, split),
            out_specs=(split, split),
        )
    )
    final, outputs = sharded(variables, state, inputs)
    assert_matches_reference(model, variables, inputs, state, outputs, final, atol=1e-5)


@pytest.mark.parametrize("spec", ["batch", "bands"])
def test_runs_under_a_mesh_with_explicit_axes(spec):
    """Inputs split over a mesh with explicit axes: the zero state made inside
    the model must take their layout, or concatenating it with them fails.
    Lengths and dropout (both built unsplit inside the model) must mix too."""
    model = BandedLSTM(units=5, num_layers=2, dropout=0.3, recurrent_dropout=0.2)
    inputs = random_inputs(42, (2, 3, 6, 4))
    variables = init_model(model, inputs)
    lengths = np.array([6, 4], np.int32)
    rngs = {"dropout": jax.random.key(7)}
    mesh = jax.make_mesh((1,), (spec,), axis_types=(jax.sharding.AxisType.Explicit,))
    split = jax.sharding.PartitionSpec(*([None] if spec == "bands" else []), spec)

    def apply(state, inputs, deterministic):
        return model.apply(
            variables, state, inputs, seq_lengths=lengths, deterministic=deterministic, rngs=rngs
        )

    apply = jax.jit(apply, static_argnums=2)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(inputs, split)
        final, outputs = apply(None, sharded, True)
        assert_matches_reference(
            model, variables, inputs, None, outputs, final, atol=1e-5, seq_lengths=lengths
        )
        # The state it returned goes back in.
        again, outputs = apply(final, sharded, True)
        assert_matches_reference(
            model, variables, inputs, final, outputs, again, atol=1e-5, seq_lengths=lengths
        )
        dropped = apply(None, sharded, False)[1]
    # The same dropout key draws the same masks as without a mesh.
    plain = apply(None, inputs, False)[1]
    np.testing.assert_allclose(np.asarray(dropped), np.asarray(plain), atol=1e-6)
    assert np.abs(np.asarray(plain) - np.asarray(apply(None, inputs, True)[1])).max() > 1e-2


def test_zero_time_steps_leave_the_state_unchanged():
    model = BandedLSTM(units=5, num_layers=2)
    variables = init_model(model, random_inputs(43, (2, 3, 1, 4)))
    state = random_state(model, 2, 3, seed=44)
    final, outputs = jax.jit(model.apply)(variables, state, np.zeros((2, 3, 0, 4), np.float32))
    assert outputs.shape == (2, 3, 0, 5)
    for got, given in zip(jax.tree.leaves(final), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(got), given)
