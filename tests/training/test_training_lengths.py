"""Training on research data: padded sequences of any lengths, one target per
sequence, metrics and predictions, against hand-written references (the float64
NumPy loop and finite differences, or a loop over the unpadded sequences)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState

from banded_rnn import BandedLSTM
from banded_rnn.training import (
    ChunkStream,
    accuracy,
    evaluate,
    fit,
    make_eval_step,
    make_train_step,
    masked_mean,
    predict,
)

from helpers import WithHead, finite_differences, init_model, random_inputs
from reference import lstm_reference


class Classifier(nn.Module):
    """Sequence to one: the last layer's hidden state after each sequence's
    last valid step, per band (``pool=False``) or averaged over bands, then
    a linear head to ``classes`` logits."""

    units: int
    classes: int
    pool: bool = True

    @nn.compact
    def __call__(self, state, inputs, *, seq_lengths=None, mask=None, deterministic=True):
        state, _ = BandedLSTM(self.units, name="lstm")(
            state, inputs, seq_lengths=seq_lengths, mask=mask, deterministic=deterministic
        )
        hidden = state[-1].hidden  # [batch, bands, units]
        if self.pool:
            hidden = hidden.mean(axis=1)  # [batch, units]
        return state, nn.Dense(self.classes, name="head")(hidden)


def capture_grads() -> optax.GradientTransformation:
    """Leaves the parameters alone and keeps the last gradient as its state."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda updates, state, params=None: (jax.tree.map(jnp.zeros_like, updates), updates),
    )


CAPTURE = capture_grads()


def squared_error(outputs, targets):
    return (outputs - targets) ** 2


def train_state_of(model, params, tx=CAPTURE):
    return TrainState.create(apply_fn=model.apply, params=jax.tree.map(jnp.array, params), tx=tx)


def padded(sequences, time):
    """``[bands, time_i, ...]`` sequences stacked, zero-padded to ``time`` steps."""
    return np.stack(
        [np.pad(s, [(0, 0), (0, time - s.shape[1])] + [(0, 0)] * (s.ndim - 2)) for s in sequences]
    )


def flatten(params):
    return {
        "/".join(k.key for k in path): np.array(leaf, np.float64)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }


def lstm_params(flat, num_layers=1, prefix=""):
    return [
        tuple(flat[f"{prefix}layer_{i}/{n}"] for n in ("kernel", "recurrent_kernel", "bias"))
        for i in range(num_layers)
    ]


LENGTHS = [5, 2, 7]
BANDS, FEATURES, UNITS, CLASSES = 2, 2, 3, 3


# -- per-step targets: the masked loss is the loss on the unpadded sequences -----------------


@pytest.mark.parametrize("given", ["seq_lengths", "mask"])
@pytest.mark.parametrize("chunk_length", [None, 3], ids=["whole", "chunks_of_3"])
def test_masked_loss_and_gradient_are_those_of_the_unpadded_sequences(given, chunk_length):
    """Three sequences of 5, 2 and 7 steps padded to 7 (padding filled with large
    numbers, which must not count): the step's loss and gradient against the
    float64 reference run on each sequence unpadded, and finite differences of it."""
    sequences = [random_inputs(i, (BANDS, t, FEATURES), np.float64) for i, t in enumerate(LENGTHS)]
    targets = [random_inputs(10 + i, (BANDS, t, UNITS), np.float64) for i, t in enumerate(LENGTHS)]
    x, y = padded(sequences, 7), padded(targets, 7)
    for row, t in enumerate(LENGTHS):
        x[row, :, t:] = 50.0
        y[row, :, t:] = -50.0
    lengths = np.array(LENGTHS, np.int32)
    validity = {"seq_lengths": lengths, "mask": np.arange(7) < lengths[:, None]}[given]
    with jax.enable_x64(True):
        model = BandedLSTM(UNITS, param_dtype=jnp.float64)
        params = init_model(model, x[:1])["params"]
        loss_fn = masked_mean(squared_error)
        step = make_train_step(loss_fn, chunk_length=chunk_length, truncate=False)
        train_state, final, metrics = step(
            train_state_of(model, params), None, x, y, **{given: validity}
        )
        grads = flatten(train_state.opt_state)
        loss = float(metrics["loss"])

    def reference(flat):
        weights = lstm_params(flat)
        total = sum(
            np.sum((lstm_reference(weights, s[None])[1][0] - t) ** 2)
            for s, t in zip(sequences, targets, strict=True)
        )
        return total / (sum(LENGTHS) * BANDS * UNITS)

    flat = flatten(params)
    np.testing.assert_allclose(loss, reference(flat), rtol=1e-12)
    expected = finite_differences(flat, reference)
    for name in expected:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-6, atol=1e-9)
    for row, s in enumerate(sequences):  # the state after each sequence's own last step
        ((hidden, cell),) = lstm_reference(lstm_params(flat), s[None])[0]
        np.testing.assert_allclose(np.asarray(final[0].hidden[row]), hidden[0], atol=1e-12)
        np.testing.assert_allclose(np.asarray(final[0].cell[row]), cell[0], atol=1e-12)


