"""The cuDNN path (``implementation="cudnn"``, opt-in).

Everywhere: our parameters packed into cuDNN's flat layout, checked against
``jax.experimental.rnn``'s own unpacking; and the whole path, bands folded into
cuDNN's rows, lengths, state in and out, run with ``jax.experimental.rnn.lstm_ref``
(the pure-JAX reference of the same flat layout) in place of the cuDNN call,
against the float64 NumPy reference and the scan, with gradients. On a GPU the
same tests run cuDNN itself (checked in the compiled program), and one more
runs only there.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState
from jax.experimental import rnn

from banded_rnn import BandedLSTM
from banded_rnn._backends import _cudnn
from banded_rnn.training import make_train_step, masked_mean

from helpers import init_model, random_inputs, random_state
from reference import lstm_reference, params_from_variables

ON_GPU = _cudnn.platform_supported()
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (cuDNN's LSTM)")
BATCH, BANDS, TIME, FEATURES, UNITS = 3, 2, 9, 4, 5


def reference_lstm(x, h_0, c_0, weights, seq_lengths, *, input_size, hidden_size, num_layers,
                   dropout, bidirectional, precision=None):  # fmt: skip
    """``rnn.lstm``'s signature, run by ``rnn.lstm_ref`` on the unpacked weights."""
    del precision
    unpacked = rnn.unpack_lstm_weights(weights, input_size, hidden_size, num_layers, bidirectional)
    return rnn.lstm_ref(x, h_0, c_0, *unpacked, seq_lengths, input_size, hidden_size,
                        num_layers, dropout, bidirectional)  # fmt: skip


@pytest.fixture
def cudnn_calls(monkeypatch):
    """cuDNN's call replaced by the reference (on a machine without a GPU) and
    the platform taken for one with cuDNN; the list of calls traced."""
    calls = []

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return reference_lstm(*args, **kwargs)

    if not ON_GPU:
        monkeypatch.setattr(_cudnn, "cudnn_lstm", recorded)
        monkeypatch.setattr(_cudnn, "platform_supported", lambda: True)
    return calls


def ran_cudnn(calls, fn, *args) -> bool:
    """Whether ``fn(*args)`` goes through cuDNN: the traced calls of the
    stand-in, or, on a GPU, cuDNN's custom call in the lowered program."""
    if ON_GPU:
        return "cudnn_rnn" in jax.jit(fn).lower(*args).as_text()
    calls.clear()
    jax.eval_shape(fn, *args)
    return bool(calls)


def data(seed=0):
    x = random_inputs(seed, (BATCH, BANDS, TIME, FEATURES))
    lengths = np.array([[TIME, 4], [0, 7], [1, TIME]], np.int32)  # [batch, bands], a 0 too
    return x, lengths


