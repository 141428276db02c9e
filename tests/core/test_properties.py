"""Property tests: chunked equals whole, bands are independent, vmap equals a loop."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from banded_rnn import BandedLSTM

from helpers import init_model, random_inputs

# 8 steps hold every kind of cut (first step, last step, runs of one-step
# chunks, lengths of 0, partial, whole and past the end); each distinct chunk
# length is a program of its own to compile.
BATCH, BANDS, TIME, FEATURES = 2, 3, 8, 3
MODELS = {
    "plain": BandedLSTM(6, num_layers=2),
    "dropout": BandedLSTM(6, num_layers=2, dropout=0.25, recurrent_dropout=0.3),
}
X = random_inputs(0, (BATCH, BANDS, TIME, FEATURES))
VARIABLES = init_model(MODELS["plain"], X)
SETTINGS = settings(max_examples=20, deadline=None)


@jax.jit
def _apply_plain(variables, state, x, seq_lengths):
    return MODELS["plain"].apply(variables, state, x, seq_lengths=seq_lengths)


@jax.jit
def _apply_dropout(variables, state, x, seq_lengths, key):
    return MODELS["dropout"].apply(
        variables, state, x, seq_lengths=seq_lengths, deterministic=False, rngs={"dropout": key}
    )


def run_chunked(apply, x, cuts, lengths):
    state, outputs, start = None, [], 0
    for stop in [*cuts, x.shape[2]]:
        chunk_lengths = None if lengths is None else np.clip(lengths - start, 0, None)
        state, y = apply(state, x[:, :, start:stop], chunk_lengths)
        outputs.append(y)
        start = stop
    return state, jnp.concatenate(outputs, axis=2)


cuts_strategy = st.lists(st.integers(1, TIME - 1), max_size=5, unique=True).map(sorted)
lengths_strategy = st.one_of(
    st.none(),
    st.lists(st.integers(0, TIME + 2), min_size=BATCH * BANDS, max_size=BATCH * BANDS).map(
        lambda v: np.array(v, np.int32).reshape(BATCH, BANDS)
    ),
)


@SETTINGS
@given(cuts=cuts_strategy, lengths=lengths_strategy, dropout=st.booleans(), seed=st.integers(0, 3))
def test_chunked_equals_whole(cuts, lengths, dropout, seed):
    if dropout:
        key = jax.random.key(seed)
        apply = lambda s, x, n: _apply_dropout(VARIABLES, s, x, n, key)  # noqa: E731
    else:
        apply = lambda s, x, n: _apply_plain(VARIABLES, s, x, n)  # noqa: E731
    whole_state, whole = apply(None, X, lengths)
    chunk_state, chunked = run_chunked(apply, X, cuts, lengths)
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-6)
    for a, b in zip(jax.tree.leaves(chunk_state), jax.tree.leaves(whole_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@SETTINGS
@given(
    band=st.integers(0, BANDS - 1),
    value=st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e6]),
    start=st.integers(0, TIME - 1),
)
def test_changing_one_band_changes_no_other(band, value, start):
    _, y = _apply_plain(VARIABLES, None, X, None)
    x = X.copy()
    x[:, band, start:] = value
    _, y_changed = _apply_plain(VARIABLES, None, x, None)
    others = [j for j in range(BANDS) if j != band]
    np.testing.assert_array_equal(np.asarray(y_changed)[:, others], np.asarray(y)[:, others])


@SETTINGS
@given(extra=st.integers(1, 4), seed=st.integers(0, 100))
def test_vmap_equals_loop(extra, seed):
    xs = random_inputs(seed, (extra, BATCH, BANDS, 5, FEATURES))
    _, ys = jax.vmap(lambda x: _apply_plain(VARIABLES, None, x, None))(xs)
    for e in range(extra):
        _, y = _apply_plain(VARIABLES, None, xs[e], None)
        np.testing.assert_allclose(ys[e], y, rtol=0, atol=1e-6)