# -- one target per sequence ----------------------------------------------------------------


@pytest.mark.parametrize("pool", [True, False], ids=["pooled", "per_band"])
def test_sequence_to_one_gradient_equals_the_per_sequence_loop(pool):
    """Labels from the state after each sequence's last valid step: the step's
    cross-entropy and gradient (the lstm's and the head's) against finite
    differences of the float64 reference run on each sequence alone. The second
    entry's sequence does not end in this window (``ends`` False): its label
    must not count."""
    sequences = [random_inputs(i, (BANDS, t, FEATURES), np.float64) for i, t in enumerate(LENGTHS)]
    x = padded(sequences, 7)
    labels = np.array([2, 0, 1]) if pool else np.array([[2, 1], [0, 0], [1, 2]])
    ends = np.array([True, False, True])
    per_target = optax.softmax_cross_entropy_with_integer_labels
    with jax.enable_x64(True):
        model = Classifier(UNITS, CLASSES, pool=pool)
        params = init_model(model, x[:1], seed=1)["params"]
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        step = make_train_step(masked_mean(per_target), targets_per="sequence")
        train_state, _, metrics = step(
            train_state_of(model, params), None, x, labels,
            seq_lengths=np.array(LENGTHS, np.int32), ends=ends,
        )  # fmt: skip
        grads = flatten(train_state.opt_state)
        loss = float(metrics["loss"])

    def reference(flat):
        losses = []
        for s, label, counts in zip(sequences, labels, ends, strict=True):
            if not counts:
                continue
            ((hidden, _),) = lstm_reference(lstm_params(flat, prefix="lstm/"), s[None])[0]
            hidden = hidden[0].mean(axis=0) if pool else hidden[0]  # [units] or [bands, units]
            logits = hidden @ flat["head/kernel"] + flat["head/bias"]
            logits = logits - logits.max(axis=-1, keepdims=True)
            log_p = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            picked = np.take_along_axis(np.atleast_2d(log_p), np.atleast_1d(label)[:, None], -1)
            losses.append(-picked.ravel())
        return float(np.mean(np.concatenate(losses)))

    flat = flatten(params)
    np.testing.assert_allclose(loss, reference(flat), rtol=1e-12)
    expected = finite_differences(flat, reference)
    for name in expected:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-6, atol=1e-9)


