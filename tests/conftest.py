import os

# Keras reads its backend at first import; the interop tests need JAX.
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import pytest

# Strict numerics, as equinox tests do: implicit rank promotion is a bug.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)
