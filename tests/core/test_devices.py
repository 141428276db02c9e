"""BandedLSTM split over two real CPU devices, against the NumPy reference.

JAX fixes its CPU device count once, before it runs anything, and the test
process already runs on one device; so the checks run in a fresh process with
two CPU devices. Sequences or bands are split over the devices with GSPMD
(``jax.jit`` on split inputs), under ``jax.set_mesh`` of ``make_mesh``'s
mesh and of one with explicit axes (where the native kernel runs each
device's rows, gathering nothing), and with ``shard_map``; every result must
equal the float64 NumPy loop.
"""

from __future__ import annotations

from pathlib import Path

from helpers import run_script

SCRIPT = Path(__file__).parent / "scripts" / "split_over_two_devices.py"


CHECKS = [
    f"{kind}-{axis}{start}"
    for kind in ("gspmd", "mesh", "explicit", "shard_map")
    for axis in ("batch", "bands")
    for start in ("", "-zero")
]


def test_split_over_two_cpu_devices_matches_reference():
    done = run_script(SCRIPT)
    assert sorted(done.stdout.split()) == sorted([*CHECKS, *["ok"] * len(CHECKS)]), done.stdout