def test_packing_is_cudnns_layout():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(FEATURES, 4 * UNITS)).astype(np.float32)
    recurrent = rng.normal(size=(UNITS, 4 * UNITS)).astype(np.float32)
    bias = rng.normal(size=4 * UNITS).astype(np.float32)
    flat = _cudnn.pack((kernel, recurrent, bias))
    assert flat.shape == (rnn.get_num_params_in_lstm(FEATURES, UNITS, 1, False),)
    w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(flat, FEATURES, UNITS, 1, False)
    np.testing.assert_array_equal(w_ih[0], kernel.T)
    np.testing.assert_array_equal(w_hh[0], recurrent.T)
    np.testing.assert_array_equal(b_ih[0], bias)
    np.testing.assert_array_equal(b_hh[0], np.zeros_like(bias))


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("lengths", ["none", "per_band"])
def test_outputs_and_state_match_the_float64_reference(cudnn_calls, num_layers, lengths):
    x, seq_lengths = data()
    seq_lengths = None if lengths == "none" else seq_lengths
    model = BandedLSTM(UNITS, num_layers=num_layers, implementation="cudnn")
    variables = init_model(model, x)
    state = random_state(model, BATCH, BANDS, seed=1)
    cudnn_calls.clear()  # init ran the model too
    with jax.default_matmul_precision("highest"):
        final, outputs = jax.jit(model.apply)(variables, state, x, seq_lengths=seq_lengths)
        scan = BandedLSTM(UNITS, num_layers=num_layers, implementation="scan")
        scan_final, scan_outputs = scan.apply(variables, state, x, seq_lengths=seq_lengths)
    assert len(cudnn_calls) == num_layers or ON_GPU
    assert ran_cudnn(cudnn_calls, model.apply, variables, state, x)
    ref_state, ref_outputs = lstm_reference(
        params_from_variables(variables), x, [tuple(s) for s in state], seq_lengths=seq_lengths
    )
    np.testing.assert_allclose(outputs, ref_outputs, atol=2e-5)
    np.testing.assert_allclose(outputs, scan_outputs, atol=2e-5)
    for got, scanned, (hidden, cell) in zip(final, scan_final, ref_state, strict=True):
        np.testing.assert_allclose(got.hidden, hidden, atol=2e-5)
        np.testing.assert_allclose(got.cell, cell, atol=2e-5)
        np.testing.assert_allclose(got.hidden, scanned.hidden, atol=2e-5)


def test_gradients_equal_the_scans(cudnn_calls):
    """Through the packing and the folded rows, gradients reach ``kernel``,
    ``recurrent_kernel``, ``bias``, the state and the inputs."""
    x, seq_lengths = data(2)
    variables = init_model(BandedLSTM(UNITS, num_layers=2), x)
    state = random_state(BandedLSTM(UNITS, num_layers=2), BATCH, BANDS, seed=3)
    target = random_inputs(4, (BATCH, BANDS, TIME, UNITS))

    def loss(implementation, variables, state, x):
        model = BandedLSTM(UNITS, num_layers=2, implementation=implementation)
        final, outputs = model.apply(variables, state, x, seq_lengths=seq_lengths)
        return jnp.sum((outputs - target) ** 2) + jnp.sum(final[-1].cell ** 2)

    with jax.default_matmul_precision("highest"):
        # Jitted: an eager gradient compiles every primitive of both passes apart.
        grads = jax.jit(jax.grad(partial(loss, "cudnn"), argnums=(0, 1, 2)))(variables, state, x)
        expected = jax.jit(jax.grad(partial(loss, "scan"), argnums=(0, 1, 2)))(variables, state, x)
    assert ran_cudnn(cudnn_calls, jax.grad(partial(loss, "cudnn")), variables, state, x)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_training_steps_with_dropout_equal_the_scans(cudnn_calls):
    """Input dropout between layers keeps its masks: three steps of SGD with
    lengths and one key for the batch (one per entry would vmap, which cuDNN's
    call cannot), as on the scan; the step runs its window in chunks of 4, so
    the lengths it passes on can exceed a chunk's 4 steps."""
    x, seq_lengths = data(5)
    y = random_inputs(6, (BATCH, BANDS, TIME, UNITS))
    keys = jax.random.key(7)
    step = make_train_step(masked_mean(lambda o, t: (o - t) ** 2), chunk_length=4)
    results = {}
    for implementation in ("cudnn", "scan"):
        model = BandedLSTM(UNITS, num_layers=2, dropout=0.3, implementation=implementation)
        params = init_model(model, x)["params"]
        train_state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
        # A zero state, not None: every step is then one program (each takes a second or more).
        state, losses = model.initial_state(BATCH, BANDS), []
        with jax.default_matmul_precision("highest"):
            for _ in range(3):
                train_state, state, metrics = step(
                    train_state, state, x, y, keys, seq_lengths=seq_lengths
                )
                losses.append(float(metrics["loss"]))
        results[implementation] = losses, jax.device_get(train_state.params), state
    np.testing.assert_allclose(results["cudnn"][0], results["scan"][0], rtol=1e-5)
    for got, want in zip(jax.tree.leaves(results["cudnn"][1:]),
                         jax.tree.leaves(results["scan"][1:]), strict=True):  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_cudnn_runs_only_where_asked_and_refuses_what_it_cannot_run(cudnn_calls):
    """The choice is made in Python: "auto" and "scan" never call cuDNN (it is
    opt-in until it has run on a GPU); "cudnn" refuses a mask, recurrent
    dropout in training and remat_chunk by name, and takes the rest."""
    x, seq_lengths = data()
    mask = np.arange(TIME) < seq_lengths[..., None]
    variables = init_model(BandedLSTM(UNITS), x)

    def trace(model, **kwargs):
        cudnn_calls.clear()
        jax.eval_shape(
            lambda v, x: model.apply(v, None, x, rngs={"dropout": jax.random.key(0)}, **kwargs),
            variables, x,
        )  # fmt: skip
        return bool(cudnn_calls)

    for implementation in ("auto", "scan"):
        assert not trace(BandedLSTM(UNITS, implementation=implementation), seq_lengths=seq_lengths)
    cudnn = partial(BandedLSTM, UNITS, implementation="cudnn")
    assert trace(cudnn(), seq_lengths=seq_lengths) or ON_GPU
    assert trace(cudnn(recurrent_dropout=0.2), deterministic=True) or ON_GPU
    assert trace(cudnn(dropout=0.2), deterministic=False) or ON_GPU
    refusals = [
        (cudnn(), {"mask": mask}, "it takes seq_lengths, not a mask"),
        (cudnn(recurrent_dropout=0.2), {"deterministic": False}, "it draws its own dropout"),
        (cudnn(remat_chunk=4), {}, r"it keeps its own residuals \(remat_chunk\)"),
    ]
    for model, kwargs, reason in refusals:
        with pytest.raises(ValueError, match=rf"implementation='cudnn': .*{reason}"):
            trace(model, **kwargs)


