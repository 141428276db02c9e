import subprocess
import sys

from banded_rnn._demo import run_demo


def test_demo_differences_are_zero(capsys):
    results = run_demo()
    assert results["whole_vs_halves_max_abs"] <= 1e-6
    assert results["other_bands_max_abs_after_nan"] == 0.0
    assert results["whole_vs_halves_sum_abs"] <= 1e-5
    out = capsys.readouterr().out
    assert "steps 0-49 in one apply vs steps 0-24 then 25-49" in out
    assert "max |diff| on bands [0, 2] = 0" in out


def test_demo_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "banded_rnn", "demo"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "band 1's inputs set to NaN" in done.stdout
