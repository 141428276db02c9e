"""`python -m interop demo`: the experiment in JAX, then in Keras."""

import os

# Keras reads its backend once, at its first import.
os.environ.setdefault("KERAS_BACKEND", "jax")

import subprocess
import sys

import jax
import pytest

from interop._demo import run_keras_demo


@pytest.fixture(autouse=True)
def keras_rank_promotion():
    """keras.layers.LSTM relies on implicit rank promotion, an error under conftest."""
    with jax.numpy_rank_promotion("allow"):
        yield


def test_keras_demo_shows_the_bug_and_the_fix(capsys):
    results = run_keras_demo()
    assert results["keras_shared_lstm_sum_abs"] > 0.1
    assert results["keras_shared_lstm_first_half_sum_abs"] > 0.1
    assert results["keras_one_band_lstm_sum_abs"] > 0.01
    assert results["banded_layer_max_abs"] <= 1e-6
    assert results["banded_vs_separate_lstm_max_abs"] <= 1e-5
    out = capsys.readouterr().out
    assert "shared stateful keras.layers.LSTM" in out and "BandedLSTMLayer" in out


def test_demo_command_line_runs_jax_then_keras():
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
    jax_line = next(i for i, line in enumerate(lines) if "band 1 set to NaN" in line)
    keras_line = next(i for i, line in enumerate(lines) if "(jax backend)" in line)
    assert jax_line < keras_line
    assert any("interop.BandedLSTMLayer" in line for line in lines[keras_line:])
