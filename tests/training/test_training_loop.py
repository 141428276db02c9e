"""The training loop: chunks dealt to batch entries, state carried and reset against the
float64 reference, dropout masks per sequence, exact resume from orbax checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from banded_rnn import BandedLSTM
from banded_rnn.training import (
    Checkpointer,
    ChunkStream,
    evaluate,
    fit,
    gather_to_host,
    make_eval_step,
    make_train_step,
)

from helpers import ADAM, mse, new_train_state, random_inputs, random_variables
from reference import lstm_reference, params_from_variables

BANDS, FEATURES, UNITS, CHUNK = 2, 2, 3, 4
LENGTHS = [8, 4, 12, 8, 16]
INPUTS = [random_inputs(100 + i, (BANDS, t, FEATURES)) for i, t in enumerate(LENGTHS)]
TARGETS = [random_inputs(200 + i, (BANDS, t, UNITS)) for i, t in enumerate(LENGTHS)]
MODEL = BandedLSTM(UNITS)
DROPOUT_MODEL = BandedLSTM(UNITS, dropout=0.3, recurrent_dropout=0.3)
VARIABLES = random_variables(MODEL, FEATURES, seed=3)
FROZEN = optax.sgd(0.0)  # parameters never move: every loss is a pure forward pass
STEP = make_train_step(mse)
EVAL_STEP = make_eval_step(mse)
RNG = jax.random.key(7)


def stream(**kwargs):
    return ChunkStream(INPUTS, TARGETS, batch_size=2, chunk_length=CHUNK, seed=1, **kwargs)


def take(num_chunks):
    chunks = stream()
    return [next(chunks) for _ in range(num_chunks)]


def test_stream_deals_every_sequence_in_contiguous_chunks():
    chunks = take(30)
    played = {}  # sequence number -> list of (inputs, targets) chunks
    for chunk in chunks:
        assert chunk.inputs.shape == (2, BANDS, CHUNK, FEATURES)
        assert chunk.targets.shape == (2, BANDS, CHUNK, UNITS)
        for entry in range(2):
            number = int(chunk.sequence[entry])
            assert chunk.reset[entry] == (number not in played)
            played.setdefault(number, []).append((chunk.inputs[entry], chunk.targets[entry]))
    assert sorted(played) == list(range(len(played)))  # numbered in the order started
    finished = []
    for number, pieces in sorted(played.items()):
        x = np.concatenate([p[0] for p in pieces], axis=1)
        y = np.concatenate([p[1] for p in pieces], axis=1)
        matches = [i for i, s in enumerate(INPUTS) if s.shape[1] >= x.shape[1]
                   and np.array_equal(s[:, : x.shape[1]], x)]  # fmt: skip
        assert len(matches) == 1
        index = matches[0]
        np.testing.assert_array_equal(TARGETS[index][:, : y.shape[1]], y)
        if x.shape[1] == LENGTHS[index]:
            finished.append((number, index))
    # every epoch plays every sequence once, in a shuffled order
    epoch = [index for number, index in finished if number < len(LENGTHS)]
    assert sorted(epoch) == list(range(len(LENGTHS)))
    assert epoch != sorted(epoch)


def reference_losses(chunks, carry_state):
    """The loss of every chunk from the float64 reference, carrying each entry's state
    and resetting it where the stream says (or at every chunk)."""
    params = params_from_variables(VARIABLES)
    states = [None] * 2
    losses = []
    for chunk in chunks:
        errors = []
        for entry in range(2):
            if chunk.reset[entry] or not carry_state:
                states[entry] = None
            final, outputs = lstm_reference(params, chunk.inputs[entry : entry + 1], states[entry])
            states[entry] = final
            errors.append((outputs - chunk.targets[entry : entry + 1]) ** 2)
        losses.append(np.mean(errors))
    return np.array(losses)


@pytest.mark.parametrize("carry_state", [True, False])
def test_fit_carries_and_resets_state_like_the_reference(carry_state):
    num_steps = 9
    train_state = new_train_state(MODEL, VARIABLES, FROZEN)
    result = fit(STEP, train_state, stream(), num_steps=num_steps, rng=RNG,
                 carry_state=carry_state, progress=False)  # fmt: skip
    chunks = take(num_steps)
    assert any(c.reset.any() and not c.reset.all() for c in chunks[1:])  # entries reset apart
    np.testing.assert_array_equal(result.history["step"], np.arange(1, num_steps + 1))
    np.testing.assert_allclose(
        result.history["loss"], reference_losses(chunks, carry_state), rtol=1e-5
    )


def test_fit_keeps_one_dropout_mask_per_sequence():
    """With dropout, every chunk's loss equals that of the entry's whole sequence run
    in one piece with the sequence's key: masks do not change from chunk to chunk."""
    num_steps = 8
    variables = random_variables(DROPOUT_MODEL, FEATURES, seed=3)
    train_state = new_train_state(DROPOUT_MODEL, variables, FROZEN)
    result = fit(STEP, train_state, stream(), num_steps=num_steps, rng=RNG, progress=False)
    apply = jax.jit(
        lambda x, key: DROPOUT_MODEL.apply(
            variables, None, x, deterministic=False, rngs={"dropout": key}
        )[1]
    )
    whole, offset, expected = {}, {}, []
    for chunk in take(num_steps):
        errors = []
        for entry in range(2):
            number = int(chunk.sequence[entry])
            if number not in whole:
                index = next(i for i, s in enumerate(INPUTS)
                             if np.array_equal(s[:, :CHUNK], chunk.inputs[entry]))  # fmt: skip
                key = jax.random.fold_in(RNG, number)
                whole[number] = (np.asarray(apply(INPUTS[index][None], key))[0], TARGETS[index])
                offset[number] = 0
            outputs, targets = whole[number]
            window = slice(offset[number], offset[number] + CHUNK)
            errors.append((outputs[:, window] - targets[:, window]) ** 2)
            offset[number] += CHUNK
        expected.append(np.mean(errors))
    assert max(offset.values()) > CHUNK  # some sequences ran over several chunks
    np.testing.assert_allclose(result.history["loss"], expected, rtol=1e-5)


