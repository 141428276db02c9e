"""A stand-in for SLURM's ``srun`` on one machine: starts ``FAKE_SRUN_TASKS``
copies of its command, each with the variables SLURM gives a task, and exits
with the highest of their exit statuses (tests/training/test_multihost.py).

Usage: ``python fake_srun.py COMMAND...``.
"""

import os
import subprocess
import sys

tasks = int(os.environ["FAKE_SRUN_TASKS"])
slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": str(tasks),
         "SLURM_STEP_NUM_NODES": str(tasks)}  # fmt: skip
processes = [
    subprocess.Popen(
        sys.argv[1:],
        env={**os.environ, **slurm, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)},
    )
    for task in range(tasks)
]
sys.exit(max(process.wait() for process in processes))
