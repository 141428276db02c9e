"""Streaming: stream_step and Stream against the float64 NumPy loop reference."""

import gc
import time

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from banded_rnn import BandedLSTM, Stream, kernel_info, stream_step

from helpers import (
    ROOT,
    init_model,
    random_inputs,
    random_lengths,
    random_state,
    rss_bytes,
    run_chunks,
    run_script,
)
from reference import lstm_reference, params_from_variables

BATCH, BANDS, FEATURES, UNITS = 3, 4, 6, 5
MODEL = BandedLSTM(UNITS, num_layers=2)
X = random_inputs(0, (BATCH, BANDS, 60, FEATURES))
VARIABLES = init_model(MODEL, X)
PARAMS = params_from_variables(VARIABLES)
TESTS = ROOT / "tests"
SCRIPTS = TESTS / "streaming" / "scripts"


def reference(inputs, state=None):
    """float64 reference outputs and final state (list of (hidden, cell) per layer)."""
    final, outputs = lstm_reference(PARAMS, inputs, state)
    return outputs, final


def as_numpy(state):
    return [tuple(np.array(a) for a in layer) for layer in state]


@pytest.fixture
def stream():
    return Stream(MODEL, VARIABLES, BATCH, BANDS, max_chunk=8)


# stream_step: the compiled pure function.


def test_stream_step_threads_state_and_matches_reference():
    step = stream_step(MODEL)
    state = random_state(MODEL, BATCH, BANDS, seed=3)
    expected, expected_state = reference(X[:, :, :9], as_numpy(state))
    outputs = []
    for start, stop in [(0, 4), (4, 5), (5, 9)]:
        state, y = step(VARIABLES, state, X[:, :, start:stop])
        outputs.append(np.asarray(y))
    np.testing.assert_allclose(np.concatenate(outputs, axis=2), expected, atol=2e-5)
    for layer, (hidden, cell) in enumerate(expected_state):
        np.testing.assert_allclose(state[layer].hidden, hidden, atol=2e-5)
        np.testing.assert_allclose(state[layer].cell, cell, atol=2e-5)


def test_stream_step_donates_the_state():
    step = stream_step(MODEL)
    state = random_state(MODEL, BATCH, BANDS, seed=3)
    state = jax.tree.map(jax.device_put, state)
    new_state, _ = step(VARIABLES, state, X[:, :, :2])
    assert all(a.is_deleted() for a in jax.tree.leaves(state))
    assert not any(a.is_deleted() for a in jax.tree.leaves(new_state))
    # The model's own zero state has a buffer per field, so it can be donated too.
    state = MODEL.initial_state(BATCH, BANDS)
    new_state, y = step(VARIABLES, state, X[:, :, :2])
    assert all(a.is_deleted() for a in jax.tree.leaves(state))
    np.testing.assert_allclose(y, reference(X[:, :, :2])[0], atol=2e-5)


@pytest.mark.parametrize("mask_shape", ["batch", "batch_bands"])
def test_stream_step_reset_zeroes_chosen_states_first(mask_shape):
    step = stream_step(MODEL)
    state = random_state(MODEL, BATCH, BANDS, seed=4)
    rng = np.random.default_rng(5)
    if mask_shape == "batch":
        reset = np.array([True, False, True])
        zeroed = np.broadcast_to(reset[:, None], (BATCH, BANDS))
    else:
        reset = rng.random((BATCH, BANDS)) < 0.5
        zeroed = reset
    start = [
        tuple(np.where(zeroed[..., None], 0.0, np.asarray(a)) for a in layer) for layer in state
    ]
    expected, _ = reference(X[:, :, :3], start)
    _, y = step(VARIABLES, state, X[:, :, :3], reset)
    np.testing.assert_allclose(y, expected, atol=2e-5)


def test_stream_step_masks_padding_with_seq_lengths():
    step = stream_step(MODEL)
    padded = np.concatenate([X[:, :, :3], np.zeros((BATCH, BANDS, 5, FEATURES), np.float32)], 2)
    expected, expected_state = reference(X[:, :, :3])
    state, y = step(VARIABLES, None, padded, None, np.full(BATCH, 3, np.int32))
    np.testing.assert_allclose(y[:, :, :3], expected, atol=2e-5)
    assert not np.any(np.asarray(y[:, :, 3:]))
    np.testing.assert_allclose(state[1].cell, expected_state[1][1], atol=2e-5)


