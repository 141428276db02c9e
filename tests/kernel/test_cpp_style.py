"""The native kernel's C++ sources (``csrc/``, less the vendored ``third_party/``):
formatted as the pinned clang-format formats them, and free of compiler
warnings in every build that CMakeLists.txt makes of them."""

import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from helpers import ROOT

CSRC = ROOT / "csrc"
SOURCES = sorted([*CSRC.glob("*.cc"), *CSRC.glob("*.h")])  # not third_party/
CMAKE = (ROOT / "CMakeLists.txt").read_text()
X86 = platform.machine().lower() in {"x86_64", "amd64"}  # CMakeLists.txt's BRNN_X86


def _pinned(package: str) -> str:
    """The version of ``package`` that pyproject.toml's test extra pins."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in extras["optional-dependencies"]["test"]:
        name, _, version = requirement.partition("==")
        if name == package:
            return version
    raise LookupError(f"pyproject.toml pins no {package}")


def _clang_format() -> str | None:
    """The clang-format next to this Python (the pinned wheel installs it in
    the environment's bin), else the one on PATH."""
    beside = str(Path(sys.executable).parent)
    return shutil.which("clang-format", path=beside) or shutil.which("clang-format")


def _cmake_list(variable: str) -> list[str]:
    """The items of ``set(variable ...)`` in CMakeLists.txt."""
    match = re.search(rf"^set\({variable} (.*)\)$", CMAKE, re.MULTILINE)
    assert match, f"CMakeLists.txt sets no {variable}"
    return match.group(1).split()


# The instruction-set builds of recurrence.cc, CMakeLists.txt's
# `brnn_isa(name BRNN_ISA flags...)`: all but the portable one are x86-64's.
ISA_BUILDS = re.findall(r"^\s*brnn_isa\((\w+) (\d)(.*)\)$", CMAKE, re.MULTILINE)
assert ISA_BUILDS, "CMakeLists.txt builds recurrence.cc for no instruction set"


def _compilations() -> list:
    """Each compilation of a source file, as CMakeLists.txt makes it: the file,
    named with its build, and the flags of that build."""
    compilations = []
    for source in sorted(CSRC.glob("*.cc")):
        if source.name != "recurrence.cc":
            compilations.append(pytest.param(source, ["-DBRNN_X86"] if X86 else [], id=source.name))
            continue
        for name, isa, flags in ISA_BUILDS:
            compilations.append(
                pytest.param(
                    source,
                    [f"-DBRNN_ISA={isa}", *flags.split()],
                    id=f"{source.name}-{name}",
                    marks=pytest.mark.skipif(
                        isa != "1" and not X86, reason=f"the {name} build is x86-64's"
                    ),
                )
            )
    return compilations


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.name)
def test_every_source_is_formatted_by_the_pinned_clang_format(source):
    clang_format = _clang_format()
    if clang_format is None:
        pytest.skip("clang-format is not installed (pip install -e '.[test]' installs it)")
    version = subprocess.run(
        [clang_format, "--version"], capture_output=True, text=True, check=True
    ).stdout
    pinned = _pinned("clang-format")
    if f" {pinned}" not in version:
        pytest.skip(f"{clang_format} is not the pinned clang-format {pinned}: {version.strip()}")
    done = subprocess.run(
        [clang_format, "--dry-run", "--Werror", str(source)], capture_output=True, text=True
    )
    assert done.returncode == 0, (
        f"{source.name} is not formatted (clang-format -i csrc/*.cc csrc/*.h):\n{done.stderr}"
    )


@pytest.mark.parametrize("source, flags", _compilations())
def test_every_build_of_every_source_compiles_without_warnings(source, flags):
    """The compiler front end's warnings, with CMakeLists.txt's flags; those
    of the optimiser (-Wmaybe-uninitialized, say) show in the build itself."""
    compiler = shlex.split(os.environ.get("CXX", "")) or ["g++"]
    if shutil.which(compiler[0]) is None:
        pytest.skip(f"no C++ compiler: {compiler[0]} ($CXX, else g++) is not installed")
    command = [
        *compiler,
        "-fsyntax-only",
        "-std=c++17",
        *_cmake_list("BRNN_FLAGS"),
        *_cmake_list("BRNN_WARNINGS"),
        "-Werror",
        *flags,
        "-I",
        str(CSRC),
        "-isystem",
        str(CSRC / "third_party"),
        "-I",
        sysconfig.get_paths()["include"],
        str(source),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, f"{shlex.join(command)}\n{done.stderr}"
