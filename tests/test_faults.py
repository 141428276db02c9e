"""Faults injected for real: lengths past int32, bad input of every kind, NaN and
infinity in chunks, states, files and training batches, damaged and killed
state files, and two threads on one stream. Every result is checked against the
float64 NumPy reference or against what was there before the fault."""

import pickle
import signal
import subprocess
import threading
import time

import jax
import numpy as np
import optax
import pytest

from banded_rnn import BandedLSTM, Stream
from banded_rnn.training import (
    Checkpointer,
    ChunkStream,
    NonFiniteError,
    TrainStep,
    fit,
    make_train_step,
)

from helpers import (
    ADAM,
    ROOT,
    init_model,
    mse,
    new_train_state,
    random_inputs,
    random_variables,
    rss_bytes,
    run_script,
    script_command,
    script_env,
)
from reference import lstm_reference, params_from_variables

BATCH, BANDS, FEATURES, UNITS = 2, 3, 2, 4
MODEL = BandedLSTM(UNITS)
X = random_inputs(1, (BATCH, BANDS, 7, FEATURES))
VARIABLES = init_model(MODEL, X)
PARAMS = params_from_variables(VARIABLES)
RNG = jax.random.key(7)


def leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- lengths past int32 -------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["kernel", "scan"])
@pytest.mark.parametrize(
    "lengths",
    [
        np.array([2**40, 3], np.int64),
        np.array([2**32 + 2, 3], np.uint64),
        np.array([3_000_000_000, 3], np.uint32),
        np.array([2**31, 3], np.int64),
    ],
    ids=["int64-2**40", "uint64-2**32+2", "uint32-3e9", "int64-2**31"],
)
def test_lengths_past_int32_mean_every_step_valid(implementation, lengths):
    """A length past int32 used to wrap when cast (2**40 became 0 valid steps);
    it means every step is valid, as any length >= time does."""
    model = BandedLSTM(UNITS, implementation=implementation)
    final, outputs = model.apply(VARIABLES, None, X, seq_lengths=lengths)
    expected_final, expected = lstm_reference(PARAMS, X, None, np.array([7, 3]))
    np.testing.assert_allclose(outputs, expected, atol=2e-5)
    np.testing.assert_allclose(final[0].hidden, expected_final[0][0], atol=2e-5)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_short_integer_lengths_are_not_clipped_in_their_own_dtype(dtype, jit):
    """300 steps: a clip to time in int8 would wrap (300 becomes 44)."""
    x = random_inputs(2, (2, 1, 300, FEATURES))
    lengths = np.array([100, 7], dtype)
    run = lambda x, n: MODEL.apply(VARIABLES, None, x, seq_lengths=n)[1]  # noqa: E731
    outputs = (jax.jit(run) if jit else run)(x, lengths)
    expected = lstm_reference(PARAMS, x, None, np.array([100, 7]))[1]
    np.testing.assert_allclose(outputs, expected, atol=3e-5)


def test_uint32_lengths_past_int32_under_jit():
    """Traced, the clip runs in the lengths' own dtype before the cast."""
    run = jax.jit(lambda x, n: MODEL.apply(VARIABLES, None, x, seq_lengths=n)[1])
    outputs = run(X, np.array([4_000_000_000, 2], np.uint32))
    np.testing.assert_allclose(outputs, lstm_reference(PARAMS, X, None, [7, 2])[1], atol=2e-5)


# -- bad input of every kind ----------------------------------------------------------------

BAD_INPUTS = [
    (None, TypeError, "expected an array; received NoneType"),
    ("abc", TypeError, "expected an array; received str"),
    ([[1.0], [1.0, 2.0]], ValueError, r"expected a rectangular array.*ragged"),
    (
        jax.ShapeDtypeStruct(X.shape, X.dtype),
        TypeError,
        r"expected an array with values; received a jax.ShapeDtypeStruct",
    ),
    (
        np.ma.masked_array(X, mask=X > 1),
        TypeError,
        "expected an array; received a NumPy masked array",
    ),
    (np.full(X.shape, "a"), TypeError, "expected a floating dtype; received <U1"),
]


@pytest.mark.parametrize("bad, error, message", BAD_INPUTS)
def test_bad_inputs_are_named_by_apply(bad, error, message):
    with pytest.raises(error, match=f"^inputs: {message}"):
        MODEL.apply(VARIABLES, None, bad)


@pytest.mark.parametrize("bad, error, message", BAD_INPUTS)
def test_bad_chunks_are_named_by_stream_and_leave_its_state(bad, error, message):
    stream = Stream(MODEL, VARIABLES, BATCH, BANDS)
    stream(X[:, :, :2])
    before = stream.state
    with pytest.raises(error, match=f"^chunk: {message}"):
        stream(bad)
    leaves_equal(stream.state, before)


@pytest.mark.parametrize("bad, error, message", BAD_INPUTS[:5])
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


@pytest.mark.parametrize("variables", [{}, {"params": {}}], ids=["empty", "no-params"])
def test_missing_variables_are_named(variables):
    with pytest.raises(ValueError, match=r"^variables: expected BandedLSTM variables"):
        MODEL.apply(variables, None, X)


def test_keras_layer_names_bad_inputs():
    import interop  # noqa: F401  (before keras: selects the JAX backend)

    layer = interop.BandedLSTMLayer(UNITS)
    for bad, error, message in BAD_INPUTS[:3] + BAD_INPUTS[4:5]:
        with pytest.raises(error, match=f"^inputs: {message}"):
            layer(bad)


def test_inputs_on_another_device_than_the_variables_are_named():
    run_script(ROOT / "tests" / "core" / "scripts" / "inputs_on_another_device.py")


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
    saver = script_command(ROOT / "tests" / "streaming" / "scripts" / "save_state_in_a_loop.py",
                           inputs, path)  # fmt: skip
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
    assert len(resets) > 10
    for before in resets:
        assert 1 in ks[before : before + 2], (before, ks[before : before + 3])


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
