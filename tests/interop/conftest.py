"""Settings for the tests of the Keras layer (tests/conftest.py holds the rest)."""

import jax
import pytest


@pytest.fixture(autouse=True)
def keras_rank_promotion():
    """Keras's own layers (LSTM, Dense, Masking) and losses rely on implicit rank
    promotion, which tests/conftest.py makes an error; the interop code itself is
    checked under "raise" in test_layer_is_clean_under_strict_rank_promotion and
    test_keras_layer_names_bad_inputs."""
    with jax.numpy_rank_promotion("allow"):
        yield
