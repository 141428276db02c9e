"""The training step: gradients against float64 finite differences of the NumPy reference,
bands that never exchange gradients, chunked == whole in training, remat, bad input."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from banded_rnn import BandedLSTM, LSTMState
from banded_rnn.training import make_eval_step, make_train_step

from helpers import (
    ADAM,
    WithHead,
    finite_differences,
    mse,
    new_train_state,
    random_inputs,
    random_state,
    random_variables,
)
from reference import lstm_reference, params_from_variables


def tree_allclose(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def dropout_forward(model, variables, state, x, key):
    return model.apply(variables, state, x, deterministic=False, rngs={"dropout": key})


# -- gradients against the independent float64 reference --------------------------------


def reference_loss(params, x, y, chunks, states):
    """MSE of the reference run chunk by chunk, each chunk from a fixed state."""
    outputs = [
        lstm_reference(params, x[:, :, a:b], s)[1] for (a, b), s in zip(chunks, states, strict=True)
    ]
    return np.mean((np.concatenate(outputs, axis=2) - y) ** 2)


@pytest.mark.parametrize("truncate", [False, True], ids=["whole_gradient", "truncated"])
def test_gradient_matches_float64_finite_differences(truncate):
    """The step's gradient, its window run in chunks of 3 steps (7 = 3 + 3 + 1), against
    central differences of the float64 NumPy reference: with truncate=False the
    whole-sequence gradient, with truncate=True that of the truncated objective."""
    batch, bands, time, features, units = 2, 2, 7, 2, 3
    with jax.enable_x64(True):
        model = BandedLSTM(units, num_layers=2, param_dtype=jnp.float64)
        x = random_inputs(0, (batch, bands, time, features), np.float64)
        y = random_inputs(1, (batch, bands, time, units), np.float64)
        variables = random_variables(model, features, seed=0, dtype=np.float64)
        state = jax.tree.map(lambda a: a.astype(np.float64), random_state(model, batch, bands, 2))
        step = make_train_step(mse, chunk_length=3, truncate=truncate)
        train_state, final, metrics = step(new_train_state(model, variables), state, x, y, None)
        grads = params_from_variables({"params": train_state.opt_state})
        final = jax.device_get(final)
        loss = float(metrics["loss"])

    params = [tuple(np.array(a) for a in layer) for layer in params_from_variables(variables)]
    initial = [tuple(np.asarray(a) for a in s) for s in state]
    # The truncated objective: every chunk starts from the state the previous
    # chunks reach with the current parameters, held fixed (no gradient).
    bounds = [0, 3, 6, 7] if truncate else [0, time]
    chunks = list(zip(bounds[:-1], bounds[1:], strict=True))
    states = [initial]
    for a, b in chunks[:-1]:
        states.append(lstm_reference(params, x[:, :, a:b], states[-1])[0])
    expected = finite_differences(params, lambda p: reference_loss(p, x, y, chunks, states))

    for got, want in zip(grads, expected, strict=True):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(loss, reference_loss(params, x, y, chunks, states), rtol=1e-12)
    expected_final, _ = lstm_reference(params, x, initial)
    for got, (hidden, cell) in zip(final, expected_final, strict=True):
        np.testing.assert_allclose(got.hidden, hidden, rtol=0, atol=1e-12)
        np.testing.assert_allclose(got.cell, cell, rtol=0, atol=1e-12)
    if truncate:  # the truncation removes a gradient that is really there
        whole = finite_differences(
            params, lambda p: reference_loss(p, x, y, [(0, time)], [initial])
        )
        gap = max(
            np.max(np.abs(g - w))
            for a, b in zip(whole, expected, strict=True)
            for g, w in zip(a, b, strict=True)
        )
        assert gap > 1e-4


def test_matches_reference_in_float32_with_adam():
    """One Adam step, float32: the loss and the carried state against the reference."""
    model = BandedLSTM(5, num_layers=2)
    x = random_inputs(3, (2, 3, 8, 4))
    y = random_inputs(4, (2, 3, 8, 5))
    variables = random_variables(model, x.shape[-1], seed=1)
    state = random_state(model, 2, 3, seed=5)
    step = make_train_step(mse, chunk_length=3)
    train_state = new_train_state(model, variables, ADAM)
    train_state, final, metrics = step(train_state, state, x, y, None)
    params = params_from_variables(variables)
    expected_final, outputs = lstm_reference(params, x, [tuple(s) for s in state])
    np.testing.assert_allclose(float(metrics["loss"]), np.mean((outputs - y) ** 2), rtol=1e-5)
    for got, (hidden, cell) in zip(final, expected_final, strict=True):
        assert isinstance(got, LSTMState)
        np.testing.assert_allclose(np.asarray(got.hidden), hidden, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got.cell), cell, atol=1e-5)
    assert int(train_state.step) == 1
    new, old = jax.tree.leaves(train_state.params), jax.tree.leaves(variables["params"])
    moved = [np.max(np.abs(np.asarray(a) - b)) for a, b in zip(new, old, strict=True)]
    assert min(moved) > 1e-3  # Adam's first step moves every parameter by about the rate


def test_eval_step_matches_reference():
    model = BandedLSTM(4)
    x = random_inputs(6, (3, 2, 5, 2))
    y = random_inputs(7, (3, 2, 5, 4))
    variables = random_variables(model, x.shape[-1], seed=1)
    state = random_state(model, 3, 2, seed=8)
    final, metrics = make_eval_step(mse)(new_train_state(model, variables), state, x, y)
    expected_final, outputs = lstm_reference(
        params_from_variables(variables), x, [tuple(s) for s in state]
    )
    np.testing.assert_allclose(float(metrics["loss"]), np.mean((outputs - y) ** 2), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(final[0].hidden), expected_final[0][0], atol=1e-5)


def test_model_with_a_head():
    model = WithHead(4)
    x = random_inputs(9, (2, 3, 6, 2))
    y = random_inputs(10, (2, 3, 6, 1))
    lstm = random_variables(BandedLSTM(4), 2, seed=11)["params"]
    head = {"kernel": random_inputs(12, (4, 1)), "bias": random_inputs(13, (1,))}
    variables = {"params": {"lstm": lstm, "head": head}}
    train_state = new_train_state(model, variables)
    _, _, metrics = make_train_step(mse, chunk_length=4)(train_state, None, x, y, None)
    params = variables["params"]
    _, hidden = lstm_reference(params_from_variables({"params": params["lstm"]}), x)
    head = hidden @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
    np.testing.assert_allclose(float(metrics["loss"]), np.mean((head - y) ** 2), rtol=1e-5)


# -- bands never exchange gradients ------------------------------------------------------


def test_gradients_never_cross_bands():
    """A loss on one band, in training (dropout on, two chunks with the state carried),
    has exactly zero gradient with respect to every other band's inputs and state."""
    model = BandedLSTM(5, num_layers=2, dropout=0.2, recurrent_dropout=0.2)
    x = random_inputs(11, (2, 3, 10, 4))
    variables = random_variables(model, x.shape[-1], seed=1)
    state = random_state(model, 2, 3, seed=12)
    key = jax.random.key(13)
    band, others = 1, [0, 2]

    @jax.jit
    @jax.grad
    def grads(x_and_state):
        x, state = x_and_state
        state, first = dropout_forward(model, variables, state, x[:, :, :6], key)
        state, second = dropout_forward(model, variables, state, x[:, :, 6:], key)
        outputs = jnp.concatenate([first, second], axis=2)
        final = sum(jnp.sum(s.hidden[:, band] + s.cell[:, band] ** 2) for s in state)
        return jnp.sum(jnp.sin(outputs[:, band])) + final

    grad_x, grad_state = jax.device_get(grads((x, state)))
    assert np.all(grad_x[:, others] == 0)
    assert np.all(np.abs(grad_x[:, band]).sum(axis=-1) > 0)  # every step of the band itself
    for leaf in jax.tree.leaves(grad_state):
        assert np.all(leaf[:, others] == 0)
        assert np.abs(leaf[:, band]).max() > 1e-4