@pytest.mark.parametrize(
    "chunk, reset, message",
    [
        (X[:2, :, :2], None, r"chunk: expected shape .* = \(3, 4, time, 6\); received shape \(2,"),
        (X[:, :3, :2], None, r"chunk: expected shape .* = \(3, 4, time, 6\); received shape \(3,"),
        (X[:, :, :2, :5], None, r"chunk: expected 6 features.*received shape \(3, 4, 2, 5\)"),
        (X[:, :, :0], None, r"chunk: expected at least one sequence.*\(3, 4, 0, 6\)"),
        (X[:, :, :2], np.ones(2, bool), r"reset: expected a bool mask.*\(3,\).*\(3, 4\).*\(2,\)"),
        (X[:, :, :2], np.ones((3, 2), bool), r"reset: .*received shape \(3, 2\)"),
    ],
    ids=["batch", "bands", "features", "empty", "reset-batch", "reset-bands"],
)
def test_stream_step_refuses_bad_input_before_donating(chunk, reset, message):
    step = stream_step(MODEL)
    state = jax.tree.map(jax.device_put, random_state(MODEL, BATCH, BANDS, seed=6))
    before = jax.tree.map(np.array, state)
    with pytest.raises(ValueError, match=message):
        step(VARIABLES, state, chunk, reset)
    assert not any(a.is_deleted() for a in jax.tree.leaves(state))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, state), before)


def test_stream_step_refuses_a_non_bool_reset():
    step = stream_step(MODEL)
    with pytest.raises(TypeError, match=r"reset: expected a bool mask; received dtype int32"):
        step(VARIABLES, None, X[:, :, :2], np.zeros(BATCH, np.int32))


# Stream: chunking, buckets, resets.


@pytest.mark.parametrize("seed, max_chunk", [(0, 8), (1, 8), (2, 3), (3, 1)])
def test_random_chunk_lengths_equal_one_whole_call(seed, max_chunk):
    stream = Stream(MODEL, VARIABLES, BATCH, BANDS, max_chunk=max_chunk)
    lengths = random_lengths(seed, X.shape[2], longest=3 * max_chunk + 1)
    streamed = run_chunks(stream, X, lengths)
    final_state, whole = MODEL.apply(VARIABLES, None, X)
    assert np.max(np.abs(streamed - np.asarray(whole))) <= 1e-6
    expected, expected_state = reference(X)
    np.testing.assert_allclose(streamed, expected, atol=2e-5)
    for layer, (hidden, cell) in enumerate(expected_state):
        np.testing.assert_allclose(stream.state[layer].hidden, hidden, atol=2e-5)
        np.testing.assert_allclose(stream.state[layer].cell, cell, atol=2e-5)


PROPERTY_STREAM = Stream(MODEL, VARIABLES, BATCH, BANDS, max_chunk=4)


@settings(max_examples=20, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 13), min_size=1, max_size=6).filter(
        lambda lengths: sum(lengths) <= X.shape[2]  # chunks of X, none empty
    ),
    reset_at=st.integers(0, 5),
    reset_entry=st.integers(0, BATCH - 1),
)
def test_property_any_chunking_and_reset_match_the_reference(lengths, reset_at, reset_entry):
    stream = PROPERTY_STREAM
    stream.reset()
    inputs = X[:, :, : sum(lengths)]
    outputs, start, restart = [], 0, None
    for index, t in enumerate(lengths):
        if index == reset_at:
            stream.reset(batch=[reset_entry])
            restart = start
        outputs.append(stream(inputs[:, :, start : start + t]))
        start += t
    outputs = np.concatenate(outputs, axis=2)
    expected, _ = reference(inputs)
    if restart is not None:
        expected[reset_entry, :, restart:] = reference(
            inputs[reset_entry : reset_entry + 1, :, restart:]
        )[0][0]
    np.testing.assert_allclose(outputs, expected, atol=2e-5)


