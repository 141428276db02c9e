"""Reverse and bidirectional stacks, activations, ``use_bias``, held outputs and
time-major inputs, against flax's ``nn.RNN`` / ``nn.Bidirectional`` and the
float64 NumPy reference (``reference.directional_reference``).

Every numeric test runs on both paths: ``auto`` (the native CPU kernel where
it applies) and the XLA ``scan``.
"""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState

import banded_rnn
from banded_rnn import Stream
from banded_rnn.training import make_train_step

from helpers import init_model, random_inputs, random_state
from reference import directional_reference

TOL = {"atol": 2e-5, "rtol": 2e-5}


@pytest.fixture(params=["auto", "scan"])
def lstm(request):
    """``BandedLSTM`` on one path."""
    return partial(banded_rnn.BandedLSTM, implementation=request.param)


def _np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _lengths_and_mask(kind, batch, bands, time, seed=7):
    """``(seq_lengths, mask)`` for ``kind`` in none / lengths / mask; the mask has
    holes in the middle, not only padding at the end."""
    rng = np.random.default_rng(seed)
    if kind == "lengths":
        return rng.integers(0, time + 1, (batch, bands)).astype(np.int32), None
    if kind == "mask":
        return None, rng.random((batch, bands, time)) < 0.7
    return None, None


# -- flax ---------------------------------------------------------------------------------


def _flax_cell_params(layer, units):
    """Our ``{kernel, recurrent_kernel, bias}`` as flax ``nn.LSTMCell`` parameters."""
    params = {}
    for g, gate in enumerate("ifgo"):
        columns = slice(g * units, (g + 1) * units)
        params[f"i{gate}"] = {"kernel": layer["kernel"][:, columns]}
        params[f"h{gate}"] = {
            "kernel": layer["recurrent_kernel"][:, columns],
            "bias": layer["bias"][columns],
        }
    return {"cell": params}


def _flat(x):
    """``[batch, bands, ...]`` to ``[batch * bands, ...]``: flax's batch."""
    return x.reshape(-1, *x.shape[2:])


