"""Faults of streaming injected for real: bad chunks, NaN and infinity in chunks,
states and state files, damaged and killed state files, and two threads on one
stream. Every result is checked against the float64 NumPy reference or against
what was there before the fault."""

import pickle
import signal
import subprocess
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from banded_rnn import BandedLSTM, Stream

from helpers import (
    ROOT,
    bad_inputs,
    init_model,
    leaves_equal,
    random_inputs,
    script_command,
    script_env,
)
from reference import lstm_reference, params_from_variables

BATCH, BANDS, FEATURES, UNITS = 2, 3, 2, 4
MODEL = BandedLSTM(UNITS)
X = random_inputs(1, (BATCH, BANDS, 7, FEATURES))
VARIABLES = init_model(MODEL, X)
PARAMS = params_from_variables(VARIABLES)
SCRIPTS = Path(__file__).parent / "scripts"


# -- bad chunks -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad, error, message", bad_inputs(X))
def test_bad_chunks_are_named_by_stream_and_leave_its_state(bad, error, message):
    stream = Stream(MODEL, VARIABLES, BATCH, BANDS)
    stream(X[:, :, :2])
    before = stream.state
    with pytest.raises(error, match=f"^chunk: {message}"):
        stream(bad)
    leaves_equal(stream.state, before)


# -- NaN and infinity in streams and state files ------------------------------------------------


