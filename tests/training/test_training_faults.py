"""Faults of training injected for real: bad inputs and empty batches refused
before anything is donated, NaN in training batches (a window that changes
nothing, fit stopping or skipping), and no device buffer kept per step. Every
result is checked against a clean run or against what was there before the fault."""

import time

import jax
import numpy as np
import optax
import pytest

from banded_rnn import BandedLSTM
from banded_rnn.training import (
    Checkpointer,
    ChunkStream,
    NonFiniteError,
    TrainStep,
    fit,
    make_eval_step,
    make_train_step,
)

from helpers import (
    ADAM,
    bad_inputs,
    init_model,
    leaves_equal,
    mse,
    new_train_state,
    random_inputs,
    random_variables,
    rss_bytes,
)

BATCH, BANDS, FEATURES, UNITS = 2, 3, 2, 4
MODEL = BandedLSTM(UNITS)
X = random_inputs(1, (BATCH, BANDS, 7, FEATURES))
VARIABLES = init_model(MODEL, X)
RNG = jax.random.key(7)


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, error, message", bad_inputs(X)[:5])
def test_bad_inputs_are_named_by_the_train_step_and_nothing_is_donated(bad, error, message):
    train_state = new_train_state(MODEL, VARIABLES, ADAM)
    with pytest.raises(error, match=f"^inputs: {message}"):
        make_train_step(mse)(train_state, None, bad, np.zeros((BATCH, BANDS, 7, UNITS)))
    leaves_equal(train_state.params, VARIABLES["params"])  # still alive, unchanged


@pytest.mark.parametrize("time_steps, batch", [(0, BATCH), (7, 0)], ids=["no-time", "no-batch"])
def test_empty_training_batches_are_refused_before_anything_runs(time_steps, batch):
    """They used to give a NaN loss and advance the step count."""
    train_state = new_train_state(MODEL, VARIABLES, ADAM)
    x = np.zeros((batch, BANDS, time_steps, FEATURES), np.float32)
    y = np.zeros((batch, BANDS, time_steps, UNITS), np.float32)
    with pytest.raises(ValueError, match=r"inputs: expected at least one sequence, band and time"):
        make_train_step(mse)(train_state, None, x, y)
    assert int(train_state.step) == 0
    leaves_equal(train_state.params, VARIABLES["params"])


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_missing_targets_are_named_and_nothing_is_donated(kind):
    """``None`` targets would otherwise reach the loss inside the trace."""
    train_state = new_train_state(MODEL, VARIABLES, ADAM)
    step = make_train_step(mse) if kind == "train" else make_eval_step(mse)
    with pytest.raises(ValueError, match=r"^targets: the (training|evaluation) step needs"):
        step(train_state, None, X, None)
    assert int(train_state.step) == 0
    leaves_equal(train_state.params, VARIABLES["params"])


# -- NaN batches in training ------------------------------------------------------------------

CHUNK = 4
LENGTHS = [8, 12, 8, 4, 8]
SEQUENCES = [random_inputs(30 + i, (BANDS, t, FEATURES)) for i, t in enumerate(LENGTHS)]
TARGETS = [random_inputs(40 + i, (BANDS, t, UNITS)) for i, t in enumerate(LENGTHS)]
POISONED, POISONED_CHUNK = 1, 2  # a NaN in inputs[1], steps 8 to 11


def training_stream(poisoned):
    inputs = [x.copy() for x in SEQUENCES]
    if poisoned:
        inputs[POISONED][1, POISONED_CHUNK * CHUNK + 1, 0] = np.nan
    return ChunkStream(inputs, TARGETS, batch_size=2, chunk_length=CHUNK, seed=3)


def poisoned_steps(num_steps):
    """The steps whose batch holds the NaN, and the entry that plays it, found
    by playing the clean stream."""
    stream, found = training_stream(poisoned=False), []
    for step in range(1, num_steps + 1):
        chunk = next(stream)
        for entry in range(2):
            index = stream._sequence_index(int(chunk.sequence[entry]))
            if index == POISONED and stream.position()["entry_chunk"][entry] == POISONED_CHUNK + 1:
                found.append((step, entry))
    return found


def test_a_nan_window_changes_nothing_but_the_step_count():
    step_fn = make_train_step(mse)
    state = MODEL.initial_state(BATCH, BANDS)
    x = X.copy()
    y = np.zeros((BATCH, BANDS, 7, UNITS), np.float32)
    x[0, 1, 3, 1] = np.nan
    train_state, returned, metrics = step_fn(new_train_state(MODEL, VARIABLES, ADAM), state, x, y)
    assert np.isnan(metrics["loss"]) and int(train_state.step) == 1
    leaves_equal(train_state.params, VARIABLES["params"])
    leaves_equal(returned, state)
    # The next, finite window updates exactly as it would have without the NaN one.
    clean = step_fn(new_train_state(MODEL, VARIABLES, ADAM), state, X, y)[0]
    after = step_fn(train_state, returned, X, y)[0]
    leaves_equal(after.params, clean.params)
    assert np.isfinite(jax.tree.leaves(after.params)[0]).all()