def test_device_resident_chunks_stream_like_host_chunks(stream):
    lengths = [1, 2, 8, 3, 16, 5]
    chunks = np.split(X[:, :, : sum(lengths)], np.cumsum(lengths)[:-1], axis=2)
    streamed = np.concatenate([stream(jax.device_put(c)) for c in chunks], axis=2)
    expected, _ = reference(X[:, :, : sum(lengths)])
    np.testing.assert_allclose(streamed, expected, atol=2e-5)


def test_reset_of_one_entry_restarts_it_and_leaves_the_others_bit_for_bit(stream):
    lengths = random_lengths(7, X.shape[2], longest=11)
    untouched = Stream(MODEL, VARIABLES, BATCH, BANDS, max_chunk=8)
    k = len(lengths) // 2
    reset_at = sum(lengths[:k])
    outputs, plain = [], []
    for index, t in enumerate(lengths):
        start = sum(lengths[:index])
        if index == k:
            stream.reset(batch=[1])
        outputs.append(stream(X[:, :, start : start + t]))
        plain.append(untouched(X[:, :, start : start + t]))
    outputs, plain = np.concatenate(outputs, 2), np.concatenate(plain, 2)
    others = [0, 2]
    np.testing.assert_array_equal(outputs[others], plain[others])
    expected, _ = reference(X)
    np.testing.assert_allclose(outputs[others], expected[others], atol=2e-5)
    fresh, _ = reference(X[1:2, :, reset_at:])
    np.testing.assert_allclose(outputs[1:2, :, reset_at:], fresh, atol=2e-5)
    _, fresh_model = MODEL.apply(VARIABLES, None, X[1:2, :, reset_at:])
    assert np.max(np.abs(outputs[1:2, :, reset_at:] - np.asarray(fresh_model))) <= 1e-6


def test_reset_mask_in_call_and_reset_all(stream):
    stream(X[:, :, :5])
    mask = np.zeros((BATCH, BANDS), bool)
    mask[2, 1] = mask[0, 3] = True
    start = [
        tuple(np.where(mask[..., None], 0.0, a) for a in layer) for layer in as_numpy(stream.state)
    ]
    expected, _ = reference(X[:, :, 5:9], start)
    np.testing.assert_allclose(stream(X[:, :, 5:9], reset=mask), expected, atol=2e-5)
    stream.reset()
    assert not any(np.any(np.asarray(a)) for a in jax.tree.leaves(stream.state))
    expected, _ = reference(X[:, :, 9:12])
    np.testing.assert_allclose(stream(X[:, :, 9:12]), expected, atol=2e-5)