def test_fit_on_whole_sequences_in_buckets_matches_a_loop_over_the_sequences():
    """fit with a whole-sequence stream (lengths 3..9, buckets 5 and 9, batches
    filled with empty entries): each step's gradient equals the gradient of the
    mean loss of that batch's sequences, each run alone and unpadded."""
    rng = np.random.default_rng(0)
    lengths = [3, 9, 4, 8, 6, 5, 7]
    sequences = [rng.normal(size=(BANDS, t, FEATURES)).astype(np.float32) for t in lengths]
    labels = rng.integers(0, CLASSES, len(lengths))
    model = Classifier(UNITS, CLASSES)
    params = init_model(model, sequences[0][None])["params"]
    loss_fn = masked_mean(optax.softmax_cross_entropy_with_integer_labels)
    step = make_train_step(loss_fn, targets_per="sequence")
    stream = ChunkStream(sequences, labels, batch_size=3, targets_per="sequence",
                         buckets=[5, 9], seed=3)  # fmt: skip
    plan = ChunkStream(sequences, labels, batch_size=3, targets_per="sequence",
                       buckets=[5, 9], seed=3)  # fmt: skip
    seen = []
    for number in range(4):  # the first four steps, each from the same weights
        batch = next(plan)
        stream.set_position({"next_batch": number})
        start = train_state_of(model, params).replace(step=number)
        result = fit(step, start, stream, num_steps=number + 1, rng=jax.random.key(0),
                     progress=False)  # fmt: skip
        members = [i for i, _ in plan.last_batch() if i >= 0]
        seen.append(members)

        def loop_loss(p, members=members):
            losses = []
            for i in members:
                _, logits = model.apply({"params": p}, None, sequences[i][None])
                losses.append(
                    optax.softmax_cross_entropy_with_integer_labels(logits, labels[i : i + 1])
                )
            return jnp.mean(jnp.concatenate(losses))

        expected = jax.jit(jax.grad(loop_loss))(params)  # one program, not one per primitive
        for got, want in zip(jax.tree.leaves(result.train_state.opt_state),
                             jax.tree.leaves(expected), strict=True):  # fmt: skip
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
        longest = max(lengths[i] for i in members)
        assert batch.inputs.shape[2] == (5 if longest <= 5 else 9)
    # An epoch: 3, 4, 5 in one batch; 6, 7, 8, 9 in two, one of them filled with empties.
    assert sorted(i for members in seen[:3] for i in members) == list(range(7))
    assert sorted(len(members) for members in seen[:3]) == [1, 3, 3]


# -- the stream: padding, buckets, never two sequences in one window -----------------------


def check_windows_hold_one_sequence(stream, chunk, sequences, targets):
    for row, (index, window) in enumerate(stream.last_batch()):
        length = 0 if index < 0 else sequences[index].shape[1]
        valid = int(chunk.seq_lengths[row]) if chunk.seq_lengths is not None else None
        start = window * (stream.chunk_length or 0)
        own = max(0, min(chunk.inputs.shape[2], length - start))
        assert valid in (None, own)
        if index >= 0:
            np.testing.assert_array_equal(
                chunk.inputs[row, :, :own], sequences[index][:, start : start + own]
            )
            if stream.targets_per == "step":
                np.testing.assert_array_equal(
                    chunk.targets[row, :, :own], targets[index][:, start : start + own]
                )
            else:
                np.testing.assert_array_equal(chunk.targets[row], targets[index])
                assert chunk.ends[row] == (start + chunk.inputs.shape[2] >= length)
        assert not chunk.inputs[row, :, own:].any()  # padding is zeros, never the next sequence


