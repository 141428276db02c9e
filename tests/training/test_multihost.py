"""Training over several processes (``jax.distributed``, gloo collectives), against
one process with the same global batch: 4 processes of one device whole; 2
processes of two devices each (bands split over them), on sequences padded to
the chunk, killed (SIGKILL) and restarted from their checkpoints; one process
of two devices resumed from its checkpoints; and the SLURM script of
docs/guides/hosts.md.

The processes run inside a network namespace of their own (``unshare -rn``),
where the only interface is loopback: the coordinator listens on 127.0.0.1,
and the collectives' transport, which binds to the host name's address, has no
other network to reach. The launcher checks that before it starts anything.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import (
    ROOT,
    in_loopback_namespace,
    multihost_run,
    page_blocks,
    run_script,
    script_command,
    script_env,
)

NUM_STEPS = 12

SCRIPTS = Path(__file__).parent / "scripts"


def one_process(padded):
    """One process, one device, the same global batch: losses, parameters, state."""
    history, params, state = multihost_run(NUM_STEPS, padded=padded)
    return history, jax.tree.leaves((params, state))


@pytest.fixture(scope="module")
def reference():
    return one_process(padded=False)


@pytest.fixture(scope="module")
def padded_reference():
    return one_process(padded=True)


def launch(scenario, directory):
    launcher = script_command(SCRIPTS / "multihost_launcher.py", scenario, directory, NUM_STEPS)
    done = in_loopback_namespace(launcher, cwd=ROOT, env=script_env())
    assert done.returncode == 0 and "launched" in done.stdout, done.stderr[-4000:]
    return np.load(directory / "result.npz")


def check_against(result, reference, first_step=1):
    history, leaves = reference
    np.testing.assert_array_equal(result["step"], np.arange(first_step, NUM_STEPS + 1))
    np.testing.assert_allclose(result["loss"], history["loss"][first_step - 1 :], rtol=1e-6)
    for index, leaf in enumerate(leaves):  # parameters, then the carried state
        np.testing.assert_allclose(result[f"arr_{index}"], leaf, rtol=1e-6, atol=1e-6)
    evaluated = np.isin(history["eval_step"], result["eval_step"])
    assert evaluated.sum() == len(result["eval_step"]) > 0
    np.testing.assert_allclose(result["eval_loss"], history["eval_loss"][evaluated], rtol=1e-6)


def test_four_processes_train_as_one(tmp_path, reference):
    check_against(launch("whole", tmp_path), reference)


def test_two_processes_killed_and_restarted_resume_the_run(tmp_path, padded_reference):
    """Two devices per process, the bands split over them; sequences of lengths
    that are no multiple of the chunk, so every batch carries seq_lengths."""
    result = launch("killed", tmp_path)
    first = int(result["step"][0])
    assert first >= 5 and first % 2 == 1  # resumed after a checkpoint (every 2 steps)
    check_against(result, padded_reference, first_step=first)


def test_one_process_of_two_devices_resumes_on_its_mesh(tmp_path, reference):
    """It failed with "incompatible devices": restored arrays on one device, the
    carried state on two."""
    run_script(SCRIPTS / "resume_on_two_devices.py", tmp_path, NUM_STEPS)
    check_against(np.load(tmp_path / "result.npz"), reference, first_step=7)


def test_readme_slurm_script_runs_two_tasks(tmp_path):
    """The guide's train.py under its batch script's command, with an srun that
    starts two tasks on this machine with SLURM's variables, as srun would."""
    section = page_blocks(ROOT / "docs" / "guides" / "hosts.md")
    script, batch = section[0], section[1]
    assert script.language == "python" and batch.language == "bash"
    (tmp_path / "train.py").write_text(script.code)
    (tmp_path / ".venv").symlink_to(sys.prefix)  # the environment running this test
    (tmp_path / "bin").mkdir()
    srun = tmp_path / "bin" / "srun"
    srun.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{SCRIPTS / "fake_srun.py"}" "$@"\n')
    srun.chmod(0o755)
    (tmp_path / "batch.sh").write_text(batch.code)
    only_loopback = 'test "$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d " ")" = lo'
    done = in_loopback_namespace(
        ["sh", "-c", f"ip link set lo up && {only_loopback} && bash batch.sh"],
        cwd=tmp_path,
        env={**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
             "FAKE_SRUN_TASKS": "2", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    printed = [line for line in done.stdout.splitlines() if line.startswith("loss")]
    assert len(printed) == 1 and printed[0].endswith("state (4, 3, 16)"), done.stdout
    assert (tmp_path / "runs" / "multihost" / "8").is_dir()
