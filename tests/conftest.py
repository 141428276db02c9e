import jax
import pytest

# Strict numerics, as equinox tests do: implicit rank promotion is a bug.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)
