"""Streaming whole models (layers before and after one or more BandedLSTM, any
state pytree) against float64 NumPy references of those models."""

from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from banded_rnn import BandedLSTM, Stream, export_stream_step, stream_step

from helpers import (
    SubbandMask,
    TwoInSeries,
    init_model,
    random_inputs,
    random_lengths,
    run_chunks,
    run_script,
)
from reference import subband_mask_reference, two_in_series_reference

BATCH, BANDS, FEATURES = 3, 4, 6
X = random_inputs(0, (BATCH, BANDS, 40, FEATURES))
MASK_MODEL = SubbandMask(hidden=7, units=5)
MASK_VARIABLES = init_model(MASK_MODEL, X)
SERIES_MODEL = TwoInSeries()
SERIES_VARIABLES = init_model(SERIES_MODEL, X)
ATOL = 2e-5
SCRIPTS = Path(__file__).parent / "scripts"


def mask_reference(inputs, state=None, seq_lengths=None):
    return subband_mask_reference(MASK_VARIABLES["params"], inputs, state, seq_lengths)


def series_reference(inputs, state=None):
    return two_in_series_reference(SERIES_VARIABLES["params"], inputs, state)


def as_pairs(state):
    """A tuple of LSTMState as the references take it: per layer (hidden, cell)."""
    return [tuple(np.asarray(a, np.float64) for a in layer) for layer in state]


@pytest.mark.parametrize("seed, max_chunk", [(0, 8), (1, 3)])
def test_model_with_head_streams_like_the_reference_and_the_whole_apply(seed, max_chunk):
    stream = Stream(MASK_MODEL, MASK_VARIABLES, BATCH, BANDS, max_chunk, features=FEATURES)
    streamed = run_chunks(stream, X, random_lengths(seed, X.shape[2], longest=11))
    expected_state, expected = mask_reference(X)
    np.testing.assert_allclose(streamed, expected, atol=ATOL)
    for (hidden, cell), layer in zip(expected_state, stream.state, strict=True):
        np.testing.assert_allclose(layer.hidden, hidden, atol=ATOL)
        np.testing.assert_allclose(layer.cell, cell, atol=ATOL)
    _, whole = MASK_MODEL.apply(MASK_VARIABLES, None, X)
    np.testing.assert_allclose(streamed, whole, atol=1e-6)


def test_two_lstms_in_series_with_a_dict_state_and_resets_in_the_middle():
    stream = Stream(SERIES_MODEL, SERIES_VARIABLES, BATCH, BANDS, max_chunk=8, features=FEATURES)
    first = run_chunks(stream, X[:, :, :17], [5, 1, 11])
    stream.reset(batch=[1])  # sequence 1 starts again at step 17; the others carry on
    second = run_chunks(stream, X[:, :, 17:], [9, 14])

    state, expected = series_reference(X)
    np.testing.assert_allclose(first, expected[:, :, :17], atol=ATOL)
    for b in (0, 2):
        np.testing.assert_allclose(second[b], expected[b, :, 17:], atol=ATOL)
    _, restarted = series_reference(X[1:2, :, 17:])
    np.testing.assert_allclose(second[1], restarted[0], atol=ATOL)
    # The state is the model's dict, each leaf [batch, bands, units].
    got = stream.state
    assert sorted(got) == ["high", "low"] and got["high"][1].cell.shape == (BATCH, BANDS, 3)
    np.testing.assert_allclose(got["low"][0].hidden[0], state["low"][0][0][0], atol=ATOL)


def test_reset_of_single_bands_inside_a_call_restarts_only_those():
    stream = Stream(MASK_MODEL, MASK_VARIABLES, BATCH, BANDS, max_chunk=4, features=FEATURES)
    stream(X[:, :, :10])
    reset = np.zeros((BATCH, BANDS), bool)
    reset[2, 1] = reset[0, 3] = True
    after = stream(X[:, :, 10:20], reset=reset)

    state_10, _ = mask_reference(X[:, :, :10])
    _, carried = mask_reference(X[:, :, 10:20], state_10)
    _, fresh = mask_reference(X[:, :, 10:20])
    expected = np.where(reset[:, :, None, None], fresh, carried)
    np.testing.assert_allclose(after, expected, atol=ATOL)