@pytest.mark.parametrize("reverse,keep_order", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_reverse_and_keep_order_match_flax_rnn(lstm, reverse, keep_order, with_lengths):
    batch, bands, time, features, units = 2, 3, 6, 4, 5
    x = random_inputs(0, (batch, bands, time, features))
    model = lstm(units, reverse=reverse, keep_order=keep_order)
    variables = init_model(model, x)
    state = random_state(model, batch, bands, 1)
    # No length 0: flax then returns the carry after the padding, not the initial one.
    lengths = np.array([[6, 3, 2], [1, 6, 4]], np.int32) if with_lengths else None
    final, y = model.apply(variables, state, x, seq_lengths=lengths)

    flax_rnn = nn.RNN(nn.LSTMCell(units), reverse=reverse, keep_order=keep_order)
    flax_params = {"params": _flax_cell_params(variables["params"]["layer_0"], units)}
    carry = (_flat(state[0].cell), _flat(state[0].hidden))  # flax's carry is (c, h)
    (c, h), expected = flax_rnn.apply(
        flax_params,
        _flat(x),
        initial_carry=carry,
        seq_lengths=None if lengths is None else _flat(lengths),
        return_carry=True,
    )
    # flax's outputs past a sequence's length are whatever the cell made of the
    # padding; ours are zeros. Compare the valid ones, and ours are zeros elsewhere.
    valid = np.ones((batch * bands, time), bool)
    if lengths is not None:
        valid = np.arange(time)[None] < _flat(lengths)[:, None]
    got = _flat(np.asarray(y))
    np.testing.assert_allclose(got[valid], np.asarray(expected)[valid], **TOL)
    np.testing.assert_array_equal(got[~valid], 0.0)
    np.testing.assert_allclose(_flat(final[0].hidden), h, **TOL)
    np.testing.assert_allclose(_flat(final[0].cell), c, **TOL)


@pytest.mark.parametrize("keep_order", [False, True])
def test_every_layer_of_a_reversed_stack_runs_backwards_as_flax_layers_keeping_order(
    lstm, keep_order
):
    """``reverse=True`` with two layers equals two flax ``nn.RNN(reverse=True,
    keep_order=True)`` layers (each runs backwards and hands the next its
    outputs in input order), the result reversed unless ``keep_order``."""
    batch, bands, time, features, units = 2, 2, 6, 3, 4
    x = random_inputs(30, (batch, bands, time, features))
    model = lstm(units, num_layers=2, reverse=True, keep_order=keep_order)
    variables = init_model(model, x)
    _, y = model.apply(variables, None, x)

    sequence = _flat(x)
    for layer in range(2):
        flax_rnn = nn.RNN(nn.LSTMCell(units), reverse=True, keep_order=True)
        params = {"params": _flax_cell_params(variables["params"][f"layer_{layer}"], units)}
        sequence = flax_rnn.apply(params, sequence)
    expected = np.asarray(sequence) if keep_order else np.asarray(sequence)[:, ::-1]
    np.testing.assert_allclose(_flat(np.asarray(y)), expected, **TOL)


def test_bidirectional_matches_flax_bidirectional(lstm):
    batch, bands, time, features, units = 2, 2, 5, 3, 4
    x = random_inputs(2, (batch, bands, time, features))
    lengths = np.array([[5, 2], [3, 1]], np.int32)  # no 0: see above
    model = lstm(units, bidirectional=True)
    variables = init_model(model, x)
    final, y = model.apply(variables, None, x, seq_lengths=lengths)

    flax_model = nn.Bidirectional(nn.RNN(nn.LSTMCell(units)), nn.RNN(nn.LSTMCell(units)))
    params = variables["params"]
    flax_params = {
        "params": {
            "forward_rnn": _flax_cell_params(params["layer_0"], units),
            "backward_rnn": _flax_cell_params(params["layer_0_reverse"], units),
        }
    }
    ((c_f, h_f), (c_b, h_b)), expected = flax_model.apply(
        flax_params, _flat(x), seq_lengths=_flat(lengths), return_carry=True
    )
    valid = np.arange(time)[None] < _flat(lengths)[:, None]
    assert y.shape == (batch, bands, time, 2 * units)
    np.testing.assert_allclose(_flat(np.asarray(y))[valid], np.asarray(expected)[valid], **TOL)
    for got, want in [(final[0].hidden, h_f), (final[0].cell, c_f)]:
        np.testing.assert_allclose(_flat(got), want, **TOL)
    for got, want in [(final[1].hidden, h_b), (final[1].cell, c_b)]:
        np.testing.assert_allclose(_flat(got), want, **TOL)


# -- the float64 reference ------------------------------------------------------------------


@pytest.mark.parametrize("merge", ["concat", "sum", "mul", "ave"])
@pytest.mark.parametrize("kind", ["none", "lengths", "mask"])
def test_bidirectional_stacks_match_the_reference(lstm, merge, kind):
    batch, bands, time, features, units = 2, 3, 5, 3, 4
    x = random_inputs(3, (batch, bands, time, features))
    lengths, mask = _lengths_and_mask(kind, batch, bands, time)
    model = lstm(units, num_layers=2, bidirectional=True, merge_mode=merge)
    variables = init_model(model, x)
    state = random_state(model, batch, bands, 4)
    assert len(state) == 4
    final, y = model.apply(variables, state, x, seq_lengths=lengths, mask=mask)
    want_final, want = directional_reference(
        variables, x, state=state, seq_lengths=lengths, mask=mask, bidirectional=True, merge=merge
    )
    assert y.shape == (batch, bands, time, model.output_units)
    np.testing.assert_allclose(y, want, **TOL)
    for got, (h, c) in zip(final, want_final, strict=True):
        np.testing.assert_allclose(got.hidden, h, **TOL)
        np.testing.assert_allclose(got.cell, c, **TOL)


@pytest.mark.parametrize("keep_order", [False, True])
@pytest.mark.parametrize("kind", ["none", "lengths", "mask"])
@pytest.mark.parametrize("zero_output", [True, False])
def test_reverse_with_masks_and_held_outputs_match_the_reference(
    lstm, keep_order, kind, zero_output
):
    batch, bands, time, features, units = 2, 3, 6, 3, 4
    x = random_inputs(5, (batch, bands, time, features))
    lengths, mask = _lengths_and_mask(kind, batch, bands, time, seed=8)
    model = lstm(
        units,
        num_layers=2,
        reverse=True,
        keep_order=keep_order,
        zero_output_for_mask=zero_output,
    )
    variables = init_model(model, x)
    state = random_state(model, batch, bands, 6)
    final, y = model.apply(variables, state, x, seq_lengths=lengths, mask=mask)
    want_final, want = directional_reference(
        variables,
        x,
        state=state,
        seq_lengths=lengths,
        mask=mask,
        reverse=True,
        keep_order=keep_order,
        zero_output=zero_output,
    )
    np.testing.assert_allclose(y, want, **TOL)
    for got, (h, c) in zip(final, want_final, strict=True):
        np.testing.assert_allclose(got.hidden, h, **TOL)
        np.testing.assert_allclose(got.cell, c, **TOL)


@pytest.mark.parametrize("kind", ["lengths", "mask"])
def test_held_outputs_repeat_the_last_valid_output(lstm, kind):
    """``zero_output_for_mask=False`` (Keras's default): a skipped step outputs
    the last valid output, the initial hidden state before any."""
    batch, bands, time, features, units = 2, 2, 7, 3, 4
    x = random_inputs(9, (batch, bands, time, features))
    lengths, mask = _lengths_and_mask(kind, batch, bands, time, seed=10)
    model = lstm(units, zero_output_for_mask=False)
    variables = init_model(model, x)
    state = random_state(model, batch, bands, 11)
    final, y = model.apply(variables, state, x, seq_lengths=lengths, mask=mask)
    want_final, want = directional_reference(
        variables, x, state=state, seq_lengths=lengths, mask=mask, zero_output=False
    )
    np.testing.assert_allclose(y, want, **TOL)
    np.testing.assert_allclose(final[0].hidden, want_final[0][0], **TOL)


ACTIVATIONS = {
    "tanh": np.tanh,
    "sigmoid": _np_sigmoid,
    "hard_sigmoid": lambda z: np.clip(z + 3.0, 0.0, 6.0) / 6.0,
    "relu": lambda z: np.maximum(z, 0.0),
    "linear": lambda z: z,
    "softsign": lambda z: z / (1.0 + np.abs(z)),
}


@pytest.mark.parametrize(
    "activation,recurrent_activation",
    [
        ("relu", "hard_sigmoid"),
        ("softsign", "sigmoid"),
        ("tanh", "hard_sigmoid"),
        ("linear", "sigmoid"),
    ],
)
@pytest.mark.parametrize("use_bias", [True, False])
def test_activations_and_use_bias_match_the_reference(
    lstm, activation, recurrent_activation, use_bias
):
    batch, bands, time, features, units = 2, 3, 5, 3, 4
    x = random_inputs(12, (batch, bands, time, features))
    model = lstm(
        units,
        num_layers=2,
        activation=activation,
        recurrent_activation=recurrent_activation,
        use_bias=use_bias,
    )
    variables = init_model(model, x)
    assert ("bias" in variables["params"]["layer_1"]) == use_bias
    mask = np.broadcast_to(np.arange(time) < 4, (batch, time))
    final, y = model.apply(variables, None, x, mask=mask)
    want_final, want = directional_reference(
        variables,
        x,
        mask=mask,
        activation=ACTIVATIONS[activation],
        recurrent_activation=ACTIVATIONS[recurrent_activation],
    )
    np.testing.assert_allclose(y, want, **TOL)
    np.testing.assert_allclose(final[1].cell, want_final[1][1], **TOL)


def test_a_callable_activation_is_used_as_given(lstm):
    x = random_inputs(13, (1, 2, 4, 3))
    model = lstm(3, activation=jax.nn.relu, recurrent_activation=jax.nn.sigmoid)
    variables = init_model(model, x)
    _, y = model.apply(variables, None, x)
    _, want = directional_reference(variables, x, activation=ACTIVATIONS["relu"])
    np.testing.assert_allclose(y, want, **TOL)


def test_named_activations_match_keras():
    import keras

    import interop  # noqa: F401  (sets the JAX backend before keras)
    from banded_rnn._cell import ACTIVATIONS as OURS

    z = np.linspace(-6.0, 6.0, 97).astype(np.float32)
    for name, fn in OURS.items():
        expected = np.asarray(keras.activations.get(name)(z))
        np.testing.assert_allclose(fn(jnp.asarray(z)), expected, atol=1e-6, err_msg=name)


def test_time_major_inputs_and_outputs(lstm):
    batch, bands, time, features, units = 2, 3, 5, 4, 3
    x = random_inputs(14, (batch, bands, time, features))
    model = lstm(units, bidirectional=True, merge_mode="sum", time_major=True)
    x_time_major = np.moveaxis(x, 2, 0)
    variables = init_model(model, x_time_major)
    lengths = np.array([5, 2], np.int32)
    final, y = jax.jit(partial(model.apply, seq_lengths=lengths))(variables, None, x_time_major)
    want_final, want = directional_reference(
        variables, x, seq_lengths=lengths, bidirectional=True, merge="sum"
    )
    assert y.shape == (time, batch, bands, units)
    np.testing.assert_allclose(np.moveaxis(np.asarray(y), 0, 2), want, **TOL)
    np.testing.assert_allclose(final[1].hidden, want_final[1][0], **TOL)


# -- state and chunks -----------------------------------------------------------------------


@pytest.mark.parametrize("keep_order", [True, False])
def test_a_reversed_stack_fed_from_the_last_chunk_equals_the_whole(lstm, keep_order):
    """A backward direction's state threads from the end: chunks fed last to
    first, each continuing the state of the one after it, equal the whole call
    (every layer runs backwards, so this holds for each layer's state)."""
    x = random_inputs(15, (2, 3, 9, 4))
    model = lstm(5, num_layers=2, reverse=True, keep_order=keep_order)
    variables = init_model(model, x)
    whole_final, whole = model.apply(variables, None, x)
    state, pieces = None, []
    for start, stop in [(6, 9), (2, 6), (0, 2)]:
        state, y = model.apply(variables, state, x[:, :, start:stop])
        if keep_order:
            pieces.insert(0, y)  # each chunk's outputs in input order
        else:
            pieces.append(y)  # in the order computed: the last chunk's first
    np.testing.assert_allclose(np.concatenate(pieces, axis=2), whole, **TOL)
    _, want = directional_reference(variables, x, reverse=True, keep_order=keep_order)
    np.testing.assert_allclose(whole, want, **TOL)
    for got, expected in zip(jax.tree.leaves(state), jax.tree.leaves(whole_final), strict=True):
        np.testing.assert_allclose(got, expected, **TOL)


def test_gradients_of_a_bidirectional_stack_with_held_outputs(lstm):
    """``grad`` through both directions, the flips and the held outputs, against
    float64 central differences of the reference."""
    from helpers import finite_differences

    batch, bands, time, features, units = 1, 2, 4, 2, 2
    x = random_inputs(16, (batch, bands, time, features))
    mask = np.array([[True, False, True, True]])
    model = lstm(units, bidirectional=True, zero_output_for_mask=False, merge_mode="mul")
    variables = init_model(model, x)
    weights = np.random.default_rng(17).standard_normal((batch, bands, time, units))

    def loss(params):
        _, y = model.apply({"params": params}, None, x, mask=mask)
        return jnp.sum(y * weights)

    got = jax.jit(jax.grad(loss))(variables["params"])
    params64 = jax.tree.map(lambda p: np.asarray(p, np.float64), variables["params"])

    def reference_loss(params):
        _, y = directional_reference(
            {"params": params}, x, mask=mask, bidirectional=True, merge="mul", zero_output=False
        )
        return np.sum(y * weights)

    want = finite_differences(params64, reference_loss)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-3)


