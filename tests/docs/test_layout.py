"""The packages beside the core (``banded_rnn.training``,
``banded_rnn.serving``, ``interop``, ``benchmarks``) use the core's private
modules only through ``banded_rnn._internal``, which lists what they may use:
no ``from banded_rnn._x import``, no ``from .._x import`` inside those
packages, no ``import banded_rnn._x``, no ``banded_rnn._x`` attribute. A
package may use its own private modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

PACKAGES = ["banded_rnn/training", "banded_rnn/serving", "interop", "benchmarks"]
GATEWAY = "banded_rnn._internal"


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def reaches_past_internal(name: str, package: str) -> bool:
    """Whether the dotted ``name`` (a module, or an attribute of one) is a private
    part of ``banded_rnn`` that code of ``package`` may not use."""
    parts = name.split(".")
    if parts[0] != "banded_rnn" or not any(_is_private(part) for part in parts[1:]):
        return False
    if name == GATEWAY or name.startswith(GATEWAY + "."):
        return False
    return not name.startswith(package + ".")  # banded_rnn.training's own private modules


def _module_package(path: Path) -> str:
    """The package that relative imports in ``path`` start from."""
    return ".".join(path.relative_to(ROOT).parent.parts)


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]``; None for anything but names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def violations(source: str, package: str) -> list[str]:
    """What the code ``source``, a module of ``package``, uses of the core
    past banded_rnn._internal: the dotted names, with their lines."""
    tree = ast.parse(source)
    found, modules = [], {}  # modules: the local names bound to banded_rnn's modules
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.name if alias.asname else alias.name.split(".")[0]
                modules[alias.asname or bound] = bound
                found.append((node.lineno, alias.name))
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, package)
            found.append((node.lineno, module))
            for alias in node.names:
                found.append((node.lineno, f"{module}.{alias.name}"))
                modules[alias.asname or alias.name] = f"{module}.{alias.name}"
        elif isinstance(node, ast.Call) and _dotted(node.func) in (
            ["importlib", "import_module"],
            ["import_module"],
            ["__import__"],
        ):
            if node.args and isinstance(node.args[0], ast.Constant):
                found.append((node.lineno, str(node.args[0].value)))
    for node in ast.walk(tree):
        dotted = _dotted(node) if isinstance(node, ast.Attribute) else None
        if dotted and dotted[0] in modules:
            found.append((node.lineno, ".".join([modules[dotted[0]], *dotted[1:]])))
    return sorted({f"line {line}: {name}" for line, name in found
                   if reaches_past_internal(name, package)})  # fmt: skip


def test_packages_use_the_core_only_through_internal():
    reached = {}
    for package in PACKAGES:
        paths = sorted((ROOT / package).rglob("*.py"))
        assert paths, f"no modules under {package}"
        for path in paths:
            if found := violations(path.read_text(encoding="utf-8"), _module_package(path)):
                reached[str(path.relative_to(ROOT))] = found
    assert not reached, f"private modules of banded_rnn used past {GATEWAY}: {reached}"


REACHING = [  # (package, source): each way a module could reach past banded_rnn._internal
    ("interop", "from banded_rnn._cell import ACTIVATIONS"),
    ("interop", "from banded_rnn._backends._native import calls"),
    ("interop", "from banded_rnn import _cell"),
    ("interop", "import banded_rnn._cell"),
    ("interop", "import banded_rnn\nbanded_rnn._cell.ACTIVATIONS"),
    ("interop", "import banded_rnn as b\nb._state.ROW_AXES"),
    ("interop", "from banded_rnn.training._loop import fit"),
    ("interop", "import importlib\nimportlib.import_module('banded_rnn._cell')"),
    ("banded_rnn.training", "from .._cell import ACTIVATIONS"),
    ("banded_rnn.training", "from .. import _validate"),
    ("banded_rnn.training", "from .._backends import _chunking"),
]
ALLOWED = [  # (package, source): what banded_rnn._internal and a package itself offer
    ("interop", "from banded_rnn._internal import validate as _validate"),
    ("interop", "from banded_rnn import BandedLSTM, __version__"),
    ("interop", "import banded_rnn\nbanded_rnn._internal.ACTIVATIONS"),
    ("benchmarks", "from ._weights import random_weights"),
    ("banded_rnn.training", "from .._internal import forward_chunks"),
    ("banded_rnn.training", "from ._loop import fit"),
    ("banded_rnn.training", "from . import _mesh"),
]


def test_the_check_finds_each_way_of_reaching_past_internal_and_allows_the_rest():
    for package, source in REACHING:
        assert violations(source, package), (package, source)
    for package, source in ALLOWED:
        assert violations(source, package) == [], (package, source)
