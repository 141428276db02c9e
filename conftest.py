"""Settings for the whole run (the order modules start in) and for the doctests
collected from the packages; tests/conftest.py holds the rest."""

import importlib.util
import pathlib

import jax
import pytest
from _pytest.doctest import DoctestItem

# The ONNX export's modules import onnx, and its example runs onnxruntime: both
# are in the test extra (and the onnx extra); without them, their doctests are
# not collected rather than failing to import.
collect_ignore = (
    []
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime")
    else [f"banded_rnn/_streaming/_onnx{part}.py" for part in ("", "_graph", "_lstm", "_rules")]
)


@pytest.fixture(autouse=True)
def _keras_rank_promotion(request):
    """tests/conftest.py makes implicit rank promotion an error, which Keras's own
    LSTM code relies on: allowed in interop's examples, which run Keras layers."""
    if isinstance(request.node, DoctestItem) and request.node.name.startswith("interop."):
        with jax.numpy_rank_promotion("allow"):
            yield
    else:
        yield


# The scripts that tests run as processes of their own (tests/*/scripts/,
# benchmarks/scripts/) are no modules to collect: importing one would run it.
collect_ignore_glob = ["*/scripts/*.py"]


def pytest_addoption(parser, pluginmanager):
    """pyproject.toml's addopts start xdist's workers; with xdist blocked
    (``-p no:xdist``) its options there are taken here and ignored, and the
    suite runs in this one process, as with ``-n 0``."""
    if not pluginmanager.has_plugin("xdist"):
        group = parser.getgroup("xdist", "xdist's options, ignored: xdist is blocked")
        group.addoption("--numprocesses", dest="numprocesses")
        group.addoption("--maxprocesses", dest="maxprocesses")
        group.addoption("--dist", dest="dist")
        group.addoption("--no-loadscope-reorder", dest="loadscopereorder", action="store_false")


# The modules that take longest on two workers, longest first (--durations,
# benchmarks/NOTES.md entry 27). xdist hands a worker one whole module at a
# time (--dist=loadscope), in the order collected (--no-loadscope-reorder):
# the long ones start first and the short ones fill in at the end, so neither
# worker sits idle while the other runs a long module it started last. Only
# the order changes, never what runs; a module renamed or removed must leave
# this list too.
LONGEST_FIRST = (
    "tests/docs/test_docs.py",
    "tests/docs/test_readme.py",
    "tests/training/test_multihost.py",
    "tests/core/test_banded.py",
    "benchmarks/test_benchmarks.py",
    "tests/kernel/test_kernel.py",
    "tests/core/test_directions.py",
    "tests/training/test_training_lengths.py",
    "tests/interop/test_interop_parity.py",
    "tests/training/test_training_sharding.py",
)


def pytest_collection_modifyitems(config, items):
    """Moves LONGEST_FIRST's modules to the front, in its order; the others, and
    the tests within every module, keep the order they were collected in."""
    root = pathlib.Path(__file__).parent
    gone = [path for path in LONGEST_FIRST if not (root / path).is_file()]
    if gone:
        raise pytest.UsageError(f"conftest.py's LONGEST_FIRST names no such module: {gone}")
    rank = {path: position for position, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