def test_state_of_the_wrong_length_names_the_directions():
    model = banded_rnn.BandedLSTM(3, num_layers=2, bidirectional=True)
    x = random_inputs(18, (1, 2, 3, 2))
    variables = init_model(model, x)
    with pytest.raises(
        ValueError, match=r"tuple of 4 LSTMState \(2 \* num_layers, num_layers=2, in"
    ):
        model.apply(variables, model.initial_state(1, 2)[:2], x)
    with pytest.raises(ValueError, match=r"merge_mode: .*'sum' with bidirectional=False"):
        banded_rnn.BandedLSTM(3, merge_mode="sum")
    time_major = banded_rnn.BandedLSTM(3, num_layers=2, bidirectional=True, time_major=True)
    with pytest.raises(
        ValueError, match=r"\[time, batch, bands, 2\].*received shape \(3, 1, 2, 5\)"
    ):
        time_major.apply(variables, None, np.zeros((3, 1, 2, 5), np.float32))


# -- refusals -------------------------------------------------------------------------------


def test_streams_refuse_backward_directions():
    x = random_inputs(19, (1, 2, 4, 3))
    for options in ({"reverse": True}, {"bidirectional": True}):
        model = banded_rnn.BandedLSTM(3, **options)
        variables = init_model(model, x)
        with pytest.raises(ValueError, match="a Stream feeds a sequence in chunks in time order"):
            Stream(model, variables, batch_size=1, num_bands=2)