def test_parameter_gradient_is_additive_over_bands():
    """The parameter gradient of a loss summed over bands equals the sum of the
    gradients of each band trained alone."""
    batch, bands, time = 2, 3, 9
    model = BandedLSTM(4, num_layers=2)
    x = random_inputs(14, (batch, bands, time, 3))
    y = random_inputs(15, (batch, bands, time, 4))
    variables = random_variables(model, x.shape[-1], seed=1)
    state = random_state(model, batch, bands, seed=16)

    def summed_over_bands(outputs, targets):
        return jnp.sum(jnp.mean((outputs - targets) ** 2, axis=(0, 2, 3)))

    step = make_train_step(summed_over_bands, chunk_length=4)
    train_state, _, _ = step(new_train_state(model, variables), state, x, y, None)
    total = jax.tree.map(jnp.zeros_like, train_state.opt_state)
    for k in range(bands):
        alone = jax.tree.map(lambda a, k=k: a[:, k : k + 1], state)
        ts, _, _ = step(
            new_train_state(model, variables), alone, x[:, k : k + 1], y[:, k : k + 1], None
        )
        total = jax.tree.map(jnp.add, total, ts.opt_state)
    tree_allclose(train_state.opt_state, total, rtol=1e-5, atol=1e-6)


# -- chunked == whole in training, dropout on ----------------------------------------------


