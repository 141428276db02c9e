"""Settings for the doctests collected from the packages (tests/conftest.py holds the rest)."""

import importlib.util

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
