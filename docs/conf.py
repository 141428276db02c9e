"""Sphinx configuration: MyST pages and notebooks (myst-nb, executed at build
time), an API reference from the docstrings (autodoc, Google style), the JAX
ecosystem's book theme. Built by ``python docs/build.py``; CI builds it with
warnings as errors."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KERAS_BACKEND", "jax")  # the interop reference imports keras

import banded_rnn  # noqa: E402

project = "banded_rnn"
author = "the banded_rnn authors"
copyright = "2026, the banded_rnn authors"
release = version = banded_rnn.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
exclude_patterns = ["_build", "build.py", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
nitpicky = True
# Names from other projects' docs: no intersphinx (the build is offline), so
# references to them are left as plain code rather than reported as broken.
nitpick_ignore_regex = [
    ("py:.*", r"(jax|jaxlib|flax|optax|orbax|keras|numpy|np|torch|nn|onnx|collections|typing)\b.*"),
    ("py:.*", r"(Any|Callable|Sequence|Mapping|NamedTuple|Iterator|Metrics|LossFn|Rng|Shape)"),
    ("py:.*", r"(TrainState|Mesh|NamedSharding|PartitionSpec|State|StepFn|LayerWeights)"),
    ("py:.*", r"(Initializer|Dtype|PRNGKey|Array)"),  # flax's and jax's type aliases
    ("py:.*", r"(Hashable|Future|concurrent\..*|asyncio\..*|argparse\..*)"),  # the stdlib's
    ("py:.*", r"(ArrayLike|PathLike|os\..*|int|float|bool|str|bytes|None|dict|list|tuple)"),
    ("py:.*", r".*\._\w+"),  # private helpers named in signatures and base classes
]

# Notebooks: executed on every build; an error, or anything on stderr, fails it.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 600
nb_output_stderr = "warn"
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # NamedTuple fields are documented once, by autodoc


def _public_modules() -> None:
    """Documents every public name under the module it is imported from
    (``banded_rnn.training.fit``, not ``banded_rnn.training._loop.fit``), so
    that a docstring's ``:meth:`` and ``:class:`` references resolve there."""
    import banded_rnn.serving
    import banded_rnn.training
    import interop

    for module in (banded_rnn, banded_rnn.training, banded_rnn.serving, interop):
        for name in module.__all__:
            obj = getattr(module, name)
            if getattr(obj, "__module__", "").startswith(module.__name__ + "._"):
                obj.__module__ = module.__name__


_public_modules()

html_theme = "sphinx_book_theme"
html_title = "banded_rnn"
html_theme_options = {"show_toc_level": 2, "navigation_with_keys": False}
html_static_path: list[str] = []


def _copy_notebooks(app) -> None:
    """The notebooks live in notebooks/ (the test suite and readers run them
    there); the site renders copies, executed afresh."""
    target = DOCS / "notebooks"
    target.mkdir(exist_ok=True)
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        shutil.copy2(notebook, target / notebook.name)


def setup(app):
    app.connect("builder-inited", _copy_notebooks)
