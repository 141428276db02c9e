"""Starts the processes of a multi-process training run (multihost_worker.py)
for tests/training/test_multihost.py, inside the network namespace of its own
that the test made (``unshare -rn``); checks first that loopback is its only
interface.

Usage: ``python multihost_launcher.py SCENARIO DIRECTORY NUM_STEPS``: ``whole``,
4 processes of one device each; ``killed``, 2 processes of two devices each on
padded sequences, one SIGKILLed once step 4 is saved, then both restarted to
resume from the checkpoints in DIRECTORY; ``agree``, the 2 processes of
processes_must_agree.py, whose output it prints. Prints ``launched`` when the
run is done.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).parent / "multihost_worker.py"
AGREE = Path(__file__).parent / "processes_must_agree.py"

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
with open("/proc/net/dev") as dev:
    interfaces = [line.split(":")[0].strip() for line in dev.readlines()[2:]]
assert interfaces == ["lo"], f"expected loopback only, found {interfaces}"

scenario, directory, num_steps = sys.argv[1], sys.argv[2], sys.argv[3]


def start(num_processes, devices, bands, *extra):
    worker = [sys.executable, str(WORKER)]
    shared = ["12355", directory, num_steps, str(devices), str(bands), *extra]
    return [
        subprocess.Popen(
            [*worker, str(i), str(num_processes), *shared],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(num_processes)
    ]


def finish(processes):
    for process in processes:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0 and "done" in out, err[-3000:]


if scenario == "agree":
    processes = [
        subprocess.Popen([sys.executable, str(AGREE), str(i), "12356", directory],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # fmt: skip
    for i, process in enumerate(processes):
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, err[-3000:]
        print("".join(f"process {i}: {line}\n" for line in out.splitlines()), end="")
elif scenario == "whole":
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