def test_zero_compilations_after_warmup_over_200_random_calls():
    # A model of its own, so that no other test has compiled its shapes yet.
    model = BandedLSTM(7, num_layers=1)
    inputs = random_inputs(8, (2, 3, 40, 4))
    variables = init_model(model, inputs)
    stream = Stream(model, variables, 2, 3, max_chunk=6)
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(kwargs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        constructed = stream.compile_count  # packing the kernel's weights, once
        stream.warmup()
        warm = stream.compile_count
        # One compilation per bucket (1, 2, 4, 6) and one for the state copy,
        # which also applies resets.
        assert warm - constructed == len(events) == len(stream.buckets) + 1 == 5
        assert constructed == (1 if kernel_info()["kernel"] == "built" else 0)
        rng = np.random.default_rng(9)
        for call in range(200):
            t = int(rng.integers(1, 20))
            chunk = rng.standard_normal((2, 3, t, 4)).astype(np.float32)
            if call % 3 == 0:
                chunk = jax.device_put(chunk)
            reset = rng.random(2) < 0.1 if call % 5 == 0 else None
            if call % 17 == 0:
                stream.reset(batch=[int(rng.integers(0, 2))])
            stream(chunk, reset=reset)
            if call % 50 == 0:
                stream.state  # noqa: B018  (the snapshot is compiled too)
        assert stream.compile_count == warm
        assert len(events) == warm - constructed
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_compile_count_reports_compilations_without_warmup():
    model = BandedLSTM(9, num_layers=1)
    inputs = random_inputs(10, (1, 2, 5, 3))
    stream = Stream(model, init_model(model, inputs), 1, 2, max_chunk=4)
    stream(inputs[:, :, :3])  # pieces of 2 and 1 steps, compiled on first use
    assert stream.compile_count >= 2
    count = stream.compile_count
    stream(inputs[:, :, 1:5])  # one piece of 4: a new shape
    assert stream.compile_count > count
    count = stream.compile_count
    stream(inputs[:, :, 2:5])  # 2 and 1 again
    assert stream.compile_count == count


def test_compile_counting_charges_only_its_stream_and_leaves_no_listener_behind():
    from jax._src import monitoring  # the listener list has no public reader

    gc.collect()  # streams of earlier tests, unreachable but not yet collected
    listeners = len(monitoring.get_event_duration_listeners())
    model = BandedLSTM(7)
    inputs = random_inputs(11, (1, 2, 3, 3))
    variables = init_model(model, inputs)
    first, second = (Stream(model, variables, 1, 2, max_chunk=4) for _ in range(2))
    built = second.compile_count  # packing the kernel's weights, once per stream
    first(inputs)
    assert first.compile_count >= built + 1 and second.compile_count == built
    count = first.compile_count
    jax.jit(lambda x: x * 5.0)(inputs)  # outside any stream: charged to none
    second(inputs[:, :, :1])
    assert second.compile_count >= 1 and first.compile_count == count
    del first, second
    gc.collect()  # the listener goes with the last counter
    assert len(monitoring.get_event_duration_listeners()) == listeners


# Bad input: a clear error, and the state exactly as it was.


def assert_state_unchanged(stream, before):
    after = as_numpy(stream.state)
    for (hidden, cell), (hidden_before, cell_before) in zip(after, before, strict=True):
        np.testing.assert_array_equal(hidden, hidden_before)
        np.testing.assert_array_equal(cell, cell_before)


BAD_CALLS = {
    "batch": (
        lambda s: s(X[:2, :, :3]),
        ValueError,
        r"chunk: expected shape .* = \(3, 4, time, 6\); received shape \(2, 4, 3, 6\)",
    ),
    "bands": (lambda s: s(X[:, :2, :3]), ValueError, r"chunk: .*received shape \(3, 2, 3, 6\)"),
    "features": (
        lambda s: s(X[:, :, :3, :4]),
        ValueError,
        r"chunk: expected 6 features.*received shape \(3, 4, 3, 4\)",
    ),
    "rank": (
        lambda s: s(X[:, :, 0]),
        ValueError,
        r"chunk: .*received shape \(3, 4, 6\); for one time step, add the time axis",
    ),
    "empty": (
        lambda s: s(X[:, :, :0]),
        ValueError,
        r"chunk: expected at least one sequence, band and time.*\(3, 4, 0, 6\)",
    ),
    "integer": (
        lambda s: s(X[:, :, :3].astype(np.int32)),
        TypeError,
        r"chunk: expected a floating dtype; received int32",
    ),
    "reset-shape": (
        lambda s: s(X[:, :, :3], reset=np.ones(4, bool)),
        ValueError,
        r"reset: expected a bool mask of shape \[batch\] = \(3,\).*received shape \(4,\)",
    ),
    "reset-dtype": (
        lambda s: s(X[:, :, :3], reset=np.ones(3)),
        TypeError,
        r"reset: expected a bool mask; received dtype float",
    ),
    "reset-index": (
        lambda s: s.reset(batch=[1, 3]),
        ValueError,
        r"batch: expected indices in \[0, 3\); received \[1, 3\]",
    ),
    "reset-type": (lambda s: s.reset(batch=[0.5]), TypeError, r"batch: expected integer indices"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_and_leaves_the_state_as_it_was(stream, case):
    call, error, message = BAD_CALLS[case]
    stream(X[:, :, :7])
    stream.reset(batch=[2])  # a pending reset must survive the error too
    before = as_numpy(stream.state)
    with pytest.raises(error, match=message):
        call(stream)
    assert_state_unchanged(stream, before)
    # The stream goes on exactly where it was.
    expected, _ = reference(X[:, :, 7:12], before)
    np.testing.assert_allclose(stream(X[:, :, 7:12]), expected, atol=2e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"max_chunk": 8, "buckets": [1, 4]},
            r"buckets: expected lengths up to and including max_chunk = 8",
        ),
        ({"max_chunk": 0}, r"max_chunk: expected an integer >= 1; received 0"),
        ({"max_chunk": 4, "dtype": np.int32}, r"dtype: expected a floating dtype"),
    ],
)
def test_bad_stream_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Stream(MODEL, VARIABLES, BATCH, BANDS, **kwargs)