def test_chunked_forward_equals_whole_in_training_with_dropout():
    model = BandedLSTM(6, num_layers=2, dropout=0.3, recurrent_dropout=0.25)
    x = random_inputs(17, (2, 3, 12, 4))
    variables = random_variables(model, x.shape[-1], seed=1)
    state = random_state(model, 2, 3, seed=18)
    key = jax.random.key(19)
    forward = jax.jit(partial(dropout_forward, model))
    whole_state, whole = forward(variables, state, x, key)
    carried, pieces = state, []
    for a, b in [(0, 4), (4, 8), (8, 12)]:
        carried, y = forward(variables, carried, x[:, :, a:b], key)
        pieces.append(y)
    np.testing.assert_allclose(np.concatenate(pieces, axis=2), whole, rtol=0, atol=1e-6)
    tree_allclose(carried, whole_state, rtol=0, atol=1e-6)
    # Dropout really is on: another key gives other outputs.
    _, other = forward(variables, state, x, jax.random.key(20))
    assert np.max(np.abs(np.asarray(other) - np.asarray(whole))) > 1e-2


def test_step_in_chunks_without_truncation_equals_whole_step_with_dropout():
    """truncate=False with the chunks inside one jit: same loss, state and gradient
    as the window in one piece, dropout on (one key per batch entry)."""
    model = BandedLSTM(5, num_layers=2, dropout=0.2, recurrent_dropout=0.3)
    x = random_inputs(20, (3, 2, 11, 3))
    y = random_inputs(21, (3, 2, 11, 5))
    variables = random_variables(model, x.shape[-1], seed=1)
    state = random_state(model, 3, 2, seed=22)
    keys = jax.random.split(jax.random.key(23), 3)
    steps = (make_train_step(mse), make_train_step(mse, chunk_length=4, truncate=False))
    results = [step(new_train_state(model, variables), state, x, y, keys) for step in steps]
    (ts_whole, s_whole, m_whole), (ts_chunk, s_chunk, m_chunk) = results
    np.testing.assert_allclose(float(m_chunk["loss"]), float(m_whole["loss"]), rtol=1e-6)
    tree_allclose(s_chunk, s_whole, rtol=0, atol=1e-6)
    tree_allclose(ts_chunk.opt_state, ts_whole.opt_state, rtol=1e-5, atol=1e-7)
    # Dropout really is on: other keys give another loss.
    other = jax.random.split(jax.random.key(24), 3)
    _, _, m_other = steps[0](new_train_state(model, variables), state, x, y, other)
    assert abs(float(m_other["loss"]) - float(m_whole["loss"])) > 1e-3


def test_per_entry_keys_give_each_entry_its_own_masks():
    """With one key per batch entry, entry b trains exactly as if it ran alone with key b:
    its state is the same, and the gradient of a mean loss is the mean of theirs."""
    model = BandedLSTM(4, dropout=0.3, recurrent_dropout=0.3)
    batch = 3
    x = random_inputs(24, (batch, 2, 6, 3))
    y = random_inputs(25, (batch, 2, 6, 4))
    variables = random_variables(model, x.shape[-1], seed=1)
    state = random_state(model, batch, 2, seed=26)
    keys = jax.random.split(jax.random.key(27), batch)
    step = make_train_step(mse)
    ts_all, s_all, _ = step(new_train_state(model, variables), state, x, y, keys)
    mean_grads = jax.tree.map(jnp.zeros_like, ts_all.opt_state)
    for b in range(batch):
        alone = jax.tree.map(lambda a, b=b: a[b : b + 1], state)
        ts, s, _ = step(
            new_train_state(model, variables), alone, x[b : b + 1], y[b : b + 1], keys[b]
        )
        tree_allclose(jax.tree.map(lambda a, b=b: a[b : b + 1], s_all), s, rtol=0, atol=1e-6)
        mean_grads = jax.tree.map(lambda m, g: m + g / batch, mean_grads, ts.opt_state)
    tree_allclose(ts_all.opt_state, mean_grads, rtol=1e-5, atol=1e-7)


