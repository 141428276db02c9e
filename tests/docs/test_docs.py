"""The documentation site builds with warnings as errors, every notebook and
executable page run at build time (an error, or anything on stderr, fails it),
every public name is in the API reference, and the README's command serves it.

Building once takes about a minute: it executes the notebooks, which is how
the suite runs them.
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request

import nbformat
import pytest
from sphinx.util.inventory import InventoryFile

import banded_rnn
import banded_rnn.serving
import banded_rnn.training
import interop

from helpers import ROOT

DOCS = ROOT / "docs"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Containers of results, an exception, a type alias, and the two classes whose
# builders (make_train_step, make_eval_step) carry the examples.
NO_EXAMPLE = {
    "banded_rnn.State",
    "banded_rnn.serving.BatcherFullError",
    "banded_rnn.training.Chunk",
    "banded_rnn.training.EvalStep",
    "banded_rnn.training.FitResult",
    "banded_rnn.training.NonFiniteError",
    "banded_rnn.training.Restored",
    "banded_rnn.training.TrainStep",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built from scratch as CI builds it."""
    output = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, str(DOCS / "build.py"), "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    warnings = [line for line in done.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    assert done.returncode == 0, "\n".join(warnings) or done.stderr[-6000:]
    return output


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_notebook_states_its_claims_and_is_in_the_site(path):
    """The notebooks state their claims as ``assert`` lines, which the build runs."""
    code = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    assert any("assert " in source for source in code), f"{path.name}: no claim is asserted"
    assert f"notebooks/{path.stem}" in (DOCS / "index.md").read_text()


def test_the_site_builds_and_renders_every_notebook_with_its_figures(site):
    for page in ["index", "getting_started", "api", "changelog", "citing"]:
        assert (site / f"{page}.html").is_file()
    for path in NOTEBOOKS:
        assert (site / "notebooks" / f"{path.stem}.html").is_file()
    assert "<img" in (site / "getting_started.html").read_text()  # the figure
    assert "<img" in (site / "notebooks" / "training.html").read_text()
    assert "<img" in (site / "guides" / "serving.html").read_text()  # latency against clients


def test_every_public_name_has_a_doctested_example():
    """The examples run as doctests (pytest --doctest-modules)."""
    for module in (banded_rnn, banded_rnn.training, banded_rnn.serving, interop):
        for name in module.__all__:
            if f"{module.__name__}.{name}" not in NO_EXAMPLE:
                assert ">>>" in (getattr(module, name).__doc__ or ""), f"{module.__name__}.{name}"


def test_every_public_name_is_in_the_api_reference(site):
    with open(site / "objects.inv", "rb") as file:
        inventory = InventoryFile.load(file, "", lambda base, uri: uri)
    documented = {name for kind in inventory.values() for name in kind}
    for module in (banded_rnn, banded_rnn.training, banded_rnn.serving, interop):
        for name in module.__all__:
            assert f"{module.__name__}.{name}" in documented, f"{module.__name__}.{name}"
            assert getattr(module, name).__doc__, f"{module.__name__}.{name} has no docstring"


def test_the_readme_command_serves_the_site(site):
    """README: ``.venv/bin/python docs/build.py --serve`` (on a built site it
    rebuilds nothing), here on a free port."""
    server = subprocess.Popen(
        [sys.executable, str(DOCS / "build.py"), "--serve", "--port", "0", "--output", str(site)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = server.stdout.readline()
        address = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert address, line + server.stderr.read()
        with urllib.request.urlopen(address[0] + "getting_started.html", timeout=30) as page:
            assert page.status == 200 and b"Getting started" in page.read()
    finally:
        server.kill()
        server.communicate()