def test_evaluate_matches_the_reference_on_held_out_sequences():
    held_out = slice(0, 4)  # lengths 8, 4, 12, 8: three groups, one of two sequences
    train_state = new_train_state(MODEL, VARIABLES, FROZEN)
    xs, ys = INPUTS[held_out], TARGETS[held_out]
    loss = evaluate(EVAL_STEP, train_state, xs, ys, batch_size=2, chunk_length=CHUNK)["loss"]
    params = params_from_variables(VARIABLES)
    errors = [
        ((lstm_reference(params, x[None])[1][0] - y) ** 2).ravel()
        for x, y in zip(xs, ys, strict=True)
    ]
    np.testing.assert_allclose(loss, np.mean(np.concatenate(errors)), rtol=1e-5)


def test_resume_from_checkpoint_reproduces_the_losses_exactly(tmp_path):
    """Adam, dropout, held-out evaluation: a run interrupted after step 7 and resumed
    from its last checkpoint (step 6) gives the uninterrupted run's losses bit for bit."""
    variables = random_variables(DROPOUT_MODEL, FEATURES, seed=4)
    kwargs = dict(num_steps=12, rng=RNG, progress=False, eval_data=(INPUTS[:2], TARGETS[:2]))
    full = fit(STEP, new_train_state(DROPOUT_MODEL, variables, ADAM), stream(), **kwargs)

    class Interrupted(ChunkStream):
        calls = 0

        def __next__(self):
            self.calls += 1
            if self.calls > 7:
                raise KeyboardInterrupt
            return super().__next__()

    interrupted = Interrupted(INPUTS, TARGETS, batch_size=2, chunk_length=CHUNK, seed=1)
    with Checkpointer(tmp_path / "run") as checkpointer:
        with pytest.raises(KeyboardInterrupt):
            fit(STEP, new_train_state(DROPOUT_MODEL, variables, ADAM), interrupted,
                checkpointer=checkpointer, checkpoint_every=3, **kwargs)  # fmt: skip
        assert checkpointer.all_steps() == [3, 6]
    with Checkpointer(tmp_path / "run") as checkpointer:  # a new process would do the same
        resumed = fit(STEP, new_train_state(DROPOUT_MODEL, variables, ADAM), stream(),
                      checkpointer=checkpointer, checkpoint_every=3, **kwargs)  # fmt: skip
        assert checkpointer.latest_step() == 12
    np.testing.assert_array_equal(resumed.history["step"], np.arange(7, 13))
    np.testing.assert_array_equal(resumed.history["loss"], full.history["loss"][6:])
    np.testing.assert_array_equal(resumed.history["eval_loss"], full.history["eval_loss"])
    for a, b in zip(jax.tree.leaves(resumed.train_state), jax.tree.leaves(full.train_state),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(full.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert full.history["loss"][-1] < full.history["loss"][0]  # it did train
    # Resuming the finished run again trains nothing, and says so.
    with Checkpointer(tmp_path / "run") as checkpointer, pytest.warns(
        UserWarning, match=r"fit: train_state is already at step 12 \(resumed from .*run\), "
        r"and num_steps=12: nothing to train"
    ):  # fmt: skip
        again = fit(STEP, new_train_state(DROPOUT_MODEL, variables, ADAM), stream(),
                    checkpointer=checkpointer, **kwargs)  # fmt: skip
    assert again.history["step"].size == 0


def test_checkpointer_round_trip_and_missing(tmp_path):
    train_state = new_train_state(MODEL, VARIABLES, ADAM)
    state = MODEL.initial_state(2, BANDS)
    with Checkpointer(tmp_path / "empty") as checkpointer:
        assert checkpointer.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            checkpointer.restore(train_state, state, RNG)
        trained, state, _ = STEP(train_state, state, INPUTS[0][None].repeat(2, 0)[:, :, :CHUNK],
                                 TARGETS[0][None].repeat(2, 0)[:, :, :CHUNK])  # fmt: skip
        assert checkpointer.save(trained, state, jax.random.key(5)) == 1
        template = new_train_state(MODEL, VARIABLES, ADAM)
        restored = checkpointer.restore(template, MODEL.initial_state(2, BANDS), RNG)
    assert int(restored.train_state.step) == 1
    assert restored.train_state.apply_fn == MODEL.apply
    np.testing.assert_array_equal(jax.random.key_data(restored.rng),
                                  jax.random.key_data(jax.random.key(5)))  # fmt: skip
    for a, b in zip(jax.tree.leaves((restored.train_state, restored.state)),
                    jax.tree.leaves((trained, state)), strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_progress_bar(capsys):
    result = fit(STEP, new_train_state(MODEL, VARIABLES, FROZEN), stream(), num_steps=3, rng=RNG,
                 progress=True, log_every=1)  # fmt: skip
    out = capsys.readouterr().out
    losses = [f"{loss:.4g}" for loss in result.history["loss"]]  # as the loop formats them
    assert len(set(losses)) == 3, losses  # so the bar's figure tells which step it is from
    assert list(result.history["step"]) == [1, 2, 3] and int(result.train_state.step) == 3
    last = out.rstrip().splitlines()[-1].split()  # the bar as it was left: the last step's
    assert last[0] == "training" and "3/3" in last, out
    assert last[-2:] == ["loss", losses[-1]], out


@pytest.mark.parametrize(
    "inputs, targets, message",
    [
        ([np.zeros((2, 0, 2), np.float32)], [np.zeros((2, 0, 3), np.float32)],
         r"inputs\[0\]: expected at least one time step; received none"),
        (INPUTS[:2], TARGETS[:1], r"targets: expected 2 sequences"),
        (INPUTS[:2], [TARGETS[0], TARGETS[1][:1]],
         r"targets\[1\]: expected \[bands, time, \.\.\.\]"),
        ([INPUTS[0], INPUTS[1][:1]], TARGETS[:2],
         r"inputs\[1\]: expected \[bands, time, features\]"),
        ([np.zeros((8, 2), np.float32)], [np.zeros((8, 2), np.float32)],
         r"inputs\[0\]: expected a sequence \[bands, time, features\]; received shape \(8, 2\)"),
    ],
    ids=["length", "count", "target_shape", "bands", "rank"],
)  # fmt: skip
def test_stream_rejects_bad_sequences(inputs, targets, message):
    with pytest.raises(ValueError, match=message):
        ChunkStream(inputs, targets, batch_size=2, chunk_length=CHUNK)


def test_fit_without_dropout_passes_no_keys():
    """A model without dropout needs no rng: the step is called with rng=None and
    runs the batch in one piece (no per-entry vmap)."""
    calls = []

    class Spy(type(STEP)):
        def __init__(self):
            super().__init__(mse, truncate=True, chunk_length=None, mesh=None)

        def __call__(self, train_state, state, inputs, targets, rng):
            calls.append(rng)
            return STEP(train_state, state, inputs, targets, rng)

    train_state = new_train_state(MODEL, VARIABLES, FROZEN)
    fit(Spy(), train_state, stream(), num_steps=2, rng=RNG, progress=False)
    assert calls == [None, None]
    variables = random_variables(DROPOUT_MODEL, FEATURES, seed=3)
    calls.clear()
    fit(Spy(), new_train_state(DROPOUT_MODEL, variables, FROZEN), stream(), num_steps=1,
        rng=RNG, progress=False)  # fmt: skip
    assert calls[0].shape == (2,) and jnp.issubdtype(calls[0].dtype, jax.dtypes.prng_key)


def test_fit_refuses_a_stream_dealing_part_of_the_batch_without_a_mesh_across_processes():
    part = ChunkStream(INPUTS, TARGETS, batch_size=2, chunk_length=CHUNK, process_index=1,
                       process_count=2)  # fmt: skip
    assert part.rows == slice(1, 2) and next(part).inputs.shape[0] == 1
    with pytest.raises(ValueError, match=r"stream: deals this process the batch rows \[1, 2\)"):
        fit(STEP, new_train_state(MODEL, VARIABLES, FROZEN), part, num_steps=1, rng=RNG,
            progress=False)  # fmt: skip


def test_gather_to_host_keeps_keys_and_other_leaves():
    tree = {"key": jax.random.key(3), "x": jnp.arange(3.0), "n": 4, "none": None}
    host = gather_to_host(tree)
    assert isinstance(host["x"], np.ndarray) and host["n"] == 4 and host["none"] is None
    assert jax.random.key_data(host["key"]).tolist() == jax.random.key_data(tree["key"]).tolist()