def test_cudnn_is_refused_without_a_gpu():
    if ON_GPU:
        pytest.skip("this machine has a GPU")
    x, _ = data()
    variables = init_model(BandedLSTM(UNITS), x)
    with pytest.raises(ValueError, match=r"implementation='cudnn': .*it runs on \('gpu', "):
        BandedLSTM(UNITS, implementation="cudnn").apply(variables, None, x)


def test_lengths_past_the_chunk_and_negative_ones_under_jit(cudnn_calls):
    """Traced int32 lengths reach the layer unclipped: longer than the chunk
    means every step, 0 or less none, as on the scan."""
    x, _ = data(9)
    lengths = np.array([[TIME + 5, 2**30], [-3, 0], [TIME, 1]], np.int32)
    model = BandedLSTM(UNITS, implementation="cudnn")
    variables = init_model(model, x)
    state = random_state(model, BATCH, BANDS, seed=10)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(model.apply)(variables, state, x, seq_lengths=lengths)
        scan = BandedLSTM(UNITS, implementation="scan")
        want = jax.jit(scan.apply)(variables, state, x, seq_lengths=lengths)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


@gpu_only
def test_on_the_gpu_chunked_equals_whole_to_rounding():
    x, seq_lengths = data(8)
    model = BandedLSTM(UNITS, num_layers=2, implementation="cudnn")
    variables = init_model(model, x)
    with jax.default_matmul_precision("highest"):
        whole_state, whole = model.apply(variables, None, x, seq_lengths=seq_lengths)
        state, first = model.apply(
            variables, None, x[:, :, :4], seq_lengths=np.minimum(seq_lengths, 4)
        )
        state, second = model.apply(
            variables, state, x[:, :, 4:], seq_lengths=np.maximum(seq_lengths - 4, 0)
        )
    np.testing.assert_allclose(np.concatenate([first, second], axis=2), whole, atol=1e-5)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(whole_state), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