def test_padded_buckets_mask_the_padding_through_the_models_seq_lengths():
    stream = Stream(MASK_MODEL, MASK_VARIABLES, BATCH, BANDS, 8, buckets=[4, 8], features=FEATURES)
    streamed = run_chunks(stream, X, [3, 9, 1, 13, 14])  # 3 and 1 run padded to 4
    np.testing.assert_allclose(streamed, mask_reference(X)[1], atol=ATOL)


def test_warmup_then_no_compilation_over_random_calls_and_resets():
    stream = Stream(SERIES_MODEL, SERIES_VARIABLES, BATCH, BANDS, max_chunk=8, features=FEATURES)
    stream.warmup()
    compiled = stream.compile_count
    rng = np.random.default_rng(5)
    for _ in range(30):
        t = int(rng.integers(1, 20))
        reset = rng.random((BATCH, BANDS)) < 0.2
        stream(random_inputs(int(rng.integers(1 << 30)), (BATCH, BANDS, t, FEATURES)), reset)
        if rng.random() < 0.2:
            stream.reset(batch=[int(rng.integers(BATCH))])
        assert jax.tree.leaves(stream.state)[0].shape[:2] == (BATCH, BANDS)
    assert stream.compile_count == compiled


def test_device_outputs_are_jax_arrays_equal_to_the_numpy_ones():
    host = Stream(MASK_MODEL, MASK_VARIABLES, BATCH, BANDS, 8, features=FEATURES)
    device = Stream(
        MASK_MODEL, MASK_VARIABLES, BATCH, BANDS, 8, features=FEATURES, outputs="device"
    )
    for start, stop in [(0, 1), (1, 9), (9, 22)]:  # one bucket, one bucket, three pieces
        expected = host(X[:, :, start:stop])
        got = device(jax.device_put(X[:, :, start:stop]))
        assert isinstance(got, jax.Array) and isinstance(expected, np.ndarray)
        np.testing.assert_array_equal(np.asarray(got), expected)
    np.testing.assert_allclose(
        np.asarray(got), mask_reference(X[:, :, :22])[1][:, :, 9:], atol=ATOL
    )


def test_stream_step_of_a_model_with_head_from_its_zero_state():
    step = stream_step(MASK_MODEL)
    state = None  # the model's zero state
    outputs = []
    for start, stop in [(0, 7), (7, 8), (8, 20)]:
        state, y = step(MASK_VARIABLES, state, X[:, :, start:stop])
        outputs.append(np.asarray(y))
    np.testing.assert_allclose(
        np.concatenate(outputs, axis=2), mask_reference(X[:, :, :20])[1], atol=ATOL
    )


def test_export_of_a_model_with_head_runs_without_its_code():
    blob = export_stream_step(MASK_MODEL, MASK_VARIABLES, BATCH, BANDS, 5, features=FEATURES)
    exported = jax.export.deserialize(blob)
    state = tuple(np.zeros(a.shape, a.dtype) for a in exported.in_avals[:-2])  # then chunk, reset
    reset = np.zeros((BATCH, BANDS), bool)
    outputs = []
    for start in range(0, 20, 5):
        state, y = exported.call(state, X[:, :, start : start + 5], reset)
        outputs.append(np.asarray(y))
    np.testing.assert_allclose(
        np.concatenate(outputs, axis=2), mask_reference(X[:, :, :20])[1], atol=ATOL
    )


