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
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from multihost_worker import run

from helpers import ROOT, page_blocks, run_fresh_process

NUM_STEPS = 12

LAUNCHER = """
import os, signal, subprocess, sys, time

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
with open("/proc/net/dev") as dev:
    interfaces = [line.split(":")[0].strip() for line in dev.readlines()[2:]]
assert interfaces == ["lo"], f"expected loopback only, found {interfaces}"

scenario, directory, num_steps = sys.argv[1], sys.argv[2], sys.argv[3]
env = {**os.environ, "PYTHONPATH": os.pathsep.join(["tests", "."])}


def start(num_processes, devices, bands, *extra):
    return [
        subprocess.Popen(
            [sys.executable, "tests/multihost_worker.py", str(i), str(num_processes), "12355",
             directory, num_steps, str(devices), str(bands), *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(num_processes)
    ]


def finish(processes):
    for process in processes:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0 and "done" in out, err[-3000:]


if scenario == "whole":
    finish(start(4, 1, 1))
else:  # killed: one process SIGKILLed once step 4 is saved; all restarted (padded data)
    processes = start(2, 2, 2, "padded")
    while not os.path.isdir(os.path.join(directory, "4")):
        assert all(p.poll() is None for p in processes), processes[0].communicate()[1][-3000:]
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGKILL)
    time.sleep(0.5)
    for process in processes:  # the other one waits in a collective for its peer
        process.kill()
        process.communicate()
    finish(start(2, 2, 2, "padded"))
print("launched", flush=True)
"""


def one_process(padded):
    """One process, one device, the same global batch: losses, parameters, state."""
    history, params, state = run(NUM_STEPS, padded=padded)
    return history, jax.tree.leaves((params, state))


@pytest.fixture(scope="module")
def reference():
    return one_process(padded=False)


@pytest.fixture(scope="module")
def padded_reference():
    return one_process(padded=True)


def in_loopback_namespace(command, **kwargs):
    """Runs ``command`` in a new network namespace (``unshare -rn``); skips
    the test where none can be made."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip, to run the processes on loopback only")
    done = subprocess.run(
        ["unshare", "-rn", *command], capture_output=True, text=True, timeout=300, **kwargs
    )
    first = (done.stderr.splitlines() or [""])[0]
    if done.returncode and first.startswith("unshare"):
        pytest.skip(f"no network namespace here: {first}")
    return done


def launch(scenario, directory):
    done = in_loopback_namespace(
        [sys.executable, "-c", textwrap.dedent(LAUNCHER), scenario, str(directory),
         str(NUM_STEPS)],
        cwd=ROOT,
    )  # fmt: skip
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
    run_fresh_process(
        f"""
        import jax
        jax.config.update("jax_num_cpu_devices", 2)
        import numpy as np
        from banded_rnn.training import make_mesh
        from multihost_worker import run

        run(6, "{tmp_path}", mesh=make_mesh())  # interrupted here, say
        history, params, state = run({NUM_STEPS}, "{tmp_path}", mesh=make_mesh())
        np.savez("{tmp_path}/result.npz", *jax.tree.leaves((params, state)), **history)
        """
    )
    check_against(np.load(tmp_path / "result.npz"), reference, first_step=7)


FAKE_SRUN = """
import os, subprocess, sys

tasks = int(os.environ["FAKE_SRUN_TASKS"])
slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": str(tasks),
         "SLURM_STEP_NUM_NODES": str(tasks)}
processes = [
    subprocess.Popen(sys.argv[1:], env={**os.environ, **slurm, "SLURM_PROCID": str(task),
                                        "SLURM_LOCALID": str(task)})
    for task in range(tasks)
]
sys.exit(max(process.wait() for process in processes))
"""


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
    srun.write_text(f"#!{sys.executable}\n" + textwrap.dedent(FAKE_SRUN))
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
