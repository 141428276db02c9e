"""Every code block of README.md and of the documentation's pages runs as
written, so neither stays untrue.

Each ```python block runs on its own, in a fresh Python process, in an empty
directory: as a reader who pastes it into a file would run it, and with no
names left over from another block. A warning fails the block, as it fails
the rest of the suite. The blocks, run one after another, share a JAX
compilation cache, as a reader's would with JAX's persistent cache on: a
program an earlier block compiled is loaded instead of compiled again. The
```bash blocks are commands that other tests run; a new one must be added to
BASH_COMMANDS with the test that runs it.
In the docs' pages, ```{directive} blocks are Sphinx's (executable cells run
when the site is built, tests/docs/test_docs.py) and ```text blocks are not code.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from helpers import ROOT, Block, page_blocks, read_blocks, shared_compile_cache_env

README = ROOT / "README.md"
PAGES = [README] + [
    page
    for page in sorted((ROOT / "docs").rglob("*.md"))
    if not {"_build", "jupyter_execute"} & set(page.relative_to(ROOT / "docs").parts)
]

BASH_COMMANDS = {
    # tests/interop/test_interop_demo.py::test_demo_command_line_shows_the_problem_then_the_fix
    # runs the demo.
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m interop demo",
    # CI runs the suite itself.
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest",
    # tests/training/test_multihost.py::test_readme_slurm_script_runs_two_tasks runs it
    # with two tasks.
    "srun .venv/bin/python train.py",
    # tests/kernel/test_kernel.py::test_info_command_reports_the_kernel runs it.
    ".venv/bin/python -m banded_rnn info",
    # tests/docs/test_docs.py builds the site and serves it (CI installs the docs extra).
    ".venv/bin/pip install -e '.[docs]' && .venv/bin/python docs/build.py --serve",
}
LANGUAGES = ("python", "bash")
NOT_RUN_HERE = ("text",)  # and {directives}, in the docs' pages
TIMEOUT_S = 300


def _ids(blocks: list[Block]) -> list[str]:
    counts: dict[str, int] = {}
    ids = []
    for block in blocks:
        where = f"{block.page} {block.heading}" if block.page != "README.md" else block.heading
        slug = re.sub(r"[^a-z0-9]+", "-", where.lower()).strip("-") or "top"
        counts[slug] = counts.get(slug, 0) + 1
        ids.append(f"{slug}-{counts[slug]}")
    return ids


BLOCKS = read_blocks(README.read_text(encoding="utf-8"))  # the README's own
ALL_BLOCKS = [block for page in PAGES for block in page_blocks(page)]
PYTHON = [block for block in ALL_BLOCKS if block.language == "python"]
BASH = [block for block in ALL_BLOCKS if block.language == "bash"]


def test_every_block_has_a_language_this_file_runs():
    unhandled = [
        (b.page, b.line, b.language)
        for b in ALL_BLOCKS
        if b.language not in LANGUAGES
        and not (b.page != "README.md" and (b.language in NOT_RUN_HERE or b.language[:1] == "{"))
    ]
    assert not unhandled, f"blocks (page, line, language) that nothing runs: {unhandled}"
    assert PYTHON and BASH


@pytest.mark.parametrize("block", BASH, ids=_ids(BASH))
def test_bash_block_is_a_command_run_elsewhere(block):
    lines = [line.strip() for line in block.code.splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert len(commands) == 1 and commands[0] in BASH_COMMANDS, (
        f"{block.page}:{block.line}: a bash block that no test runs: {commands}. "
        f"Run it in a test and add it to BASH_COMMANDS in {pathlib.Path(__file__).name}."
    )


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One folder for this module's blocks, which run one at a time."""
    return tmp_path_factory.mktemp("jax-cache")


@pytest.mark.parametrize("block", PYTHON, ids=_ids(PYTHON))
def test_python_block_runs_on_its_own(block, tmp_path, compile_cache):
    script = tmp_path / f"readme_line_{block.line}.py"
    script.write_text(block.code, encoding="utf-8")
    path = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    env.update(shared_compile_cache_env(compile_cache))
    env.pop("KERAS_BACKEND", None)  # the Keras block's `import interop` must choose JAX itself
    done = subprocess.run(
        [sys.executable, "-W", "error", script.name],  # warnings are errors, as in pyproject
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, (
        f"{block.page}:{block.line} (under '{block.heading}') exited with {done.returncode}:\n"
        f"{done.stderr[-6000:]}"
    )