def test_fit_stops_at_a_nan_batch_keeping_the_last_good_state_and_checkpoints(tmp_path):
    bad_step, entry = poisoned_steps(20)[0]
    assert bad_step > 3
    clean = fit(make_train_step(mse), new_train_state(MODEL, VARIABLES, ADAM),
                training_stream(poisoned=False), num_steps=bad_step - 1, rng=RNG,
                progress=False)  # fmt: skip
    with Checkpointer(tmp_path / "run", max_to_keep=2) as checkpointer:
        with pytest.raises(NonFiniteError) as caught:
            fit(make_train_step(mse), new_train_state(MODEL, VARIABLES, ADAM),
                training_stream(poisoned=True), num_steps=100, rng=RNG, progress=False,
                checkpointer=checkpointer, checkpoint_every=2)  # fmt: skip
        error = caught.value
        assert f"fit: step {bad_step} has loss nan" in str(error)
        assert f"non-finite inputs or targets in batch entries [{entry}]" in str(error)
        assert f"inputs[{POISONED}] chunk {POISONED_CHUNK}" in str(error)
        assert error.step == bad_step and error.sequences[entry] == POISONED
        assert int(error.train_state.step) == bad_step - 1
        leaves_equal(error.train_state.params, clean.train_state.params)
        leaves_equal(error.state, clean.state)
        last_saved = (bad_step - 1) // 2 * 2
        assert checkpointer.latest_step() == last_saved
        restored = checkpointer.restore(
            new_train_state(MODEL, VARIABLES, ADAM),
            MODEL.initial_state(2, BANDS),
            RNG,
            training_stream(poisoned=False).position(),
        )
        assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(restored.train_state))


def test_fit_can_skip_nan_batches_and_go_on():
    num_steps = 12
    bad_steps = [step for step, _ in poisoned_steps(num_steps)]
    assert len(bad_steps) == 2  # the poisoned sequence is played twice
    skipped = ", ".join(map(str, bad_steps))
    with pytest.warns(UserWarning, match=rf"fit: skipped 2 window\(s\).*at steps \[{skipped}\]"):
        result = fit(make_train_step(mse), new_train_state(MODEL, VARIABLES, ADAM),
                     training_stream(poisoned=True), num_steps=num_steps, rng=RNG,
                     progress=False, on_nonfinite="skip", log_every=3)  # fmt: skip
    clean = fit(make_train_step(mse), new_train_state(MODEL, VARIABLES, ADAM),
                training_stream(poisoned=False), num_steps=num_steps, rng=RNG,
                progress=False)  # fmt: skip
    np.testing.assert_array_equal(result.history["skipped_step"], bad_steps)
    np.testing.assert_array_equal(result.history["step"], np.arange(1, num_steps + 1))
    before = slice(0, bad_steps[0] - 1)
    np.testing.assert_array_equal(result.history["loss"][before], clean.history["loss"][before])
    bad = np.isin(result.history["step"], bad_steps)
    assert np.isnan(result.history["loss"][bad]).all()
    assert np.isfinite(result.history["loss"][~bad]).all()
    assert int(result.train_state.step) == num_steps
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(result.train_state))


class CountingStep(TrainStep):
    """A training step that counts the live device arrays at every call."""

    live: list[int]

    def __call__(self, *args):
        self.live.append(len(jax.live_arrays()))
        return super().__call__(*args)


def test_fit_keeps_no_device_buffer_per_step():
    """History goes to the host: the live device arrays do not grow with the
    steps while fit runs (one device scalar kept per step would add 120)."""
    step = CountingStep(mse, truncate=True, chunk_length=None, mesh=None)
    step.live = []
    fit(step, new_train_state(MODEL, VARIABLES, optax.sgd(0.01)),
        training_stream(poisoned=False), num_steps=70, rng=RNG, progress=False)  # fmt: skip
    assert step.live[69] == step.live[9], step.live[9::10]


@pytest.mark.slow
def test_soak_fit_20000_steps_memory_flat():
    train_state = new_train_state(MODEL, random_variables(MODEL, FEATURES, 9), optax.sgd(0.01))
    stream, rss = training_stream(poisoned=False), {}
    step_fn = make_train_step(mse)
    begin = time.perf_counter()
    for num_steps in (2_000, 20_000):
        result = fit(step_fn, train_state, stream, num_steps=num_steps, rng=RNG, progress=False)
        train_state = result.train_state
        rss[num_steps] = rss_bytes()
    elapsed = time.perf_counter() - begin
    growth = rss[20_000] - rss[2_000]
    print(
        f"\nfit soak: 20000 steps in {elapsed:.1f} s; RSS {rss[2_000] / 2**20:.1f} MiB at step "
        f"2000, {rss[20_000] / 2**20:.1f} MiB at step 20000 (growth {growth / 2**20:+.2f} MiB, "
        f"{growth / 18_000:.0f} bytes per step)"
    )
    assert growth < 8 * 2**20
