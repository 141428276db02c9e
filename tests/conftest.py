import atexit
import os
import shutil
import tempfile

# Keras reads its backend at first import; the interop tests need JAX.
os.environ.setdefault("KERAS_BACKEND", "jax")

# One compilation cache for the run's pytest processes (xdist's workers), in a
# fresh folder removed at the end: a program one worker compiled, or this one
# compiled for an earlier test, is loaded instead of compiled again. Scripts
# started by the tests do not use it. A cache of one's own is kept.
_CACHE = "BANDED_RNN_TESTS_JAX_CACHE"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and _CACHE not in os.environ:
    os.environ[_CACHE] = tempfile.mkdtemp(prefix="banded-rnn-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ[_CACHE], ignore_errors=True)

import jax  # noqa: E402 (after the environment it reads)
import pytest  # noqa: E402

# Strict numerics, as equinox tests do: implicit rank promotion is a bug.
jax.config.update("jax_numpy_rank_promotion", "raise")

if _CACHE in os.environ:
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def key():
    return jax.random.key(0)