def test_variables_of_another_model_are_refused():
    with pytest.raises(ValueError, match="variables: expected BandedLSTM variables"):
        Stream(MODEL, {"params": {}}, BATCH, BANDS)
    with pytest.raises(
        ValueError,
        match=r"variables: expected those of BandedLSTM\(units=6, num_layers=2\) for 6 features"
        r".*\(6, 24\).*received.*\(6, 20\)",
    ):
        Stream(BandedLSTM(UNITS + 1, num_layers=2), VARIABLES, BATCH, BANDS)
    with pytest.raises(
        ValueError, match=r"variables: expected those of BandedLSTM\(units=5, num_layers=3\)"
    ):
        Stream(BandedLSTM(UNITS, num_layers=3), VARIABLES, BATCH, BANDS)


# save / load.


def test_save_load_round_trip_in_process(stream, tmp_path):
    stream(X[:, :, :10])
    stream.reset(batch=[0])  # saved with the pending reset applied
    stream.save(tmp_path / "state.npz")
    expected_state = as_numpy(stream.state)
    other = Stream(MODEL, VARIABLES, BATCH, BANDS, max_chunk=8)
    other.load(tmp_path / "state.npz")
    assert_state_unchanged(other, expected_state)
    expected, _ = reference(X[:, :, 10:20], expected_state)
    np.testing.assert_allclose(other(X[:, :, 10:20]), expected, atol=2e-5)


def test_a_file_in_format_1_still_loads():
    """tests/data/stream_state_format1.npz was saved by the code of commit
    28c1083 (before streams took any model: arrays hidden_{layer} and
    cell_{layer}, no state layout), after X[:, :, :9], for this MODEL and the
    weights stored beside it: initialised here, their last bits would depend
    on how this CPU rounds the orthogonal initialiser, and the file's weight
    fingerprint would not match."""
    stored = np.load(TESTS / "data" / "stream_state_format1_variables.npz")
    params = {}
    for name in stored.files:  # "layer_0/kernel", ...
        layer, weight = name.split("/")
        params.setdefault(layer, {})[weight] = stored[name]
    stream = Stream(MODEL, {"params": params}, BATCH, BANDS, max_chunk=8)
    stream.load(TESTS / "data" / "stream_state_format1.npz")
    _, expected = lstm_reference(params_from_variables({"params": params}), X[:, :, :20])
    np.testing.assert_allclose(stream(X[:, :, 9:20]), expected[:, :, 9:], atol=2e-5)


def another_weights():
    return jax.tree.map(lambda a: a + 0.01, VARIABLES)


STATE_FILES_OF_OTHERS = {
    "units": (
        lambda: Stream(
            BandedLSTM(UNITS + 1, num_layers=2),
            init_model(BandedLSTM(UNITS + 1, num_layers=2), X),
            BATCH,
            BANDS,
        ),
        r"units: saved 6, this model 5",
    ),
    "num_layers": (
        lambda: Stream(BandedLSTM(UNITS), init_model(BandedLSTM(UNITS), X), BATCH, BANDS),
        r"num_layers: saved 1, this model 2",
    ),
    "features": (
        lambda: Stream(MODEL, init_model(MODEL, X[..., :4]), BATCH, BANDS),
        r"variables: saved .*\[4, 20\]",
    ),
    "weights": (
        lambda: Stream(MODEL, another_weights(), BATCH, BANDS),
        r"weights: same shapes, different values",
    ),
    "batch": (
        lambda: Stream(MODEL, VARIABLES, BATCH + 1, BANDS),
        r"batch_size: saved 4, this stream 3",
    ),
    "bands": (
        lambda: Stream(MODEL, VARIABLES, BATCH, BANDS - 1),
        r"num_bands: saved 3, this stream 4",
    ),
}