def test_save_then_a_new_process_loads_and_continues_like_an_uninterrupted_stream(tmp_path):
    stream = Stream(MASK_MODEL, MASK_VARIABLES, BATCH, BANDS, max_chunk=8, features=FEATURES)
    run_chunks(stream, X[:, :, :13], [6, 7])
    stream.save(tmp_path / "state.npz")
    uninterrupted = stream(X[:, :, 13:])
    np.savez(tmp_path / "data.npz", inputs=X[:, :, 13:], lengths=[X.shape[2] - 13])  # one call
    files = [tmp_path / name for name in ("data.npz", "state.npz", "continued.npy")]
    run_script(SCRIPTS / "continue_stream.py", "subband_mask", *files)
    continued = np.load(tmp_path / "continued.npy")
    np.testing.assert_array_equal(continued, uninterrupted)
    np.testing.assert_allclose(continued, mask_reference(X)[1][:, :, 13:], atol=ATOL)


def test_a_state_file_of_another_model_class_is_refused(tmp_path):
    lstm = BandedLSTM(5, num_layers=2)
    plain = Stream(lstm, init_model(lstm, X[..., :7]), BATCH, BANDS)
    plain.save(tmp_path / "plain.npz")
    stream = Stream(MASK_MODEL, MASK_VARIABLES, BATCH, BANDS, features=FEATURES)
    with pytest.raises(ValueError, match=r"class: saved 'BandedLSTM', this model 'SubbandMask'"):
        stream.load(tmp_path / "plain.npz")


# -- what a streamed model must offer, and the errors that say so --------------------------


class NeedsAState(nn.Module):
    @nn.compact
    def __call__(self, state, inputs):
        state, outputs = BandedLSTM(4, name="lstm")(state["lstm"], inputs)
        return {"lstm": state}, outputs


class PooledState(nn.Module):
    @nn.compact
    def __call__(self, state, inputs):
        state, outputs = BandedLSTM(4, name="lstm")(None, inputs)
        return state[0].hidden.mean(axis=(1, 2)), outputs  # [batch]: no bands axis


class GrowingState(nn.Module):
    @nn.compact
    def __call__(self, state, inputs):
        new, outputs = BandedLSTM(4, name="lstm")(None, inputs)
        return (() if state is None else state) + new, outputs


class PooledOutputs(nn.Module):
    @nn.compact
    def __call__(self, state, inputs):
        state, outputs = BandedLSTM(4, name="lstm")(state, inputs)
        return state, outputs.mean(axis=1)  # [batch, time, units]: no bands axis


BANDED_PARAMS = init_model(BandedLSTM(4), X[:, :, :2])["params"]


@pytest.mark.parametrize(
    "model, kwargs, error, message",
    [
        (
            NeedsAState(),
            {"features": FEATURES},
            TypeError,
            r"model: NeedsAState.apply\(variables, None, chunk\) raised TypeError: .*A streamed "
            r"model starts from its zero state when given state=None",
        ),
        (
            PooledState(),
            {"features": FEATURES},
            ValueError,
            r"model: the state PooledState returns: state: expected shape "
            r"\[batch, bands, \.\.\.\] = \(3, 4, \.\.\.\).*received \(3,\)",
        ),
        (
            GrowingState(),
            {"features": FEATURES},
            ValueError,
            r"model: fed the state it returned, .*GrowingState returns another structure",
        ),
        (
            PooledOutputs(),
            {"features": FEATURES},
            ValueError,
            r"model: expected outputs \[batch, bands, time, \.\.\.\] = \(3, 4, 1, \.\.\.\).*"
            r"received \(3, 1, 4\)",
        ),
        (
            SubbandMask(7, 5),
            {},
            ValueError,
            r"features: expected the chunks' feature count.*model is a SubbandMask",
        ),
        (SubbandMask(7, 5), {"features": 0}, ValueError, r"features: expected an integer >= 1"),
        (
            TwoInSeries(),
            {"features": FEATURES, "buckets": [2, 16]},
            ValueError,
            r"buckets: without 1, .*TwoInSeries.__call__ does not take",
        ),
        (
            SubbandMask(7, 5),
            {"features": FEATURES, "outputs": "host"},
            ValueError,
            r"outputs: expected one of \('numpy', 'device'\); received 'host'",
        ),
    ],
)
def test_models_that_cannot_stream_are_refused_with_the_reason(model, kwargs, error, message):
    variables = {"params": {"lstm": BANDED_PARAMS}}
    if isinstance(model, SubbandMask | TwoInSeries):
        variables = MASK_VARIABLES if isinstance(model, SubbandMask) else SERIES_VARIABLES
    with pytest.raises(error, match=message):
        Stream(model, variables, BATCH, BANDS, **kwargs)