@pytest.mark.parametrize("targets_per", ["step", "sequence"])
def test_chunks_of_sequences_of_any_length(targets_per):
    """Lengths that are no multiple of the chunk: each sequence is dealt in
    ceil(length / 4) chunks, the last one padded, with its valid steps."""
    rng = np.random.default_rng(1)
    lengths = [5, 8, 3, 10, 1]
    sequences = [rng.normal(size=(2, t, 3)) for t in lengths]
    if targets_per == "step":
        targets = [rng.normal(size=(2, t, 1)) for t in lengths]
    else:
        targets = list(rng.integers(0, 4, (len(lengths), 2)))
    stream = ChunkStream(sequences, targets, batch_size=2, chunk_length=4, targets_per=targets_per)
    played: dict[int, list[int]] = {}
    for _ in range(30):
        chunk = next(stream)
        assert chunk.inputs.shape == (2, 2, 4, 3)
        assert chunk.seq_lengths.dtype == np.int32
        assert (chunk.ends is None) == (targets_per == "step")
        check_windows_hold_one_sequence(stream, chunk, sequences, targets)
        for (_, window), number, reset in zip(stream.last_batch(), chunk.sequence,
                                                  chunk.reset, strict=True):  # fmt: skip
            assert reset == (window == 0)
            played.setdefault(int(number), []).append(window)
    for number, windows in list(played.items())[:-2]:  # the last two may be unfinished
        assert windows == list(range(-(-lengths[stream._sequence_index(number)] // 4)))


def test_buckets_deal_every_sequence_once_per_epoch_without_mixing():
    rng = np.random.default_rng(2)
    lengths = [3, 9, 4, 8, 6, 5, 7, 2]
    sequences = [rng.normal(size=(2, t, 3)) for t in lengths]
    targets = [rng.normal(size=(2, t, 1)) for t in lengths]
    stream = ChunkStream(sequences, targets, batch_size=3, buckets=[4, 6, 9], seed=5)
    per_epoch = 3  # lengths up to 4: three; 5 to 6: two (and an empty entry); 7 to 9: three
    for _ in range(2):
        dealt = []
        for _ in range(per_epoch):
            chunk = next(stream)
            members = [i for i, _ in stream.last_batch() if i >= 0]
            longest = max(lengths[i] for i in members)
            assert chunk.inputs.shape[2] == min(b for b in (4, 6, 9) if b >= longest)
            assert chunk.reset.all()
            check_windows_hold_one_sequence(stream, chunk, sequences, targets)
            dealt += members
        assert sorted(dealt) == list(range(len(lengths)))


def test_whole_sequence_stream_resumes_and_splits_over_processes():
    rng = np.random.default_rng(3)
    sequences = [rng.normal(size=(2, t, 3)) for t in (3, 7, 4, 6, 5)]
    labels = list(range(5))
    kwargs = dict(batch_size=4, targets_per="sequence", buckets=[4, 7], seed=9)
    whole = ChunkStream(sequences, labels, **kwargs)
    batches = [next(whole) for _ in range(5)]
    resumed = ChunkStream(sequences, labels, **kwargs)
    resumed.set_position({"next_batch": 3})
    for a, b in zip(batches[3:], [next(resumed), next(resumed)], strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    halves = [ChunkStream(sequences, labels, process_index=p, process_count=2, **kwargs)
              for p in (0, 1)]  # fmt: skip
    for batch in batches:
        parts = [next(h) for h in halves]
        for field, x in enumerate(batch):
            np.testing.assert_array_equal(x, np.concatenate([p[field] for p in parts]))


# -- evaluation, metrics and predictions ---------------------------------------------------


def test_evaluate_and_predict_on_variable_lengths_match_the_reference():
    """Per-sequence classification over held-out sequences of eight lengths, in
    buckets and in windows of 4: predictions against the float64 reference run on
    each sequence alone; loss and accuracy against NumPy means over them."""
    rng = np.random.default_rng(4)
    lengths = [3, 9, 4, 8, 6, 5, 7, 2, 9]
    sequences = [rng.normal(size=(BANDS, t, FEATURES)).astype(np.float32) for t in lengths]
    labels = rng.integers(0, CLASSES, len(lengths))
    model = Classifier(UNITS, CLASSES)
    params = init_model(model, sequences[0][None], seed=2)["params"]
    train_state = train_state_of(model, params, optax.sgd(0.1))
    loss_fn = masked_mean(optax.softmax_cross_entropy_with_integer_labels)
    step = make_eval_step(loss_fn, targets_per="sequence", metrics={"accuracy": accuracy})
    flat = flatten(params)
    expected = []
    for s in sequences:
        ((hidden, _),) = lstm_reference(lstm_params(flat, prefix="lstm/"), s[None])[0]
        expected.append(hidden[0].mean(axis=0) @ flat["head/kernel"] + flat["head/bias"])
    expected = np.stack(expected)
    log_p = expected - np.log(np.exp(expected).sum(-1, keepdims=True))
    reference = {
        "loss": -np.mean(log_p[np.arange(len(labels)), labels]),
        "accuracy": np.mean(expected.argmax(-1) == labels),
    }
    assert 0 < reference["accuracy"] < 1  # both kinds of answer occur
    for windows in [dict(buckets=[5, 9]), dict(chunk_length=4, buckets=[4, 8, 12]),
                    dict(chunk_length=4)]:  # fmt: skip
        outputs = predict(step, train_state, sequences, batch_size=4, **windows)
        np.testing.assert_allclose(np.stack(outputs), expected, rtol=1e-5, atol=1e-6)
        results = evaluate(step, train_state, sequences, labels, batch_size=4, **windows)
        assert results.keys() == {"loss", "accuracy"}
        np.testing.assert_allclose(results["loss"], reference["loss"], rtol=1e-5)
        # A fraction of the sequences, counted in float32 (1/3 is not exact there).
        np.testing.assert_allclose(results["accuracy"], reference["accuracy"], rtol=1e-6)


def test_per_step_predictions_and_masked_evaluation():
    rng = np.random.default_rng(5)
    lengths = [3, 9, 4, 6]
    sequences = [rng.normal(size=(BANDS, t, FEATURES)).astype(np.float32) for t in lengths]
    targets = [rng.normal(size=(BANDS, t, UNITS)).astype(np.float32) for t in lengths]
    model = BandedLSTM(UNITS)
    params = init_model(model, sequences[0][None], seed=3)["params"]
    train_state = train_state_of(model, params, optax.sgd(0.1))
    step = make_eval_step(masked_mean(squared_error))
    weights = lstm_params(flatten(params))
    expected = [lstm_reference(weights, s[None])[1][0] for s in sequences]
    windows = dict(chunk_length=4, buckets=[4, 8, 12])
    outputs = predict(step, train_state, sequences, batch_size=3, **windows)
    for got, want in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    errors = [((o - t) ** 2).ravel() for o, t in zip(expected, targets, strict=True)]
    errors = np.concatenate(errors)
    results = evaluate(step, train_state, sequences, targets, batch_size=3, buckets=[12])
    np.testing.assert_allclose(results["loss"], errors.mean(), rtol=1e-5)


def test_fit_reports_metrics_and_trains_a_classifier():
    """A tiny separable task (the sign of the mean input picks the class) with
    variable lengths: held-out accuracy and loss in the history, and learning."""
    rng = np.random.default_rng(6)
    lengths = rng.integers(3, 12, 48)
    labels = rng.integers(0, 2, 48)
    sequences = [
        (rng.normal(size=(BANDS, t, FEATURES)) + (2 * c - 1)).astype(np.float32)
        for t, c in zip(lengths, labels, strict=True)
    ]
    model = Classifier(8, 2)
    params = init_model(model, sequences[0][None], seed=4)["params"]
    loss_fn = masked_mean(optax.softmax_cross_entropy_with_integer_labels)
    stream = ChunkStream(sequences[:32], labels[:32], batch_size=8, targets_per="sequence",
                         buckets=[6, 12])  # fmt: skip
    result = fit(
        make_train_step(loss_fn, targets_per="sequence"),
        train_state_of(model, params, optax.adam(0.05)), stream, num_steps=40,
        rng=jax.random.key(0), progress=False, eval_data=(sequences[32:], labels[32:]),
        eval_every=20, metrics={"accuracy": accuracy},
    )  # fmt: skip
    history = result.history
    np.testing.assert_array_equal(history["eval_step"], [20, 40])
    assert history.keys() >= {"eval_loss", "eval_accuracy", "loss", "grad_norm"}
    before = evaluate(
        make_eval_step(loss_fn, targets_per="sequence", metrics={"accuracy": accuracy}),
        train_state_of(model, params), sequences[32:], labels[32:], batch_size=8,
        buckets=[6, 12],
    )  # fmt: skip
    assert history["eval_accuracy"][-1] >= 0.9 and history["eval_loss"][-1] < before["loss"] / 5


# -- what the step refuses, before anything runs ---------------------------------------------


def test_errors_name_the_mismatch():
    x = random_inputs(0, (4, BANDS, 6, FEATURES))
    lengths = np.array([6, 2, 3, 1], np.int32)
    lstm = BandedLSTM(UNITS)
    lstm_state = train_state_of(lstm, init_model(lstm, x)["params"])
    classifier = Classifier(UNITS, 9)
    classifier_state = train_state_of(classifier, init_model(classifier, x)["params"])
    y = random_inputs(1, (4, BANDS, 6, UNITS))
    plain = make_train_step(lambda o, t: jnp.mean((o - t) ** 2))
    with pytest.raises(TypeError, match=r"loss_fn: the batch has seq_lengths.*masked_mean"):
        plain(lstm_state, None, x, y, seq_lengths=lengths)
    with pytest.raises(
        ValueError,
        match=r"outputs: with targets per step.*\(4, 2, 6, \.\.\.\); "
        r"received \(4, 9\).*targets_per='sequence'",
    ):
        plain(classifier_state, None, x, np.zeros(4, np.int32))
    per_sequence = make_train_step(
        masked_mean(optax.softmax_cross_entropy_with_integer_labels), targets_per="sequence"
    )
    with pytest.raises(
        ValueError,
        match=r"targets: expected shape \[batch, \.\.\.\] = \(4, "
        r"\.\.\.\).*received \(3,\)",
    ):
        per_sequence(classifier_state, None, x, np.zeros(3, np.int32))
    with pytest.raises(
        ValueError,
        match=r"targets: expected shape \[batch, \.\.\.\].*the "
        r"outputs' shape \(4, 9\) when of their rank",
    ):
        per_sequence(classifier_state, None, x, np.zeros((4, 5), np.int32))
    with pytest.raises(
        ValueError,
        match=r"loss_fn: failed on the model's outputs \(4, 9\) "
        r"float32 and the targets \(4, 2, 3\) int32: ",
    ):
        per_sequence(classifier_state, None, x, np.zeros((4, 2, 3), np.int32))
    with pytest.raises(ValueError, match=r"ends: marks the windows.*targets_per='sequence'"):
        make_train_step(masked_mean(squared_error))(lstm_state, None, x, y, ends=np.ones(4, bool))
    with pytest.raises(ValueError, match=r"ends: expected bools \[batch\] = \(4,\)"):
        per_sequence(classifier_state, None, x, np.zeros(4, np.int32), ends=np.ones(3, bool))
    with pytest.raises(TypeError, match=r"seq_lengths: the model's apply_fn does not take"):
        model = WithHead(UNITS)
        state = train_state_of(model, init_model(model, x)["params"])
        make_train_step(masked_mean(squared_error))(state, None, x, y[..., :1], seq_lengths=lengths)
    with pytest.raises(ValueError, match=r"seq_lengths: expected shape \[batch\] = \(4,\)"):
        make_train_step(masked_mean(squared_error))(lstm_state, None, x, y, seq_lengths=lengths[:3])
    stream = ChunkStream(list(x), list(y), batch_size=2, chunk_length=3)
    with pytest.raises(ValueError, match=r"stream: deals targets per step, but train_step"):
        fit(per_sequence, classifier_state, stream, num_steps=1, rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"buckets: expected increasing lengths.*\(4, 3\)"):
        ChunkStream(list(x), list(y), batch_size=2, buckets=[4, 3])
    with pytest.raises(ValueError, match=r"buckets: expected.*longest sequence \(6\)"):
        ChunkStream(list(x), list(y), batch_size=2, buckets=[4])
    with pytest.raises(ValueError, match=r"buckets: pads whole sequences"):
        ChunkStream(list(x), list(y), batch_size=2, chunk_length=3, buckets=[6])


def test_padding_never_counts_whatever_it_holds():
    """NaN past the lengths in the inputs and targets, unsigned lengths, lists:
    the same loss, gradient and carried state as zero padding with int32
    lengths, and the state after each sequence's own last step (reference)."""
    sequences = [random_inputs(i, (BANDS, t, FEATURES)) for i, t in enumerate(LENGTHS)]
    targets = [random_inputs(10 + i, (BANDS, t, UNITS)) for i, t in enumerate(LENGTHS)]
    x, y = padded(sequences, 7), padded(targets, 7)
    x_nan, y_nan = x.copy(), y.copy()
    for row, t in enumerate(LENGTHS):
        x_nan[row, :, t:] = np.nan
        y_nan[row, :, t:] = np.nan
    model = BandedLSTM(UNITS)
    params = init_model(model, x[:1])["params"]
    step = make_train_step(masked_mean(squared_error), chunk_length=3, truncate=False)
    runs = {}
    for name, lengths, xs, ys in [
        ("int32", np.array(LENGTHS, np.int32), x, y),
        ("uint32", np.array(LENGTHS, np.uint32), x, y),
        ("list", LENGTHS, x, y),
        ("nan", np.array(LENGTHS, np.int32), x_nan, y_nan),
    ]:
        train_state, final, metrics = step(
            train_state_of(model, params), None, xs, ys, seq_lengths=lengths
        )
        runs[name] = jax.device_get((train_state.opt_state, final, metrics))
    for name in ("uint32", "list", "nan"):
        for got, want in zip(jax.tree.leaves(runs[name]), jax.tree.leaves(runs["int32"]),
                             strict=True):  # fmt: skip
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)
    weights = lstm_params(flatten(params))
    for row, s in enumerate(sequences):
        ((hidden, _),) = lstm_reference(weights, s[None])[0]
        np.testing.assert_allclose(runs["uint32"][1][0].hidden[row], hidden[0], atol=1e-6)


def test_values_and_combinations_refused_on_every_call():
    x = random_inputs(0, (2, BANDS, 5, FEATURES))
    y = random_inputs(1, (2, BANDS, 5, UNITS))
    model = BandedLSTM(UNITS)
    params = init_model(model, x)["params"]
    step = make_train_step(masked_mean(squared_error))
    train_state, _, _ = step(train_state_of(model, params), None, x, y, seq_lengths=[5, 3])
    with pytest.raises(ValueError, match=r"seq_lengths: expected lengths >= 0"):
        step(train_state, None, x, y, seq_lengths=np.array([-1, 3]))  # a signature seen before
    with pytest.raises(TypeError, match=r"seq_lengths: expected an integer dtype"):
        step(train_state, None, x, y, seq_lengths=np.array([5.0, 3.0]))
    with pytest.raises(ValueError, match=r"chunk_length: .*targets_per='sequence'"):
        make_train_step(masked_mean(squared_error), chunk_length=4, targets_per="sequence")
    with pytest.raises(TypeError, match=r"metrics: .*received 'step'"):
        make_eval_step(masked_mean(squared_error), metrics={"step": accuracy})
    stream = ChunkStream(list(x), list(y), batch_size=2, chunk_length=5)
    with pytest.raises(ValueError, match=r"metrics: are evaluated on eval_data"):
        fit(step, train_state, stream, num_steps=1, rng=jax.random.key(0),
            metrics={"accuracy": accuracy})  # fmt: skip
    with pytest.raises(TypeError, match=r"buckets: expected a sequence of lengths"):
        ChunkStream(list(x), list(y), batch_size=2, buckets=8)
