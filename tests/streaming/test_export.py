"""export_stream_step: a serialised step that a process with only jax and numpy can run."""

from pathlib import Path

import jax
import numpy as np
import pytest

from banded_rnn import BandedLSTM, export_stream_step

from helpers import init_model, random_inputs, run_script
from reference import lstm_reference, params_from_variables

BATCH, BANDS, FEATURES, UNITS, CHUNK = 2, 3, 4, 6, 3
MODEL = BandedLSTM(UNITS, num_layers=2)
X = random_inputs(0, (BATCH, BANDS, 4 * CHUNK, FEATURES))
VARIABLES = init_model(MODEL, X)
# A reset of sequence 1 before the third chunk.
RESETS = np.zeros((4, BATCH, BANDS), bool)
RESETS[2, 1] = True


@pytest.fixture(scope="module")
def blob():
    return export_stream_step(MODEL, VARIABLES, BATCH, BANDS, CHUNK)


def run_exported(exported):
    state = tuple(np.zeros((BATCH, BANDS, UNITS), np.float32) for _ in range(2 * MODEL.num_layers))
    outputs = []
    for k in range(4):
        state, y = exported.call(state, X[:, :, k * CHUNK : (k + 1) * CHUNK], RESETS[k])
        outputs.append(np.asarray(y))
    return np.concatenate(outputs, axis=2), [np.asarray(a) for a in state]


def test_exported_step_matches_reference_and_model(blob):
    outputs, state = run_exported(jax.export.deserialize(blob))
    params = params_from_variables(VARIABLES)
    reset_at = 2 * CHUNK
    # Sequence 0 runs through; sequence 1 restarts from zeros at the third chunk.
    final, expected = lstm_reference(params, X[:1])
    np.testing.assert_allclose(outputs[:1], expected, atol=2e-5)
    np.testing.assert_allclose(state[2][:1], final[1][0], atol=2e-5)  # hidden of layer 1
    _, before = lstm_reference(params, X[1:, :, :reset_at])
    _, after = lstm_reference(params, X[1:, :, reset_at:])
    np.testing.assert_allclose(outputs[1:], np.concatenate([before, after], 2), atol=2e-5)
    _, whole = MODEL.apply(VARIABLES, None, X[:1])
    assert np.max(np.abs(outputs[:1] - np.asarray(whole))) <= 1e-6
    _, fresh = MODEL.apply(VARIABLES, None, X[1:, :, reset_at:])
    assert np.max(np.abs(outputs[1:, :, reset_at:] - np.asarray(fresh))) <= 1e-6


def test_signature_is_flat_arrays(blob):
    exported = jax.export.deserialize(blob)
    shapes = [(a.shape, str(a.dtype)) for a in exported.in_avals]
    assert shapes == [((BATCH, BANDS, UNITS), "float32")] * 4 + [
        ((BATCH, BANDS, CHUNK, FEATURES), "float32"),
        ((BATCH, BANDS), "bool"),
    ]


def test_a_fresh_process_with_only_jax_and_numpy_reproduces_the_outputs_exactly(blob, tmp_path):
    (tmp_path / "step.jax").write_bytes(blob)
    np.savez(tmp_path / "data.npz", inputs=X, resets=RESETS, chunk=CHUNK)
    files = [tmp_path / name for name in ("step.jax", "data.npz", "out.npz")]
    run_script(Path(__file__).parent / "scripts" / "run_exported_step.py", *files, cwd=tmp_path)
    fresh = np.load(tmp_path / "out.npz")
    outputs, state = run_exported(jax.export.deserialize(blob))
    np.testing.assert_array_equal(fresh["outputs"], outputs)
    np.testing.assert_array_equal(fresh["state"], np.stack(state))
    _, whole = MODEL.apply(VARIABLES, None, X[:1])
    assert np.max(np.abs(fresh["outputs"][:1] - np.asarray(whole))) <= 1e-6


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"chunk_length": 0}, ValueError, r"chunk_length: expected an integer >= 1; received 0"),
        ({"batch_size": 2.5}, ValueError, r"batch_size: expected an integer >= 1"),
        ({"dtype": np.int16}, TypeError, r"dtype: expected a floating dtype; received int16"),
        ({"variables": {"params": {}}}, ValueError, r"variables: expected BandedLSTM variables"),
        (
            {"model": BandedLSTM(UNITS + 1, num_layers=2)},
            ValueError,
            r"variables: expected those of BandedLSTM\(units=7",
        ),
    ],
)
def test_bad_arguments(kwargs, error, message):
    arguments = dict(
        model=MODEL, variables=VARIABLES, batch_size=BATCH, num_bands=BANDS, chunk_length=CHUNK
    )
    with pytest.raises(error, match=message):
        export_stream_step(**{**arguments, **kwargs})
