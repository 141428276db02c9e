"""SequenceBatcher: every sequence's outputs equal it run alone through Stream,
whatever the others do, under random arrivals from threads and asyncio tasks."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import jax
import numpy as np
import pytest

from banded_rnn import BandedLSTM
from banded_rnn.serving import BatcherFullError, SequenceBatcher

from helpers import SubbandMask, TwoInSeries, init_model, random_inputs
from reference import lstm_reference, params_from_variables
from served_model import (
    BANDS,
    FEATURES,
    MODEL,
    UNITS,
    VARIABLES,
    alone,
    assert_same,
    frames_of,
    run_threads,
)

SLOTS = 4


def assert_matches_reference(outputs, frames) -> None:
    """Outputs ``[count, bands, time, units]`` of ``frames`` against the float64 loop."""
    whole = np.concatenate(list(frames), axis=1)[None]  # [1, bands, count * time, features]
    _, expected = lstm_reference(params_from_variables(VARIABLES), whole)
    received = np.concatenate(list(outputs), axis=1)
    np.testing.assert_allclose(received, expected[0], atol=2e-5)


def assert_counts_kept(batcher) -> None:
    """The table's running counts of ready and idle sequences, which decide
    when a frame wakes the scheduler, equal those counted afresh."""
    with batcher._cond:
        table = batcher._table
        assert (table.ready_count, table.idle_count) == table.counts()


@pytest.fixture(scope="module")
def batcher():
    with SequenceBatcher(MODEL, VARIABLES, SLOTS, BANDS, max_delay=0.001) as batcher:
        batcher.warmup()
        yield batcher


def test_random_arrivals_starts_and_ends_from_threads_equal_each_sequence_alone(batcher):
    sequences = {f"s{n}": frames_of(n, 6 + 3 * (n % 3)) for n in range(10)}
    slots = threading.Semaphore(SLOTS)  # at most SLOTS live at once
    results = {}

    def client(name: str) -> None:
        rng = np.random.default_rng(int(name[1:]))
        with slots:
            batcher.start(name)
            futures = []
            for frame in sequences[name]:
                futures.append(batcher.submit(name, frame))
                assert_counts_kept(batcher)
                if rng.random() < 0.5:  # some frames queue behind others, some wait
                    time.sleep(float(rng.uniform(0, 0.004)))
            results[name] = (np.stack([f.result(30) for f in futures]), batcher.state(name))
            batcher.end(name)

    run_threads(client, sequences)
    assert_counts_kept(batcher)
    for name, frames in sequences.items():
        outputs, state = results[name]
        assert_same((outputs, state), alone(frames))
        assert_matches_reference(outputs, frames)
    assert batcher.sequences == ()


def test_asyncio_tasks_with_random_arrivals_equal_each_sequence_alone(batcher):
    sequences = {n: frames_of(20 + n, 5 + n) for n in range(SLOTS)}

    async def client(n: int) -> np.ndarray:
        rng = np.random.default_rng(n)
        await asyncio.sleep(float(rng.uniform(0, 0.01)))
        batcher.start(n)
        outputs = []
        for frame in sequences[n]:
            outputs.append(await batcher.submit_async(n, frame))
            await asyncio.sleep(float(rng.uniform(0, 0.003)))
        batcher.end(n)
        return np.stack(outputs)

    async def main():
        return await asyncio.gather(*(client(n) for n in sequences))

    for n, outputs in enumerate(asyncio.run(main())):
        assert_same(outputs, alone(sequences[n])[0])


def test_a_slot_without_frames_keeps_its_state_bit_for_bit(batcher):
    quiet, busy = frames_of(30, 3), frames_of(31, 12)
    batcher.start("quiet")
    batcher.start("busy")
    for frame in quiet:
        batcher.submit("quiet", frame).result(30)
    before = batcher.state("quiet")
    for frame in busy:  # ticks of one frame, with "quiet" live and idle
        batcher.submit("busy", frame).result(30)
    jax.tree.map(np.testing.assert_array_equal, batcher.state("quiet"), before)
    assert_same(before, alone(quiet)[1])
    last = batcher.submit("quiet", frames_of(32, 1)[0]).result(30)
    assert_same(last, alone(np.concatenate([quiet, frames_of(32, 1)]))[0][-1])
    batcher.end("quiet")
    batcher.end("busy")


def test_a_reused_slot_starts_from_zeros(batcher):
    names = [f"full{n}" for n in range(SLOTS)]
    for name in names:
        batcher.start(name)
        batcher.submit(name, frames_of(40, 1)[0]).result(30)
    batcher.end(names[1])
    batcher.start("next")  # takes the slot names[1] left, with its state
    zeros = jax.tree.map(np.zeros_like, batcher.state(names[0]))
    jax.tree.map(np.testing.assert_array_equal, batcher.state("next"), zeros)  # not names[1]'s
    frames = frames_of(41, 4)
    outputs = np.stack([batcher.submit("next", frame).result(30) for frame in frames])
    assert_same(outputs, alone(frames)[0])
    assert_matches_reference(outputs, frames)
    for name in ["next", *names[:1], *names[2:]]:
        batcher.end(name)


def test_frames_submitted_before_the_first_ran_run_in_order():
    with SequenceBatcher(MODEL, VARIABLES, 2, BANDS, max_delay=30.0) as batcher:
        batcher.start("a")
        batcher.start("b")  # live, and sends later: "a"'s frames wait for it
        frames = frames_of(50, 5)
        futures = [batcher.submit("a", frame) for frame in frames]
        time.sleep(0.05)
        assert not any(future.done() for future in futures)
        for frame in frames_of(51, 5):  # five ticks, one frame of each sequence in each
            batcher.submit("b", frame)
        outputs = np.stack([future.result(30) for future in futures])
    assert_same(outputs, alone(frames)[0])


def test_every_batch_size_compiles_once_in_warmup_and_never_after():
    frame_length = 3
    model = BandedLSTM(7, num_layers=1)  # its own model: no other test compiled its shapes
    variables = init_model(model, random_inputs(1, (1, BANDS, 2, FEATURES)))
    with SequenceBatcher(model, variables, 5, BANDS, frame_length, batch_sizes=[2, 5]) as batcher:
        built = batcher.compile_count
        batcher.warmup()
        assert batcher.compile_count - built == 2
        warm = batcher.compile_count
        names = list(range(5))
        for name in names:
            batcher.start(name)
        rng = np.random.default_rng(2)
        for tick in range(12):
            chosen = [n for n in names if rng.random() < 0.6] or [0]
            futures = [batcher.submit(n, frames_of(tick, 1, frame_length)[0]) for n in chosen]
            for future in futures:
                assert future.result(30).shape == (BANDS, frame_length, 7)
        assert batcher.compile_count == warm


@pytest.mark.parametrize("largest", [1, 2])
def test_ticks_smaller_than_the_slots_run_every_frame_in_order(largest):
    sequences = {n: frames_of(110 + n, 5) for n in range(SLOTS)}
    with SequenceBatcher(MODEL, VARIABLES, SLOTS, BANDS, batch_sizes=[largest]) as small:
        for n in sequences:
            small.start(n)
        futures = {n: [small.submit(n, f) for f in frames] for n, frames in sequences.items()}
        for n, frames in sequences.items():
            assert_same(np.stack([f.result(30) for f in futures[n]]), alone(frames)[0])


@pytest.mark.parametrize(
    "model", [SubbandMask(hidden=6, units=5), TwoInSeries()], ids=["dense-around", "dict-state"]
)
def test_models_with_layers_around_the_lstm_match_streaming_alone(model):
    variables = init_model(model, random_inputs(2, (1, BANDS, 2, FEATURES)), seed=3)
    sequences = {n: frames_of(60 + n, 6, frame_length=2) for n in range(2)}
    with SequenceBatcher(
        model, variables, 2, BANDS, 2, features=FEATURES, batch_sizes=[2]
    ) as batcher:
        for n in sequences:
            batcher.start(n)
        futures = {n: [batcher.submit(n, f) for f in frames] for n, frames in sequences.items()}
        results = {
            n: (np.stack([f.result(30) for f in fs]), batcher.state(n)) for n, fs in futures.items()
        }
    for n, frames in sequences.items():
        # Dense layers run by XLA may round a product differently for another batch size.
        assert_same(results[n], alone(frames, model, variables, FEATURES), exact=False)


def test_cancelling_a_future_before_its_tick_drops_that_frame():
    with SequenceBatcher(MODEL, VARIABLES, 2, BANDS, max_delay=30.0) as batcher:
        batcher.start("a")
        batcher.start("b")
        frames = frames_of(70, 3)
        futures = [batcher.submit("a", frame) for frame in frames]
        assert futures[1].cancel()
        for frame in frames[:2]:  # two ticks, with "a"'s first and third frames
            batcher.submit("b", frame)
        outputs = [futures[0].result(30), futures[2].result(30)]
    assert_same(np.stack(outputs), alone(frames[[0, 2]])[0])


def test_an_idle_sequence_is_freed_after_max_idle():
    with SequenceBatcher(MODEL, VARIABLES, 1, BANDS, max_idle=0.2) as batcher:
        batcher.warmup()
        batcher.start("idle")
        deadline = time.monotonic() + 10
        while batcher.sequences and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.sequences == ()
        with pytest.raises(ValueError, match=r"'idle' is freed after 0.2 s without a frame"):
            batcher.submit("idle", frames_of(80, 1)[0]).result(30)
        batcher.start("next")  # the slot is free again, from zeros
        frames = frames_of(81, 2)
        outputs = np.stack([batcher.submit("next", f).result(30) for f in frames])
    assert_same(outputs, alone(frames)[0])


def test_close_fails_the_frames_not_yet_run_and_refuses_more():
    batcher = SequenceBatcher(MODEL, VARIABLES, 2, BANDS, max_delay=30.0)
    batcher.start("a")
    batcher.start("b")
    waiting = batcher.submit("a", frames_of(90, 1)[0])  # waits for "b", which never sends
    batcher.close()
    with pytest.raises(RuntimeError, match="closed before this frame ran"):
        waiting.result(30)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit("a", frames_of(90, 1)[0]).result(30)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.start("c")
    batcher.close()  # again: nothing


def test_a_sequence_with_max_queued_frames_waiting_is_refused_more_until_they_run():
    with SequenceBatcher(MODEL, VARIABLES, 2, BANDS, max_delay=30.0, max_queued=3) as batcher:
        batcher.start("a")
        batcher.start("b")  # never sends: "a"'s frames wait for max_delay
        frames = frames_of(95, 5)
        queued = [batcher.submit("a", frame) for frame in frames[:3]]
        refused = batcher.submit("a", frames[3])
        with pytest.raises(ValueError, match=r"^frame: 'a' has 3 frames waiting.*max_queued=3"):
            refused.result(30)
        batcher.end("b")  # "a" is now the only one that may send: its ticks run at once
        outputs = [future.result(30) for future in queued]
        outputs.append(batcher.submit("a", frames[4]).result(30))  # taken again
    assert_same(np.stack(outputs), alone(frames[[0, 1, 2, 4]])[0])


def test_ending_with_drop_queued_cancels_the_frames_not_yet_run_and_frees_the_slot():
    with SequenceBatcher(MODEL, VARIABLES, 1, BANDS, max_delay=30.0) as batcher:
        batcher.start("a")
        first = batcher.submit("a", frames_of(96, 1)[0])
        first.result(30)  # the only live sequence: its frame ran at once
        with batcher._cond:  # hold the scheduler so frames stay queued
            waiting = [batcher.submit("a", frame) for frame in frames_of(97, 3)]
            batcher.end("a", drop_queued=True)
        assert all(future.cancelled() for future in waiting)
        assert batcher.sequences == ()
        batcher.start("c")  # the slot is free at once, from zeros
        frames = frames_of(98, 2)
        outputs = np.stack([batcher.submit("c", frame).result(30) for frame in frames])
    assert_same(outputs, alone(frames)[0])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failing_scheduler_closes_the_batcher_and_fails_every_waiting_frame(monkeypatch):
    batcher = SequenceBatcher(MODEL, VARIABLES, 2, BANDS, max_delay=30.0)
    batcher.start("a")
    batcher.start("b")
    waiting = batcher.submit("a", frames_of(99, 1)[0])

    def broken(*args):
        raise OverflowError("a broken clock")

    with batcher._cond:
        monkeypatch.setattr(batcher._table, "ready", broken)
        batcher._cond.notify()
    stopped = r"scheduler stopped on OverflowError.*before this frame"
    with pytest.raises(RuntimeError, match=stopped):
        waiting.result(30)
    with pytest.raises(RuntimeError, match=r"scheduler stopped on OverflowError"):
        batcher.start("c")
    batcher.close()


# Refusals: each named, on its own future or call, and nothing else changes.


class Exploding(BandedLSTM):
    """A BandedLSTM whose outputs overflow to infinity where a frame's features sum above 90."""

    def __call__(self, state, inputs, **kwargs):
        state, outputs = super().__call__(state, inputs, **kwargs)
        return state, outputs * jax.numpy.exp(inputs.sum(axis=-1, keepdims=True))


