"""``export_onnx``: the exported streaming call, run in onnxruntime with the
state threaded through it, equals ``apply``, ``Stream`` and the float64
reference; what ONNX cannot express is refused by name.

Tolerances are 1e-5: onnxruntime computes in its own kernels, so results
agree to float32 rounding, never bit for bit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from banded_rnn import BandedLSTM, LSTMState, Stream, export_onnx

from helpers import (
    ROOT,
    SubbandMask,
    TwoInSeries,
    init_model,
    random_inputs,
    random_lengths,
    random_state,
    run_chunks,
    run_script,
)
from reference import (
    directional_reference,
    lstm_reference,
    params_from_variables,
    subband_mask_reference,
)

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TOLERANCE = 1e-5


def session(model, variables, tmp_path, bands, **kwargs):
    """The model exported to a file and loaded in onnxruntime (2 threads)."""
    path = tmp_path / "model.onnx"
    export_onnx(model, variables, path, num_bands=bands, **kwargs)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, chunk, state):
    """One call: ``chunk`` and the state's leaves in; the outputs and the new
    state (the same structure) out."""
    names = [i.name for i in sess.get_inputs()]
    leaves, treedef = jax.tree.flatten(state)
    outputs, *final = sess.run(None, dict(zip(names, [chunk, *leaves], strict=True)))
    return jax.tree.unflatten(treedef, final), outputs


def run_onnx_chunks(sess, inputs, state, lengths):
    """``inputs`` in chunks of ``lengths`` steps with the state threaded through."""
    outputs, start = [], 0
    for t in lengths:
        state, y = run(sess, np.ascontiguousarray(inputs[:, :, start : start + t]), state)
        outputs.append(y)
        start += t
    return state, np.concatenate(outputs, axis=2)


def zeros_like(state):
    return jax.tree.map(lambda leaf: np.zeros(leaf.shape, np.float32), state)


def assert_close(actual, expected, rtol=0.0):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=TOLERANCE)


def max_diff(actual, expected) -> float:
    pairs = zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    return max(float(np.abs(np.asarray(a) - np.asarray(e)).max()) for a, e in pairs)


# --- parity ---------------------------------------------------------------------------


@pytest.mark.parametrize("units", [3, 64])
def test_seed_model_streamed_in_random_chunks_matches_apply_stream_and_reference(units, tmp_path):
    batch, bands, time = 2, 3, 40
    model = BandedLSTM(units=units)
    inputs = random_inputs(0, (batch, bands, time, 4))
    variables = init_model(model, inputs)
    sess = session(model, variables, tmp_path, bands)
    lengths = random_lengths(1, time, 9)
    state, outputs = run_onnx_chunks(sess, inputs, zeros_like(model.initial_state(2, 3)), lengths)

    final, expected = model.apply(variables, None, inputs)
    assert_close(outputs, expected)
    assert_close(state, final)
    stream = Stream(model, variables, batch, bands, max_chunk=8)
    assert_close(outputs, run_chunks(stream, inputs, lengths))
    assert_close(state, stream.state)
    reference_state, reference = lstm_reference(params_from_variables(variables), inputs)
    assert_close(outputs, reference)
    assert_close(state, [LSTMState(*s) for s in reference_state])


def assert_matches_apply_and_reference(model, variables, state, inputs, final, outputs, **options):
    """ONNX's ``final`` and ``outputs`` from ``state`` over ``inputs`` equal
    ``apply``'s and the float64 reference's (``options``: its keywords)."""
    expected_final, expected = model.apply(variables, state, inputs)
    assert_close(outputs, expected)
    assert_close(final, expected_final)
    reference_state, reference = directional_reference(variables, inputs, state=state, **options)
    assert_close(outputs, reference)
    assert_close(final, [LSTMState(*s) for s in reference_state])


BACKWARD = [{"bidirectional": True, "merge_mode": m} for m in ("concat", "sum", "mul", "ave")]
BACKWARD += [{"reverse": True, "keep_order": keep} for keep in (False, True)]


@pytest.mark.parametrize("options", BACKWARD, ids=lambda o: "-".join(map(str, o.values())))
def test_two_layer_bidirectional_and_reversed_stacks_on_whole_sequences(options, tmp_path):
    model = BandedLSTM(units=5, num_layers=2, **options)
    inputs = random_inputs(2, (2, 3, 11, 4))
    variables = init_model(model, inputs)
    state = random_state(model, 2, 3, seed=3)
    final, outputs = run(session(model, variables, tmp_path, 3), inputs, state)
    reference_options = {"merge" if k == "merge_mode" else k: v for k, v in options.items()}
    assert_matches_apply_and_reference(
        model, variables, state, inputs, final, outputs, **reference_options
    )


def test_model_without_bias_streamed_in_chunks(tmp_path):
    model = BandedLSTM(units=7, num_layers=2, use_bias=False)
    inputs = random_inputs(6, (2, 3, 30, 4))
    variables = init_model(model, inputs)
    assert "bias" not in variables["params"]["layer_0"]
    state = random_state(model, 2, 3, seed=7)
    lengths = random_lengths(8, 30, 7)
    final, outputs = run_onnx_chunks(session(model, variables, tmp_path, 3), inputs, state, lengths)
    assert_matches_apply_and_reference(model, variables, state, inputs, final, outputs)


def test_subband_model_with_layers_before_and_after(tmp_path):
    """tests/helpers.py's SubbandMask: a dense encoder, two LSTM layers with
    dropout (off in inference), a sigmoid mask times the inputs."""
    batch, bands, time, features = 2, 5, 24, 4
    model = SubbandMask(hidden=8, units=16)
    inputs = random_inputs(9, (batch, bands, time, features))
    variables = init_model(model, inputs, seed=1)
    sess = session(model, variables, tmp_path, bands, features=features)
    lengths = random_lengths(10, time, 6)
    zeros = zeros_like(model.apply(variables, None, inputs[:, :, :1])[0])
    state, outputs = run_onnx_chunks(sess, inputs, zeros, lengths)

    final, expected = model.apply(variables, None, inputs)
    assert_close(outputs, expected)
    assert_close(state, final)
    stream = Stream(model, variables, batch, bands, max_chunk=4, features=features)
    assert_close(outputs, run_chunks(stream, inputs, lengths))
    reference_state, reference = subband_mask_reference(variables["params"], inputs)
    assert_close(outputs, reference)
    assert_close(state, [LSTMState(*s) for s in reference_state])


def test_two_lstms_in_series_with_a_dict_state(tmp_path):
    model = TwoInSeries()
    inputs = random_inputs(11, (3, 2, 10, 4))
    variables = init_model(model, inputs, seed=2)
    sess = session(model, variables, tmp_path, 2, features=4)
    assert [i.name for i in sess.get_inputs()][:3] == [
        "chunk",
        "state.high.0.hidden",
        "state.high.0.cell",
    ]
    assert [o.name for o in sess.get_outputs()][-2:] == [
        "final_state.low.0.hidden",
        "final_state.low.0.cell",
    ]
    zeros = zeros_like(model.apply(variables, None, inputs)[0])
    state, outputs = run_onnx_chunks(sess, inputs, zeros, [3, 1, 6])
    final, expected = model.apply(variables, None, inputs)
    assert_close(outputs, expected)
    assert_close(state, final)


class RichHead(nn.Module):
    """Layers a model typically has around its LSTMs: a learned per-band
    embedding broadcast over batch and time, layer norm, GELU, a reshape of
    two dynamic axes, leaky ReLU by ``where``, softmax, slices and an index
    (gathers, with a symbolic batch and time), clipping."""

    @nn.compact
    def __call__(self, state, inputs, *, deterministic=True):
        embedding = self.param("bands", nn.initializers.normal(0.5), (inputs.shape[1], 1, 2))
        x = jnp.concatenate([inputs, jnp.broadcast_to(embedding, (*inputs.shape[:3], 2))], -1)
        x = nn.gelu(nn.Dense(8)(nn.LayerNorm()(x)))
        state, h = BandedLSTM(6, num_layers=2)(state, x, deterministic=deterministic)
        pairs = h.reshape(*h.shape[:3], 3, 2).sum(-1)
        logits = nn.Dense(3)(jnp.where(pairs > 0, pairs, 0.1 * pairs))
        probabilities = jax.nn.softmax(logits, axis=-1)
        last = jnp.clip(h[..., 1], -0.3, 0.3)[..., None] ** 3
        return state, jnp.concatenate([probabilities[..., :2], last], -1)


def test_common_layers_around_the_lstm_are_mapped(tmp_path):
    model = RichHead()
    inputs = random_inputs(12, (2, 3, 12, 4))
    variables = init_model(model, inputs, seed=3)
    sess = session(model, variables, tmp_path, 3, features=4)
    zeros = zeros_like(model.apply(variables, None, inputs)[0])
    state, outputs = run_onnx_chunks(sess, inputs, zeros, [5, 1, 6])
    final, expected = model.apply(variables, None, inputs)
    assert_close(outputs, expected)
    assert_close(state, final)


def test_reset_is_a_zero_state_passed_in(tmp_path):
    model = BandedLSTM(units=8)
    inputs = random_inputs(13, (2, 3, 16, 4))
    variables = init_model(model, inputs)
    sess = session(model, variables, tmp_path, 3)
    state, _ = run(sess, inputs[:, :, :10], zeros_like(model.initial_state(2, 3)))
    state = tuple(LSTMState(*(leaf.copy() for leaf in s)) for s in state)
    for leaf in jax.tree.leaves(state):
        leaf[0] = 0.0  # sequence 0 restarts; sequence 1 carries on
    _, outputs = run(sess, inputs[:, :, 10:], state)

    stream = Stream(model, variables, 2, 3, max_chunk=16)
    stream(inputs[:, :, :10])
    stream.reset(batch=[0])
    assert_close(outputs, stream(inputs[:, :, 10:]))
    _, restarted = model.apply(variables, None, inputs[:1, :, 10:])
    assert_close(outputs[:1], restarted)


def test_one_file_runs_any_batch_size_and_chunk_length(tmp_path):
    model = BandedLSTM(units=4, num_layers=2)
    inputs = random_inputs(14, (5, 3, 13, 4))
    variables = init_model(model, inputs)
    sess = session(model, variables, tmp_path, 3)
    dims = [
        [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in _inputs(tmp_path)
    ]
    assert dims[0] == ["batch", 3, "time", 4] and dims[1] == ["batch", 3, 4]
    for batch, time in [(1, 1), (5, 13), (2, 3)]:
        x = inputs[:batch, :, :time]
        final, outputs = run(sess, x, zeros_like(model.initial_state(batch, 3)))
        expected_final, expected = model.apply(variables, None, x)
        assert outputs.shape == (batch, 3, time, 4)
        assert_close(outputs, expected)
        assert_close(final, expected_final)


def _inputs(tmp_path):
    import onnx

    return onnx.load(tmp_path / "model.onnx").graph.input


@pytest.mark.parametrize(
    "activation, recurrent_activation",
    [
        ("relu", "hard_sigmoid"),
        ("linear", "sigmoid"),
        ("softsign", "softplus"),
        ("elu", "leaky_relu"),
    ],
)
def test_activations_that_onnx_lstm_takes(activation, recurrent_activation, tmp_path):
    model = BandedLSTM(units=5, activation=activation, recurrent_activation=recurrent_activation)
    inputs = random_inputs(15, (2, 3, 8, 4))
    variables = init_model(model, inputs, bias_scale=0.1)
    state = random_state(model, 2, 3, seed=16)
    final, outputs = run(session(model, variables, tmp_path, 3), inputs, state)
    expected_final, expected = model.apply(variables, state, inputs)
    # Unbounded gates (softplus, leaky_relu) grow the cell state past 100.
    assert_close(outputs, expected, rtol=1e-5)
    assert_close(final, expected_final, rtol=1e-5)


def test_each_layer_is_one_onnx_lstm_operator(tmp_path):
    import onnx

    for model, count in [
        (BandedLSTM(units=4, num_layers=3), 3),
        (BandedLSTM(units=4, num_layers=2, bidirectional=True), 2),
    ]:
        variables = init_model(model, random_inputs(0, (1, 3, 2, 4)))
        proto = export_onnx(model, variables, tmp_path / "m.onnx", num_bands=3)
        assert [n.op_type for n in proto.graph.node].count("LSTM") == count
        assert onnx.load(tmp_path / "m.onnx").opset_import[0].version >= 14


# --- the example: a consumer that keeps the state outside the model -------------------


def test_example_streams_a_file_frame_by_frame(tmp_path):
    model = SubbandMask(hidden=8, units=12)
    frames = random_inputs(17, (20, 4, 3))  # [time, bands, features]
    variables = init_model(model, frames[None].transpose(0, 2, 1, 3), seed=4)
    export_onnx(model, variables, tmp_path / "model.onnx", num_bands=4, features=3)
    np.save(tmp_path / "frames.npy", frames)
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "onnx_stream.py"), "model.onnx", "frames.npy"]
        + ["outputs.npy"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _, expected = model.apply(variables, None, frames.transpose(1, 0, 2)[None])
    assert_close(np.load(tmp_path / "outputs.npy"), np.asarray(expected)[0].transpose(1, 0, 2))


# --- refusals -------------------------------------------------------------------------


class Calls(nn.Module):
    """A BandedLSTM ``lstm`` called with ``keywords`` (e.g. a mask)."""

    lstm: BandedLSTM
    keywords: dict

    @nn.compact
    def __call__(self, state, inputs):
        extra = {k: v(inputs) if callable(v) else v for k, v in self.keywords.items()}
        return self.lstm(state, inputs, **extra)


@pytest.mark.parametrize(
    "keywords, name",
    [
        ({"seq_lengths": lambda x: jnp.full(x.shape[:1], 2, jnp.int32)}, "seq_lengths"),
        ({"mask": lambda x: jnp.ones(x.shape[:1] + x.shape[2:3], bool)}, "mask"),
        ({"deterministic": False}, "dropout"),
    ],
)
def test_call_arguments_onnx_cannot_express_are_refused_by_name(keywords, name, tmp_path):
    model = Calls(BandedLSTM(4, dropout=0.5), keywords)
    keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    variables = model.init(keys, None, random_inputs(0, (1, 3, 2, 4)))
    with pytest.raises(ValueError, match=rf"^{name}: the BandedLSTM at lstm"):
        export_onnx(model, variables, tmp_path / "m.onnx", num_bands=3, features=4)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    "options, name",
    [
        ({"activation": "gelu"}, "activation"),
        ({"recurrent_activation": lambda x: jax.nn.sigmoid(2 * x)}, "recurrent_activation"),
        ({"time_major": True}, "time_major"),
    ],
)
def test_options_onnx_cannot_express_are_refused_by_name(options, name, tmp_path):
    model = BandedLSTM(4, **options)
    inputs = random_inputs(0, (2, 1, 3, 4) if options.get("time_major") else (1, 3, 2, 4))
    variables = init_model(model, inputs)
    with pytest.raises(ValueError, match=rf"^{name}: "):
        export_onnx(model, variables, tmp_path / "m.onnx", num_bands=3, features=4)


class CumulativeHead(nn.Module):
    @nn.compact
    def __call__(self, state, inputs):
        state, h = BandedLSTM(4, name="lstm")(state, inputs)
        return state, jnp.cumsum(h, axis=-1)


def test_a_primitive_with_no_onnx_mapping_is_refused_by_name(tmp_path):
    model = CumulativeHead()
    variables = init_model(model, random_inputs(0, (1, 3, 2, 4)))
    with pytest.raises(ValueError, match=r"^model: the primitive 'cumsum'"):
        export_onnx(model, variables, tmp_path / "m.onnx", num_bands=3, features=4)


def test_non_float32_models_and_non_modules_are_refused(tmp_path):
    with jax.enable_x64(True):
        model = BandedLSTM(4, param_dtype=jnp.float64)
        variables = model.init(jax.random.key(0), None, random_inputs(0, (1, 3, 2, 4)))
        with pytest.raises(TypeError, match=r"^dtype: ONNX export runs BandedLSTM in float32"):
            export_onnx(model, variables, tmp_path / "m.onnx", num_bands=3)
    with pytest.raises(TypeError, match=r"^model: expected a Flax module"):
        export_onnx(lambda state, x: (state, x), {}, tmp_path / "m.onnx", num_bands=3)


def test_importing_the_package_imports_no_onnx():
    done = run_script(Path(__file__).parent / "scripts" / "imports_no_onnx.py")
    assert done.stdout.split() == ["ok"], done.stdout