def test_the_training_steps_chunk_length_refuses_backward_directions():
    x = random_inputs(20, (2, 2, 6, 3))
    model = banded_rnn.BandedLSTM(3, bidirectional=True)
    variables = init_model(model, x)
    train_state = TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.1)
    )

    def loss(outputs, targets):
        return jnp.mean((outputs - targets) ** 2)

    step = make_train_step(loss, chunk_length=3)
    targets = np.zeros((2, 2, 6, 6), np.float32)
    with pytest.raises(ValueError, match="chunk_length=3 feeds a sequence in chunks"):
        step(train_state, None, x, targets)
    # The whole window in one call is fine.
    whole = make_train_step(loss)
    whole(train_state, None, x, targets)


def test_fit_evaluate_and_predict_refuse_carrying_a_backward_state_forwards():
    """Windows of a sequence with the state carried from one to the next, in
    time order, would hand a backward direction the wrong state: refused, also
    when the step was compiled before for whole windows (the mark is part of
    the cache key). carry_state=False and whole sequences run."""
    from banded_rnn.training import ChunkStream, evaluate, fit, make_eval_step, predict

    sequences = [random_inputs(22 + i, (2, 6, 3)) for i in range(2)]  # [bands, time, features]
    targets = [np.zeros((2, 6, 4), np.float32) for _ in sequences]
    model = banded_rnn.BandedLSTM(2, bidirectional=True)
    variables = init_model(model, sequences[0][None])
    train_state = TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.1)
    )

    def loss(outputs, targets):
        return jnp.mean((outputs - targets) ** 2)

    step, eval_step = make_train_step(loss), make_eval_step(loss)
    train_state, _, _ = step(  # compiled for whole windows, outside any loop
        train_state, None, np.stack(sequences)[:, :, :3], np.stack(targets)[:, :, :3]
    )
    stream = ChunkStream(sequences, targets, batch_size=2, chunk_length=3)
    with pytest.raises(ValueError, match=r"fit\(carry_state=True\) over chunks of 3 steps"):
        fit(step, train_state, stream, num_steps=2, rng=jax.random.key(0), progress=False)
    with pytest.raises(ValueError, match=r"evaluate\(chunk_length=3\) feeds a sequence"):
        evaluate(eval_step, train_state, sequences, targets, batch_size=2, chunk_length=3)
    with pytest.raises(ValueError, match=r"predict\(chunk_length=3\) feeds a sequence"):
        predict(eval_step, train_state, sequences, batch_size=2, chunk_length=3)

    stream = ChunkStream(sequences, targets, batch_size=2, chunk_length=3)
    train_state = fit(step, train_state, stream, num_steps=2, rng=jax.random.key(0),
                      carry_state=False, progress=False).train_state  # fmt: skip
    evaluate(eval_step, train_state, sequences, targets, batch_size=2)
    predict(eval_step, train_state, sequences, batch_size=2, chunk_length=6)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"merge_mode": "max"}, "merge_mode: expected one of"),
        ({"activation": "nope"}, "activation: expected a callable or one of"),
        ({"recurrent_activation": 3}, "recurrent_activation: expected a callable"),
        ({"reverse": True, "bidirectional": True}, "give bidirectional=True or reverse=True"),
    ],
)
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        banded_rnn.BandedLSTM(3, **options)


def test_the_kernel_refuses_other_activations_and_auto_runs_the_scan():
    from banded_rnn._backends import _native

    if not _native.available():
        pytest.skip("the native kernel is not built")
    x = random_inputs(21, (1, 2, 3, 2))
    variables = init_model(banded_rnn.BandedLSTM(3, activation="relu"), x)
    model = banded_rnn.BandedLSTM(3, activation="relu", implementation="kernel")
    with pytest.raises(ValueError, match="the kernel runs the tanh and sigmoid"):
        model.apply(variables, None, x)
    lowered = jax.jit(banded_rnn.BandedLSTM(3, activation="relu").apply).lower(variables, None, x)
    assert "banded_rnn_lstm" not in lowered.as_text()