@pytest.fixture(scope="module")
def strict():
    model = Exploding(UNITS, num_layers=2)
    with SequenceBatcher(model, VARIABLES, 3, BANDS, check_finite=True, max_delay=0.001) as b:
        b.warmup()
        yield b


def _refused(batcher, sequence_id, frame):
    future = batcher.submit(sequence_id, frame)
    return future.exception(30)


@pytest.mark.parametrize(
    "sequence_id, frame, error, message",
    [
        (
            "never",
            frames_of(0, 1)[0],
            ValueError,
            r"sequence_id: expected a started sequence; 'never' is never started",
        ),
        (
            "live",
            frames_of(0, 1)[0][:3],
            ValueError,
            r"frame: expected shape \[bands, time, features\] = \(4, 1, 6\).*\(3, 1, 6\)",
        ),
        (
            "live",
            frames_of(0, 2),
            ValueError,
            r"received shape \(2, 4, 1, 6\); for one sequence, drop the batch axis",
        ),
        (
            "live",
            frames_of(0, 1)[0][..., :5],
            ValueError,
            r"= \(4, 1, 6\).*received shape \(4, 1, 5\)",
        ),
        (
            "live",
            np.ones((BANDS, 1, FEATURES), np.int32),
            TypeError,
            r"frame: expected a floating dtype \(cast to float32\); received int32",
        ),
        ("live", "frame", TypeError, r"frame: expected an array; received str"),
        (
            "live",
            np.full((BANDS, 1, FEATURES), np.nan, np.float32),
            ValueError,
            r"frame: expected finite values .*at \[band, step, feature\] = \[0, 0, 0\]",
        ),
        (
            "live",
            np.full((BANDS, 1, FEATURES), 20.0, np.float32),
            ValueError,
            r"frame: its outputs or the state it leads to hold NaN or infinite values",
        ),
        (["unhashable"], frames_of(0, 1)[0], TypeError, r"sequence_id: expected a hashable id"),
        (None, frames_of(0, 1)[0], TypeError, r"sequence_id: expected a hashable id .*NoneType"),
    ],
    ids=[
        "unknown",
        "bands",
        "batch-axis",
        "features",
        "dtype",
        "not-an-array",
        "nan",
        "overflow",
        "unhashable",
        "none",
    ],
)
def test_a_refused_frame_fails_its_own_future_only(strict, sequence_id, frame, error, message):
    frames = frames_of(100, 4)
    strict.start("live")
    strict.start("other")
    try:
        mine = [strict.submit("live", frames[0]), strict.submit("other", frames[1])]
        refused = _refused(strict, sequence_id, frame)
        assert isinstance(refused, error) and refused.args, refused
        assert re.search(message, str(refused)), str(refused)
        mine += [strict.submit("live", frames[2]), strict.submit("other", frames[3])]
        live = np.stack([mine[0].result(30), mine[2].result(30)])
        other = np.stack([mine[1].result(30), mine[3].result(30)])
    finally:
        strict.end("live")
        strict.end("other")
    # The refused frame left no trace: both run as if it never came.
    model = Exploding(UNITS, num_layers=2)
    assert_same(live, alone(frames[[0, 2]], model)[0])
    assert_same(other, alone(frames[[1, 3]], model)[0])


