"""The dropout masks are drawn flat and reshaped (it compiles about four times
faster than a draw in the mask's shape): the same values as
``jax.random.bernoulli`` draws in that shape, for every key type JAX has and
either numbering of threefry's counters. Outside test_banded, whose tests run
once per path: the masks do not depend on it."""

import jax
import numpy as np
import pytest

from banded_rnn._banded import _keep_mask


@pytest.mark.parametrize(
    ("impl", "partitionable"),
    [("threefry2x32", True), ("threefry2x32", False), ("rbg", True), ("unsafe_rbg", True)],
)
def test_masks_are_jax_bernoulli_draws_in_their_shape(impl, partitionable):
    key = jax.random.key(3, impl=impl)
    shape = (3, 2, 7)  # [batch, bands, features]
    with jax.threefry_partitionable(partitionable):
        np.testing.assert_array_equal(
            _keep_mask(key, 0.7, shape), jax.random.bernoulli(key, 0.7, shape)
        )
