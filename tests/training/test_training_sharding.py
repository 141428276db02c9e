"""Training on a device mesh equals training on one device (four CPU devices, in a
subprocess, since the device count is fixed when JAX starts)."""

import os
from pathlib import Path

from helpers import run_script, script_env

SCRIPT = Path(__file__).parent / "scripts" / "mesh_training.py"


def test_mesh_training_equals_single_device():
    xla_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = script_env(XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    result = run_script(SCRIPT, env=env, python_options=["-W", "error"])
    for line in ("equal one batch", "equal one batch_bands", "equal per_entry batch",
                 "equal per_entry batch_bands", "equal fit", "equal padded chunks",
                 "equal padded buckets", "refused"):  # fmt: skip
        assert line in result.stdout, result.stdout