@pytest.mark.parametrize("case", list(STATE_FILES_OF_OTHERS))
def test_state_file_of_another_model_is_refused_and_nothing_changes(stream, tmp_path, case):
    make_other, message = STATE_FILES_OF_OTHERS[case]
    other = make_other()
    other(np.ones((other.batch_size, other.num_bands, 3, other.features), np.float32))
    other.save(tmp_path / "other.npz")
    stream(X[:, :, :6])
    stream.reset(batch=[1])
    before = as_numpy(stream.state)
    with pytest.raises(
        ValueError,
        match=r"path: the state in .*other\.npz.* belongs to another model or stream; .*" + message,
    ):
        stream.load(tmp_path / "other.npz")
    assert_state_unchanged(stream, before)
    expected, _ = reference(X[:, :, 6:9], before)
    np.testing.assert_allclose(stream(X[:, :, 6:9]), expected, atol=2e-5)


def test_a_file_that_is_no_state_file_is_refused(stream, tmp_path):
    np.savez(tmp_path / "plain.npz", hidden_0=np.zeros(3))
    (tmp_path / "text.npz").write_text("not a state")
    stream(X[:, :, :4])
    before = as_numpy(stream.state)
    for name in ("plain.npz", "text.npz"):
        with pytest.raises(ValueError, match=r"path: .* is not a stream state file"):
            stream.load(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        stream.load(tmp_path / "missing.npz")
    assert_state_unchanged(stream, before)


def test_save_then_a_new_process_loads_and_continues_like_an_uninterrupted_stream(stream, tmp_path):
    lengths = random_lengths(11, X.shape[2], longest=12)
    k = len(lengths) // 2
    split = sum(lengths[:k])
    run_chunks(stream, X[:, :, :split], lengths[:k])
    stream.save(tmp_path / "state.npz")
    uninterrupted = run_chunks(stream, X[:, :, split:], lengths[k:])
    np.savez(tmp_path / "data.npz", inputs=X[:, :, split:], lengths=np.array(lengths[k:]))
    files = [tmp_path / name for name in ("data.npz", "state.npz", "continued.npy")]
    run_script(SCRIPTS / "continue_stream.py", "lstm", *files)
    continued = np.load(tmp_path / "continued.npy")
    np.testing.assert_array_equal(continued, uninterrupted)
    expected, _ = reference(X)
    np.testing.assert_allclose(continued, expected[:, :, split:], atol=2e-5)


# Soak: many calls, no growth in memory or compilations.


@pytest.mark.slow
def test_soak_100k_calls_no_growth_in_memory_or_compilations():
    model = BandedLSTM(16, num_layers=2)
    inputs = random_inputs(12, (2, 3, 8, 4))
    stream = Stream(model, init_model(model, inputs), 2, 3, max_chunk=4)
    stream.warmup()
    warm = stream.compile_count
    rng = np.random.default_rng(13)
    lengths = rng.integers(1, 9, size=100_000)
    resets = rng.random(100_000) < 0.01
    rss = {}
    begin = time.perf_counter()
    for call, t in enumerate(lengths):
        if call in (10_000, 99_999):
            rss[call] = rss_bytes()
        if resets[call]:
            stream.reset(batch=[call % 2])
        stream(inputs[:, :, :t])
    elapsed = time.perf_counter() - begin
    growth = rss[99_999] - rss[10_000]
    print(
        f"\nsoak: 100000 calls in {elapsed:.1f} s ({100_000 / elapsed:.0f} calls/s); "
        f"RSS {rss[10_000] / 2**20:.1f} MiB at call 10000, {rss[99_999] / 2**20:.1f} MiB at "
        f"call 99999 (growth {growth / 2**20:+.2f} MiB); compilations after warmup: "
        f"{stream.compile_count - warm}"
    )
    assert stream.compile_count == warm
    assert growth < 16 * 2**20
    assert np.all(np.isfinite(np.asarray(stream.state[1].hidden)))
