"""Chunked equals whole bit for bit, on trained weights.

Every time step runs the same arithmetic whatever the chunk length (one
projection formula per layer, and ``Stream`` never pads while its buckets
include 1),
so feeding a sequence in pieces, state threaded, reproduces the whole run
exactly. The weights are trained first: a freshly initialised model has
small, regular weights that can hide rounding differences. Every test runs on
both paths: ``auto`` (the native CPU kernel, on CPU) and the XLA ``scan``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState

from banded_rnn import BandedLSTM, Stream
from banded_rnn.training import make_train_step

from helpers import init_model, random_inputs
from reference import lstm_reference, params_from_variables

BATCH, BANDS, TIME, FEATURES = 3, 4, 60, 5
X = random_inputs(0, (BATCH, BANDS, TIME, FEATURES))


@pytest.fixture(scope="module", params=["auto", "scan"])
def model(request):
    return BandedLSTM(24, num_layers=2, implementation=request.param)


@pytest.fixture(scope="module")
def trained(model):
    """Variables after 40 Adam steps on a target the model can learn, and the
    whole-sequence run with them."""
    params = init_model(model, X[:, :, :8])["params"]
    train_state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(3e-2))
    target = np.tanh(np.cumsum(X[..., :1], axis=2) / 4).repeat(24, axis=-1)
    step = make_train_step(lambda out, y: jnp.mean((out - y) ** 2))
    losses = []
    for _ in range(40):
        train_state, _, metrics = step(train_state, None, X, target)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]  # it did train
    variables = {"params": train_state.params}
    whole_state, whole = jax.jit(model.apply)(variables, None, X)
    # The whole run itself agrees with the float64 reference.
    _, expected = lstm_reference(params_from_variables(variables), X)
    np.testing.assert_allclose(whole, expected, atol=5e-5)
    return variables, whole_state, np.asarray(whole)


def _apply_in_chunks(apply, variables, chunk_length):
    """``X`` fed to ``apply`` in consecutive chunks, the state threaded:
    ``(final_state, outputs)``."""
    state, pieces = None, []
    for start in range(0, TIME, chunk_length):
        state, y = apply(variables, state, X[:, :, start : start + chunk_length])
        pieces.append(np.asarray(y))
    return state, np.concatenate(pieces, axis=2)


@pytest.mark.parametrize("chunk_length", [1, 2, 3, 4, 5, 7, 16, 59])
def test_apply_in_chunks_equals_whole_bit_for_bit(model, trained, chunk_length):
    variables, whole_state, whole = trained
    state, outputs = _apply_in_chunks(jax.jit(model.apply), variables, chunk_length)
    np.testing.assert_array_equal(outputs, whole)
    jax.tree.map(np.testing.assert_array_equal, state, whole_state)


def test_remat_and_unroll_equal_the_plain_run_bit_for_bit(model, trained):
    variables, whole_state, whole = trained
    for variant in (model.clone(remat_chunk=7), model.clone(unroll=4)):
        state, y = jax.jit(variant.apply)(variables, None, X)
        np.testing.assert_array_equal(np.asarray(y), whole)
        jax.tree.map(np.testing.assert_array_equal, state, whole_state)


@pytest.mark.parametrize("seed", [0, 1])
def test_stream_of_random_chunk_lengths_equals_whole_bit_for_bit(model, trained, seed):
    variables, whole_state, whole = trained
    stream = Stream(model, variables, BATCH, BANDS, max_chunk=16)
    rng = np.random.default_rng(seed)
    start, pieces = 0, []
    while start < TIME:
        length = int(rng.integers(1, 24))  # longer than max_chunk too
        pieces.append(stream(X[:, :, start : start + length]))
        start += length
    np.testing.assert_array_equal(np.concatenate(pieces, axis=2), whole)
    jax.tree.map(np.testing.assert_array_equal, stream.state, whole_state)


@pytest.mark.parametrize("model", ["scan"], indirect=True)  # the kernel has one formula
def test_the_two_matmul_formula_of_large_layers_is_exact_too(model, trained, monkeypatch):
    from banded_rnn._backends import _scan

    monkeypatch.setattr(_scan, "FUSED_MAX_BYTES", 0)  # every layer as if larger than 1 MiB
    variables = trained[0]
    apply = jax.jit(lambda v, s, x: model.apply(v, s, x))  # traced afresh, under the patch
    whole_state, whole = apply(variables, None, X)
    assert not np.array_equal(np.asarray(whole), trained[2])  # the other formula did run
    for chunk_length in (1, 3, 16):
        state, outputs = _apply_in_chunks(apply, variables, chunk_length)
        np.testing.assert_array_equal(outputs, whole)
        jax.tree.map(np.testing.assert_array_equal, state, whole_state)
    stream = Stream(model, variables, BATCH, BANDS, max_chunk=16)
    streamed = [stream(X[:, :, start : start + 13]) for start in range(0, TIME, 13)]
    np.testing.assert_array_equal(np.concatenate(streamed, axis=2), whole)
