"""Small shared helpers for the tests: random inputs from fixed keys, and a
fresh Python process for what must run before JAX starts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from banded_rnn import BandedLSTM


def random_inputs(seed: int, shape, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def init_model(model: BandedLSTM, inputs, seed: int = 0, bias_scale: float = 0.5):
    """Initialises ``model`` and gives the biases random values too, so that a
    wrong gate order or bias slice shows up in the comparison."""
    variables = model.init(jax.random.key(seed), None, inputs)
    rng = np.random.default_rng(seed + 1000)
    return jax.tree_util.tree_map_with_path(
        lambda path, p: (
            p + bias_scale * rng.standard_normal(p.shape).astype(p.dtype)
            if path[-1].key == "bias"
            else p
        ),
        variables,
    )


def random_state(model: BandedLSTM, batch: int, bands: int, seed: int):
    rng = np.random.default_rng(seed)
    return tuple(
        type(s)(*(rng.standard_normal(a.shape).astype(np.float32) for a in s))
        for s in model.initial_state(batch, bands)
    )


class WithHead(nn.Module):
    """A banded LSTM followed by a linear head ``units -> 1``, with BandedLSTM's
    call signature (what ``make_train_step`` expects of ``apply_fn``)."""

    units: int

    @nn.compact
    def __call__(self, state, inputs, *, deterministic=True):
        state, hidden = BandedLSTM(self.units, name="lstm")(
            state, inputs, deterministic=deterministic
        )
        return state, nn.Dense(1, name="head")(hidden)


ROOT = Path(__file__).resolve().parents[1]


def run_fresh_process(script: str) -> subprocess.CompletedProcess:
    """Runs ``script`` in a new Python process from the repository root, with
    this folder and the root importable and Keras on JAX; for settings JAX
    takes only before it starts (such as its CPU device count). Fails the
    test, showing the end of stderr, if the script fails."""
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
    }
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done