def test_start_and_end_refusals_name_the_sequence(strict):
    strict.start("x")
    with pytest.raises(ValueError, match=r"sequence_id: 'x' is already started; end it first"):
        strict.start("x")
    strict.start("y")
    strict.start("z")
    with pytest.raises(BatcherFullError, match=r"start\('w'\): every one of the 3 slots holds"):
        strict.start("w")
    for name in "xyz":
        strict.end(name)
    with pytest.raises(ValueError, match=r"'x' is ended"):
        strict.end("x")
    with pytest.raises(TypeError, match=r"sequence_id: expected a hashable id"):
        strict.start({"not": "hashable"})
    assert strict.sequences == ()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_slots": 0}, ValueError, r"num_slots: expected an integer >= 1; received 0"),
        ({"frame_length": 0}, ValueError, r"frame_length: expected an integer >= 1; received 0"),
        (
            {"batch_sizes": [1, 5]},
            ValueError,
            r"batch_sizes: expected one or more sizes, none above num_slots = 4.*\[1, 5\]",
        ),
        (
            {"max_delay": -1},
            ValueError,
            r"max_delay: expected a finite number of seconds >= 0; received -1",
        ),
        ({"max_idle": 0}, ValueError, r"max_idle: expected a number of seconds > 0 \(or None\)"),
        ({"max_idle": float("inf")}, ValueError, r"max_idle: expected a finite number.*inf"),
        ({"max_queued": 0}, ValueError, r"max_queued: expected an integer >= 1; received 0"),
        ({"features": 5}, ValueError, r"features: the variables' kernel is \[6, 4 \* units\]"),
        ({"num_bands": 0}, ValueError, r"num_bands: expected an integer >= 1; received 0"),
        ({"dtype": np.int32}, TypeError, r"dtype: expected a floating dtype; received int32"),
    ],
    ids=[
        "slots",
        "frame-length",
        "batch-sizes",
        "max-delay",
        "max-idle",
        "max-idle-inf",
        "max-queued",
        "features",
        "bands",
        "dtype",
    ],
)
def test_constructor_refusals_name_the_argument(kwargs, error, message):
    arguments = {"num_slots": SLOTS, "num_bands": BANDS, **kwargs}
    with pytest.raises(error, match=message):
        SequenceBatcher(MODEL, VARIABLES, **arguments)


def test_a_model_other_than_a_banded_lstm_needs_its_features():
    with pytest.raises(ValueError, match=r"features: expected the chunks' feature count"):
        SequenceBatcher(TwoInSeries(), VARIABLES, SLOTS, BANDS)
