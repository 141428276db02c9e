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


def random_lengths(seed: int, total: int, longest: int) -> list[int]:
    """Random chunk lengths in ``[1, longest]`` that add up to ``total``."""
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(rng.integers(1, longest + 1)))
    lengths[-1] -= sum(lengths) - total
    return [t for t in lengths if t > 0]


def run_chunks(stream, inputs, lengths) -> np.ndarray:
    """``inputs [batch, bands, time, ...]`` through ``stream`` in chunks of
    ``lengths`` steps; the outputs joined along time, as NumPy."""
    outputs, start = [], 0
    for t in lengths:
        outputs.append(np.asarray(stream(inputs[:, :, start : start + t])))
        start += t
    return np.concatenate(outputs, axis=2)


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


class SubbandMask(nn.Module):
    """A small sub-band enhancer: a per-band input layer, a banded LSTM stack
    (with dropout, off when streaming), and a per-band head producing a mask
    in (0, 1) that scales the input."""

    hidden: int
    units: int
    num_layers: int = 2

    @nn.compact
    def __call__(self, state, inputs, *, seq_lengths=None, deterministic=True):
        encoded = nn.tanh(nn.Dense(self.hidden, name="encoder")(inputs))
        lstm = BandedLSTM(self.units, num_layers=self.num_layers, dropout=0.2, name="lstm")
        state, outputs = lstm(state, encoded, seq_lengths=seq_lengths, deterministic=deterministic)
        mask = nn.sigmoid(nn.Dense(inputs.shape[-1], name="head")(outputs))
        return state, mask * inputs


class TwoInSeries(nn.Module):
    """Two ``BandedLSTM`` in series with a dense layer between them; the state
    is a dict of their states. Takes no ``seq_lengths``."""

    @nn.compact
    def __call__(self, state, inputs):
        state = {"low": None, "high": None} if state is None else state
        low, hidden = BandedLSTM(5, name="low")(state["low"], inputs)
        hidden = nn.Dense(4, name="mid")(hidden)
        high, outputs = BandedLSTM(3, num_layers=2, name="high")(state["high"], hidden)
        return {"low": low, "high": high}, outputs


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


def rss_bytes() -> int:
    """This process's resident memory, from ``/proc`` (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def finite_differences(params, loss, eps=1e-6):
    """Central differences of ``loss(params)`` for every entry of a pytree of
    float64 NumPy arrays (changed in place and restored); the same pytree."""
    leaves, treedef = jax.tree.flatten(params)
    grads = []
    for p in leaves:
        g = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            saved = p[i]
            p[i] = saved + eps
            up = loss(params)
            p[i] = saved - eps
            down = loss(params)
            p[i] = saved
            g[i] = (up - down) / (2 * eps)
        grads.append(g)
    return jax.tree.unflatten(treedef, grads)