def infinite_variables():
    """Infinite input weights of both signs: finite chunks give a NaN state."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p * np.float32(np.inf) if path[-1].key == "kernel" else p, VARIABLES
    )


def test_check_finite_refuses_a_nan_chunk_without_touching_the_state():
    stream = Stream(MODEL, VARIABLES, BATCH, BANDS, max_chunk=4, check_finite=True)
    stream.warmup()
    compiled = stream.compile_count
    stream(X[:, :, :3])
    stream.reset(batch=[1])  # pending: must survive the refused call
    bad = X[:, :, 3:].copy()
    bad[1, 2, 2, 0] = np.inf
    with pytest.raises(
        ValueError, match=r"^chunk: expected finite values.*\[sequence, band, step\] = \[1, 2, 2\]"
    ):
        stream(bad)
    outputs = stream(X[:, :, 3:])
    # The reference: sequence 0 whole; sequence 1 restarted at step 3.
    _, expected = lstm_reference(PARAMS, X)
    np.testing.assert_allclose(outputs[0], expected[0, :, 3:], atol=2e-5)
    _, restarted = lstm_reference(PARAMS, X[1:, :, 3:])
    np.testing.assert_allclose(outputs[1], restarted[0], atol=2e-5)
    assert stream.compile_count == compiled


def test_check_finite_refuses_a_chunk_whose_state_would_not_be_finite():
    stream = Stream(MODEL, infinite_variables(), BATCH, BANDS, max_chunk=4, check_finite=True)
    stream.warmup()
    before = stream.state
    with pytest.raises(ValueError, match=r"^chunk: the state it leads to holds NaN"):
        stream(X[:, :, :5])  # two pieces, 4 and 1: neither is kept
    leaves_equal(stream.state, before)


def test_an_interrupt_between_pieces_keeps_a_usable_state():
    """The first piece donated the state: the stream keeps the one it returned."""
    stream = Stream(MODEL, VARIABLES, BATCH, BANDS, max_chunk=4)
    real, calls = stream._compiled_step, []

    def interrupted_on_the_second_piece(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    stream._compiled_step = interrupted_on_the_second_piece
    with pytest.raises(KeyboardInterrupt):
        stream(X[:, :, :5])  # pieces of 4 and 1 steps
    stream._compiled_step = real
    outputs = stream(X[:, :, 4:])  # the first piece's 4 steps are in the state
    np.testing.assert_allclose(outputs, lstm_reference(PARAMS, X)[1][:, :, 4:], atol=2e-5)


def test_without_check_finite_a_nan_stays_until_reset():
    """The default trusts its input: this is the behaviour check_finite guards against."""
    stream = Stream(MODEL, VARIABLES, BATCH, BANDS)
    bad = X[:, :, :1].copy()
    bad[0, 0, 0, 0] = np.nan
    stream(bad)
    assert np.isnan(stream(X[:, :, 1:2])[0, 0]).all()
    stream.reset(batch=[0])
    assert np.isfinite(stream(X[:, :, 1:2])).all()


def test_state_files_refuse_nonfinite_states(tmp_path):
    stream = Stream(MODEL, infinite_variables(), BATCH, BANDS)
    stream(X[:, :, :2])  # the state is now NaN
    path = tmp_path / "state.npz"
    with pytest.raises(ValueError, match=r"state: not saved to .*state.npz.*NaN or infinite"):
        stream.save(path)
    assert not path.exists()
    stream.save(path, allow_nonfinite=True)
    with pytest.raises(ValueError, match=r"^path: .*state.npz' not loaded: the state holds NaN"):
        stream.load(path)
    stream.load(path, allow_nonfinite=True)
    assert not np.isfinite(np.asarray(stream.state[0].hidden)).all()


# -- damaged and killed state files ------------------------------------------------------------


def saved_stream(tmp_path):
    stream = Stream(MODEL, VARIABLES, BATCH, BANDS)
    stream(X[:, :, :4])
    path = tmp_path / "state.npz"
    stream.save(path)
    return stream, path, path.read_bytes()


def test_damaged_state_files_raise_value_error_naming_the_file(tmp_path):
    stream, path, data = saved_stream(tmp_path)
    saved = stream.state
    fresh = Stream(MODEL, VARIABLES, BATCH, BANDS)
    rng = np.random.default_rng(5)
    damaged = tmp_path / "damaged.npz"
    cases = [b"", b"not a zip file at all"] + [
        data[: int(n)] for n in rng.integers(1, len(data), 40)
    ]
    for position in rng.integers(0, len(data), 300):  # single bit flips anywhere
        flipped = bytearray(data)
        flipped[position] ^= 1 << int(rng.integers(8))
        cases.append(bytes(flipped))
    loaded = refused = 0
    for case in cases:
        damaged.write_bytes(case)
        try:
            fresh.load(damaged)
        except ValueError as error:
            assert str(damaged) in str(error)
            refused += 1
        else:  # a flip the format does not read (a timestamp, padding): the same state
            leaves_equal(fresh.state, saved)
            loaded += 1
    print(f"damaged state files: {refused} refused, {loaded} loaded unchanged")
    assert refused > 250, (loaded, refused)
    with pytest.raises(IsADirectoryError):  # cannot be opened: not called damaged
        fresh.load(tmp_path)
    np.save(tmp_path / "array.npy", np.ones(3))  # a NumPy file, but no state file
    with pytest.raises(ValueError, match=r"array.npy' is not a stream state file"):
        fresh.load(tmp_path / "array.npy")


def test_state_file_survives_sigkill_during_save(tmp_path):
    """Kill a process that saves in a loop, at random moments: the file always
    loads, as the state after some whole number of steps; the partial file a
    kill leaves is replaced by the next save."""
    path = tmp_path / "state.npz"
    expected = {}
    stream = Stream(MODEL, VARIABLES, BATCH, BANDS)
    for steps in range(1, 200):
        stream(X[:, :, :1])
        expected[steps] = np.asarray(stream.state[0].hidden)
    inputs = tmp_path / "inputs.pkl"
    inputs.write_bytes(pickle.dumps((UNITS, jax.device_get(VARIABLES), X[:, :, :1])))
    saver = script_command(
        Path(__file__).parent / "scripts" / "save_state_in_a_loop.py", inputs, path
    )
    rng = np.random.default_rng(6)
    reader = Stream(MODEL, VARIABLES, BATCH, BANDS)
    for _ in range(3):
        child = subprocess.Popen(saver, stdout=subprocess.PIPE, env=script_env(), cwd=ROOT)
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        reader.load(path)
        hidden = np.asarray(reader.state[0].hidden)
        assert any(np.array_equal(hidden, h) for h in expected.values())
    reader.save(path)
    assert not (tmp_path / "state.npz.partial").exists()


# -- two threads on one stream ---------------------------------------------------------------


def serial_outputs(calls):
    """Outputs of ``calls`` calls of the chunk X[:, :, :3], one after another."""
    stream = Stream(MODEL, VARIABLES, BATCH, BANDS, max_chunk=2)
    return [stream(X[:, :, :3]) for _ in range(calls)]


def slowed(stream):
    """``stream`` with a pause before each compiled piece (pieces of 2 and 1
    steps per call here), so that threads interleave inside calls whenever
    nothing keeps them out."""
    real = stream._compiled_step

    def step(*args):
        time.sleep(0.0005)
        return real(*args)

    stream._compiled_step = step
    return stream


def test_two_threads_share_one_stream_call_by_call():
    """Both threads feed the same chunk, so whatever the order, the outputs
    must be the serial run's, each exactly once, and the state its last.
    (Without the lock, the slowed pieces interleave: calls fail or tear.)"""
    calls = 60
    stream = slowed(Stream(MODEL, VARIABLES, BATCH, BANDS, max_chunk=2))
    results, errors = [], []

    def feed():
        try:
            for _ in range(calls):
                results.append(stream(X[:, :, :3]))
        except Exception as error:  # noqa: BLE001  (collected, then asserted empty)
            errors.append(error)

    threads = [threading.Thread(target=feed) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    expected = serial_outputs(2 * calls)
    remaining = dict(enumerate(expected))
    for y in results:
        match = next(i for i, e in remaining.items() if np.array_equal(y, e))
        del remaining[match]
    assert not remaining
    final = Stream(MODEL, VARIABLES, BATCH, BANDS, max_chunk=2)
    for _ in range(2 * calls):
        final(X[:, :, :3])
    leaves_equal(stream.state, final.state)


def test_reset_racing_calls_restarts_between_them():
    """One thread calls, another resets while calls run: every output is the
    serial run's k-th, k going up by one or back to 1; and no reset is lost:
    once it returns, the next call to take the lock restarts, and at most one
    call that ran before it is still to record its output."""
    calls = 120
    expected = serial_outputs(calls)
    stream = slowed(Stream(MODEL, VARIABLES, BATCH, BANDS, max_chunk=2))
    outputs, resets, done = [], [], threading.Event()

    def feed():
        for _ in range(calls):
            outputs.append(stream(X[:, :, :3]))
            # A gap between frames, as a caller's frames have: Python's lock is
            # not fair, and a feeder that took it back at once starved the resets.
            time.sleep(0.0002)
        done.set()

    def reset():
        while not done.is_set() and len(outputs) < calls - 2:
            stream.reset()  # may wait for the lock through several calls
            before = len(outputs)
            resets.append(before)
            while len(outputs) < before + 3 + len(resets) % 3 and not done.is_set():
                time.sleep(0.0002)

    threads = [threading.Thread(target=feed), threading.Thread(target=reset)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ks, previous = [], 0
    for y in outputs:
        k = next(k for k in (previous + 1, 1) if k <= calls and np.array_equal(y, expected[k - 1]))
        ks.append(k)
        previous = k
    assert len(resets) >= 5, resets
    for before in resets:
        if before + 2 <= calls:  # a reset that waited out the last calls has none to restart
            assert 1 in ks[before : before + 2], (before, ks[before : before + 3])