# -- remat: less memory, same gradients ------------------------------------------------------


def test_remat_cuts_compiled_memory_with_equal_gradients():
    batch, bands, time, features, units = 2, 4, 2000, 4, 32
    x = random_inputs(28, (batch, bands, time, features))
    y = random_inputs(29, (batch, bands, time, units))
    variables = random_variables(BandedLSTM(units), features, seed=0)
    step = make_train_step(mse)
    memory, grads = {}, {}
    for remat_chunk in (None, 64):
        model = BandedLSTM(units, remat_chunk=remat_chunk)
        args = (new_train_state(model, variables), None, x, y, None)
        compiled = step.lower(*args).compile()
        memory[remat_chunk] = compiled.memory_analysis().temp_size_in_bytes
        grads[remat_chunk] = compiled(*args)[0].opt_state
    assert memory[None] >= 2 * memory[64], memory
    tree_allclose(grads[64], grads[None], rtol=1e-5, atol=1e-8)


# -- bad input: clear errors, nothing donated ---------------------------------------------------

BAD_MODEL = BandedLSTM(4, num_layers=2, dropout=0.1)
BAD_X = random_inputs(30, (2, 3, 5, 3))
BAD_Y = random_inputs(31, (2, 3, 5, 4))
BAD_VARIABLES = random_variables(BAD_MODEL, 3, seed=0)
KEY = jax.random.key(32)
BAD_STEP = make_train_step(mse)


BAD_INPUTS = {
    "units": ({"targets": BAD_Y[..., :3]}, ValueError, r"targets: expected shape .*"
              r"\(2, 3, 5, 4\).*received \(2, 3, 5, 3\)"),
    "time": ({"targets": BAD_Y[:, :, :4]}, ValueError, r"targets: .*received \(2, 3, 4, 4\)"),
    "batch": ({"targets": BAD_Y[:1, ..., 0]}, ValueError, r"targets: .*received \(1, 3, 5\)"),
    "state_batch": ({"state": BAD_MODEL.initial_state(3, 3)}, ValueError,
                    r"state\[0\]\.hidden: expected shape .*\(2, 3, 4\); received \(3, 3, 4\)"),
    "state_layers": ({"state": BAD_MODEL.initial_state(2, 3)[:1]}, ValueError,
                     r"state: expected a tuple of 2 LSTMState"),
    "no_rng": ({"rng": None}, ValueError, r"rng: the model has dropout on"),
    "rng_shape": ({"rng": jax.random.split(KEY, 3)}, ValueError,
                  r"rng: expected one key .*\(2,\).*received keys of shape \(3,\)"),
    "rng_dtype": ({"rng": np.zeros(2, np.int32)}, TypeError, r"rng: expected a key"),
    "inputs_rank": ({"inputs": BAD_X[0]}, ValueError, r"inputs: expected rank 4"),
    "features": ({"inputs": BAD_X[..., :2]}, ValueError, r"inputs: expected 3 features"),
    "train_state": ({"train_state": "params"}, TypeError, r"train_state: expected a flax"),
}  # fmt: skip


@pytest.mark.parametrize("change, error, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_before_anything_is_donated(change, error, message):
    train_state = new_train_state(BAD_MODEL, BAD_VARIABLES, ADAM)
    args = {
        "train_state": train_state,
        "state": BAD_MODEL.initial_state(2, 3),
        "inputs": BAD_X,
        "targets": BAD_Y,
        "rng": KEY,
    }
    with pytest.raises(error, match=message):
        BAD_STEP(**{**args, **change})
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(train_state.params))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(train_state.opt_state))
    new_state, _, metrics = BAD_STEP(**args)  # the buffers are intact and usable
    assert np.isfinite(float(metrics["loss"]))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(train_state.params))  # donated
    assert int(new_state.step) == 1


def test_loss_must_be_scalar():
    train_state = new_train_state(BAD_MODEL, BAD_VARIABLES)
    step = make_train_step(lambda o, t: (o - t) ** 2)
    with pytest.raises(ValueError, match=r"loss_fn: expected a scalar loss"):
        step(train_state, None, BAD_X, BAD_Y, KEY)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(train_state.params))


@pytest.mark.parametrize("chunk_length", [0, 2.5, True])
def test_bad_chunk_length(chunk_length):
    with pytest.raises(ValueError, match=r"chunk_length: expected None or an integer >= 1"):
        make_train_step(mse, chunk_length=chunk_length)
