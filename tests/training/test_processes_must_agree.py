"""Nothing silent across processes: two ``jax.distributed`` processes (one CPU
device each, over 127.0.0.1 in a network namespace of their own, as in
test_multihost.py) train when given the same global batch, are refused by name
when each passes only its own rows, and catch a checkpoint whose arrays, split
over both, no longer match their checksum. The checksum itself is checked on
two devices of one process: the same for every layout, changed by any bit."""

from __future__ import annotations

from pathlib import Path

from helpers import ROOT, in_loopback_namespace, run_script, script_command, script_env

SCRIPTS = Path(__file__).parent / "scripts"


def test_two_processes_agree_refuse_different_batches_and_catch_a_changed_checkpoint(tmp_path):
    launcher = script_command(SCRIPTS / "multihost_launcher.py", "agree", tmp_path, 0)
    done = in_loopback_namespace(launcher, cwd=ROOT, env=script_env())
    assert done.returncode == 0 and "launched" in done.stdout, done.stderr[-4000:]
    for process in (0, 1):
        printed = [
            line.split(": ", 1)[1]
            for line in done.stdout.splitlines()
            if line.startswith(f"process {process}: ")
        ]
        expected = ["agreed", "refused", "checksum caught"]  # gloo's and the timing lines aside
        assert [line for line in printed if line in expected] == expected, done.stdout


def test_the_checksum_of_split_arrays_is_layout_independent_and_sees_every_bit():
    done = run_script(SCRIPTS / "checksum_of_split_arrays.py")
    assert done.stdout.split() == ["ok"], done.stdout
