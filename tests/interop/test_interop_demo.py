"""`python -m interop demo`: the problem in Keras, then the fix in Keras and in JAX."""

import os
import subprocess
import sys

from interop._demo import run_keras_demo


def test_keras_demo_shows_the_bug_and_the_fix(capsys):
    results = run_keras_demo()
    assert results["keras_shared_lstm_sum_abs"] > 0.1
    assert results["keras_shared_lstm_first_half_sum_abs"] > 0.1
    assert results["keras_one_band_lstm_sum_abs"] > 0.01
    assert results["banded_layer_max_abs"] <= 1e-6
    assert results["banded_vs_separate_lstm_max_abs"] <= 1e-5
    out = capsys.readouterr().out
    problem, fix = out.index("THE PROBLEM"), out.index("THE FIX, in Keras")
    assert problem < out.index("stateful keras.layers.LSTM called on each band slice") < fix
    assert problem < out.index("first half only (steps 0-24): summed |diff| = ") < fix
    assert fix < out.index("interop.BandedLSTMLayer(3, stateful=True)")


def test_demo_command_line_shows_the_problem_then_the_fix():
    env = {key: value for key, value in os.environ.items() if key != "KERAS_BACKEND"}
    done = subprocess.run(
        [sys.executable, "-m", "interop", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    problem = next(i for i, line in enumerate(lines) if line.startswith("THE PROBLEM"))
    keras_fix = next(i for i, line in enumerate(lines) if line.startswith("THE FIX, in Keras"))
    jax_fix = next(i for i, line in enumerate(lines) if line.startswith("THE FIX, in JAX"))
    assert problem == 0 and problem < keras_fix < jax_fix
    assert "(jax backend)" in lines[problem]
    assert any("band 1's inputs set to NaN" in line for line in lines[jax_fix:])