def test_a_function_is_not_a_model():
    with pytest.raises(TypeError, match=r"model: expected a Flax module .*received function"):
        Stream(lambda v, s, x: (s, x), {}, BATCH, BANDS, features=FEATURES)
    with pytest.raises(TypeError, match=r"model: expected a Flax module"):
        stream_step(MASK_MODEL.apply)


def test_features_that_contradict_a_banded_lstms_variables_are_refused():
    lstm = BandedLSTM(5)
    with pytest.raises(ValueError, match=r"features: .*has 6 features; received features=4"):
        Stream(lstm, init_model(lstm, X), BATCH, BANDS, features=4)


def test_a_wrong_chunk_is_named_and_the_state_is_left_as_it_was():
    stream = Stream(MASK_MODEL, MASK_VARIABLES, BATCH, BANDS, max_chunk=8, features=FEATURES)
    stream(X[:, :, :5])
    before = jax.tree.map(np.asarray, stream.state)
    with pytest.raises(ValueError, match=r"chunk: expected 6 features"):
        stream(X[:, :, 5:9, :4])
    with pytest.raises(ValueError, match=r"chunk: expected shape \[batch, bands, time, features\]"):
        stream(X[:2, :, 5:9])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, stream.state), before)


def test_no_compilation_after_warmup_with_padded_pieces_and_device_outputs():
    for outputs in ("numpy", "device"):
        stream = Stream(
            MASK_MODEL,
            MASK_VARIABLES,
            BATCH,
            BANDS,
            8,
            buckets=[4, 8],
            features=FEATURES,
            outputs=outputs,
        )
        stream.warmup()
        warm = stream.compile_count
        rng = np.random.default_rng(7)
        start, pieces = 0, []
        while start < X.shape[2]:  # lengths 1 to 19: padded pieces, several pieces a call
            t = min(int(rng.integers(1, 20)), X.shape[2] - start)
            pieces.append(np.asarray(stream(X[:, :, start : start + t])))
            start += t
        assert stream.compile_count == warm, outputs
        np.testing.assert_allclose(np.concatenate(pieces, axis=2), mask_reference(X)[1], atol=ATOL)


def test_chunks_of_too_few_axes_are_a_value_error():
    stream = Stream(MASK_MODEL, MASK_VARIABLES, BATCH, BANDS, features=FEATURES)
    for chunk in (np.zeros(5, np.float32), [], np.float32(1.0)):
        with pytest.raises(ValueError, match=r"chunk: expected rank 4"):
            stream(chunk)


def test_packed_weights_that_came_with_the_variables_are_never_read():
    others = init_model(MASK_MODEL, X, seed=5)
    stale = Stream(MASK_MODEL, others, BATCH, BANDS, features=FEATURES)._step_variables
    stale = {**stale, "params": MASK_VARIABLES["params"]}  # these params, others' packing
    stream = Stream(MASK_MODEL, stale, BATCH, BANDS, features=FEATURES)
    np.testing.assert_allclose(stream(X[:, :, :6]), mask_reference(X[:, :, :6])[1], atol=ATOL)


class TakesAnything(nn.Module):
    @nn.compact
    def __call__(self, state, inputs, **kwargs):  # would drop seq_lengths
        return BandedLSTM(4, name="lstm")(state, inputs)


def test_a_model_taking_kwargs_does_not_count_as_masking_padding():
    variables = {"params": {"lstm": BANDED_PARAMS}}
    with pytest.raises(ValueError, match=r"buckets: without 1, .*TakesAnything"):
        Stream(TakesAnything(), variables, BATCH, BANDS, 4, buckets=[2, 4], features=FEATURES)
    Stream(TakesAnything(), variables, BATCH, BANDS, features=FEATURES)  # with 1: fine
