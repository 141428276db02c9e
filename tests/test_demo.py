import subprocess
import sys

from banded_rnn._demo import run_demo


def test_demo_differences_are_zero(capsys):
    results = run_demo()
    assert results["whole_vs_halves_max_abs"] <= 1e-6
    assert results["other_bands_max_abs_after_nan"] == 0.0
    assert "whole vs two halves" in capsys.readouterr().out


def test_demo_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "banded_rnn", "demo"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "band 1 set to NaN" in done.stdout
