"""Small shared helpers for the tests: random inputs from fixed keys, models,
training steps' pieces, and a fresh Python process for what must run before
JAX starts."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState

from banded_rnn import BandedLSTM
from banded_rnn.training import (
    Checkpointer,
    ChunkStream,
    fit,
    gather_to_host,
    make_train_step,
    masked_mean,
)


def random_inputs(seed: int, shape, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def init_model(model: nn.Module, inputs, seed: int = 0, bias_scale: float = 0.5):
    """Variables for ``model`` (called as ``model(None, inputs)``), drawn in
    NumPy as Keras's initializers draw them (Glorot-uniform kernels, orthogonal
    recurrent kernels, the forget gate's bias at 1), with random values added
    to the biases, so that a wrong gate order or bias slice shows up in the
    comparison. Only the variables' shapes come from the model (traced, not
    compiled): an eager ``model.init`` compiles every initializer and the
    whole forward pass for each new shape (in tests/core/test_banded.py and
    test_directions.py, 420 of their 1,780 compilations). ``model.init``
    itself is tested in tests/core/test_banded.py."""
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(seed), None, x), inputs)
    rng = np.random.default_rng(seed + 1000)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "recurrent_kernel":  # [units, 4 units], orthonormal rows
            q, r = np.linalg.qr(rng.standard_normal((shape[1], shape[0])))
            value = (q * np.sign(np.diag(r))).T
        elif name == "kernel":
            limit = np.sqrt(6 / (shape[0] + shape[-1]))
            value = rng.uniform(-limit, limit, shape)
        elif name == "bias":
            value = bias_scale * rng.standard_normal(shape)
            if "recurrent_kernel" in parents[path[:-1]]:  # an LSTM's: forget gate at 1
                units = shape[0] // 4
                value[units : 2 * units] += 1.0
        else:
            value = rng.standard_normal(shape) / np.sqrt(shape[0] if shape else 1)
        return jnp.asarray(value.astype(leaf.dtype))

    parents: dict = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(shapes):
        parents.setdefault(path[:-1], set()).add(path[-1].key)
    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("deterministic", "return_carry"))
def jit_apply(model: nn.Module, *args, **kwargs):
    """``model.apply(*args, **kwargs)`` compiled as one program, as a jitted
    step runs it. Called eagerly, ``apply`` compiles its scan and each small
    operation around it as programs of their own: for each new shape, twice
    the compile time of one program (0.71 against 0.34 s for a two-layer scan
    model on a Zen 5). The eager call users make keeps its own tests
    (tests/core/test_banded.py's float32 reference test and
    test_jit_traces_once_per_shape, test_directions.py, the doctests, the
    README's blocks)."""
    return model.apply(*args, **kwargs)


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


def leaves_equal(a, b):
    """Asserts that the pytrees ``a`` and ``b`` hold the same arrays, bit for bit."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def bad_inputs(x: np.ndarray) -> list:
    """Inputs of every wrong kind in place of ``x``: ``(bad, error, message)``,
    the message as it follows the argument's name (``inputs: ``, ``chunk: ``)."""
    return [
        (None, TypeError, "expected an array; received NoneType"),
        ("abc", TypeError, "expected an array; received str"),
        ([[1.0], [1.0, 2.0]], ValueError, r"expected a rectangular array.*ragged"),
        (
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            TypeError,
            r"expected an array with values; received a jax.ShapeDtypeStruct",
        ),
        (
            np.ma.masked_array(x, mask=x > 1),
            TypeError,
            "expected an array; received a NumPy masked array",
        ),
        (np.full(x.shape, "a"), TypeError, "expected a floating dtype; received <U1"),
    ]


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


# -- training --------------------------------------------------------------------------


def mse(outputs, targets):
    return jnp.mean((outputs - targets) ** 2)


def capture_grads() -> optax.GradientTransformation:
    """An "optimiser" that leaves the parameters alone and keeps the last gradient
    as its state: the step's exact gradient, read from ``opt_state``."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(updates, state, params=None):
        del state, params
        return jax.tree.map(jnp.zeros_like, updates), updates

    return optax.GradientTransformation(init, update)


def random_variables(model, features, seed, dtype=np.float32):
    """``init_model``'s variables for ``model`` on inputs of ``features``, as
    NumPy arrays of ``dtype`` (nothing compiled, biases random)."""
    variables = init_model(model, np.zeros((1, 1, 1, features), np.float32), seed=seed)
    return jax.tree.map(lambda leaf: np.asarray(leaf, dtype), variables)


# One instance each: the optimiser is part of the TrainState's static structure, so a
# new instance would mean a new compilation of the step.
CAPTURE = capture_grads()
ADAM = optax.adam(1e-2)


def new_train_state(model, variables, tx=CAPTURE):
    params = jax.tree.map(jnp.array, variables["params"])  # on device; the step donates it
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


# -- one training run, on one process or several (tests/training/test_multihost.py) ------

MULTIHOST_BATCH, MULTIHOST_CHUNK = 4, 4
MULTIHOST_MODEL = BandedLSTM(5, dropout=0.2, recurrent_dropout=0.2)
MULTIHOST_LENGTHS = [8, 12, 4, 8, 16, 8, 12, 8]  # evaluated too: 4 of length 8 split over the mesh
MULTIHOST_PADDED_LENGTHS = [8, 11, 3, 8, 14, 7, 12, 5]


def multihost_data(lengths, bands=2, features=3):
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((bands, t, features)).astype(np.float32) for t in lengths]
    units = MULTIHOST_MODEL.units
    targets = [rng.standard_normal((bands, t, units)).astype(np.float32) for t in lengths]
    return inputs, targets


def multihost_run(num_steps, directory=None, mesh=None, padded=False, **stream_kwargs):
    """``fit`` on the same data in every process (each takes its part of the
    batch on ``mesh``); with ``directory``, checkpointed there every 2 steps and
    resumed from there. Returns the history and the final parameters and
    carried state, gathered to the host."""
    lengths = MULTIHOST_PADDED_LENGTHS if padded else MULTIHOST_LENGTHS
    inputs, targets = multihost_data(lengths)
    loss_fn = masked_mean(lambda outputs, targets: (outputs - targets) ** 2) if padded else mse
    params = init_model(MULTIHOST_MODEL, inputs[0][None])["params"]
    train_state = TrainState.create(apply_fn=MULTIHOST_MODEL.apply, params=params,
                                    tx=optax.adam(1e-2))  # fmt: skip
    stream = ChunkStream(inputs, targets, batch_size=MULTIHOST_BATCH, chunk_length=MULTIHOST_CHUNK,
                         seed=1, **stream_kwargs)  # fmt: skip
    kwargs = dict(num_steps=num_steps, rng=jax.random.key(2), progress=False,
                  eval_data=(inputs, targets), eval_every=3)  # fmt: skip
    if directory is None:
        result = fit(make_train_step(loss_fn, mesh=mesh), train_state, stream, **kwargs)
    else:
        with Checkpointer(directory) as checkpointer:
            result = fit(make_train_step(loss_fn, mesh=mesh), train_state, stream,
                         checkpointer=checkpointer, checkpoint_every=2, **kwargs)  # fmt: skip
    params, state = gather_to_host((result.train_state.params, result.state))
    return result.history, params, state


# -- checkpoints of known values, to damage (tests/training/test_checkpoint_faults.py) --


def saved_values(step: int):
    """The (train_state, state, rng) saved at ``step``: random, so that zstd finds little
    to compress and the arrays fill most of the checkpoint's data file."""
    keys = jax.random.split(jax.random.key(step), 4)
    params = {"w": jax.random.normal(keys[0], (64, 32)), "b": jax.random.normal(keys[1], (32,))}
    train_state = TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-2))
    opt_state = jax.tree.map(lambda x: x + 0.5 * step if x.dtype == jnp.float32 else x + step,
                             train_state.opt_state)  # fmt: skip
    train_state = train_state.replace(step=step, opt_state=opt_state)
    return train_state, {"h": jax.random.normal(keys[2], (2, 3))}, keys[3]


def templates():
    """Zeros in the shapes of ``saved_values``: what restore reads into."""
    train_state, state, rng = saved_values(0)
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
    train_state = train_state.replace(params=zeros(train_state.params),
                                      opt_state=zeros(train_state.opt_state))  # fmt: skip
    return train_state, zeros(state), jax.random.key(99)


def save_steps(directory: Path, steps, max_to_keep: int = 3) -> None:
    with Checkpointer(directory, max_to_keep=max_to_keep) as checkpointer:
        for step in steps:
            checkpointer.save(*saved_values(step))


def data_file(step_directory: Path) -> Path:
    """The checkpoint's array data: the largest file that orbax's OCDBT store (one per
    process) wrote, holding the zstd-compressed chunks of the larger arrays."""
    files = (step_directory / "default" / "ocdbt.process_0" / "d").iterdir()
    return max(files, key=lambda p: p.stat().st_size)


def root_node(step_directory: Path) -> Path:
    """The root of the checkpoint's OCDBT b-tree (small arrays are stored inline in it)."""
    (path,) = (step_directory / "default" / "d").iterdir()
    return path


def restore(directory: Path, **kwargs):
    with Checkpointer(directory) as checkpointer:
        return checkpointer.restore(*templates(), **kwargs), checkpointer.all_steps()


# -- processes ---------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def script_env(**changes: str) -> dict[str, str]:
    """This process's environment for a script: tests/ and the root importable
    (``helpers``, ``reference``, ``banded_rnn``, ``benchmarks``), Keras on JAX,
    then ``changes``."""
    path = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
    return {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": path, **changes}


def shared_compile_cache_env(directory: Path) -> dict[str, str]:
    """The environment that has JAX keep every program it compiles in
    ``directory`` (its persistent compilation cache) and load it from there,
    for processes run one after another: a program that an earlier one
    compiled is loaded, not compiled again, and runs the same. Never for
    processes that run at once or may be killed: JAX writes an entry in
    place, so a reader could find it half written."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(directory),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def script_command(script: Path, *args, python_options=()) -> list[str]:
    """The command that runs the Python file ``script`` with ``args``."""
    return [sys.executable, *python_options, str(script), *map(str, args)]


def run_script(script: Path, *args, env=None, cwd=ROOT, timeout=600, check=True,
               python_options=()) -> subprocess.CompletedProcess:  # fmt: skip
    """Runs the Python file ``script`` (most are in a ``scripts/`` folder beside
    the tests that start them) with ``args`` in a fresh process: for what must
    happen before JAX starts (its CPU device count), in a process of its own
    (a kill, a clean stderr, modules never imported), or in a new environment.
    ``env`` defaults to ``script_env()``. Unless ``check`` is false, a script
    that fails fails the test with its command and the end of its stderr."""
    command = script_command(script, *args, python_options=python_options)
    done = subprocess.run(command, cwd=cwd, env=script_env() if env is None else env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if check and done.returncode != 0:
        pytest.fail(
            f"{' '.join(command[1:])} exited with {done.returncode}; the end of its stderr:\n"
            f"{done.stderr[-4000:]}",
            pytrace=False,
        )
    return done


def in_loopback_namespace(command, **kwargs):
    """Runs ``command`` in a new network namespace (``unshare -rn``); skips
    the test where none can be made."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip, to run the processes on loopback only")
    done = subprocess.run(
        ["unshare", "-rn", *command], capture_output=True, text=True, timeout=300, **kwargs
    )
    first = (done.stderr.splitlines() or [""])[0]
    if done.returncode and first.startswith("unshare"):
        pytest.skip(f"no network namespace here: {first}")
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


# -- code blocks of the README and the documentation's pages ------------------------------

_FENCE = re.compile(r"^(\s*)(```|~~~)\s*(\S*)")


class Block(NamedTuple):
    language: str
    heading: str
    line: int
    code: str
    page: str = "README.md"


def read_blocks(text: str) -> list[Block]:
    """Every fenced block of ``text``, with the nearest heading above it."""
    blocks: list[Block] = []
    heading, opening, lines = "", None, []
    for number, line in enumerate(text.splitlines(), start=1):
        fence = _FENCE.match(line)
        if opening is None:
            if fence:
                opening, lines = (number, fence[1], fence[2], fence[3]), []
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif fence and fence[2] == opening[2] and not fence[3]:
            start, indent, _, language = opening
            code = "\n".join(x[len(indent) :] if x.startswith(indent) else x for x in lines)
            blocks.append(Block(language, heading, start, code + "\n"))
            opening = None
        else:
            lines.append(line)
    assert opening is None, f"README.md:{opening[0]}: a fence that is never closed"
    return blocks


def page_blocks(page: Path) -> list[Block]:
    """Every fenced block of the Markdown file ``page``, named by its path from the root."""
    blocks = read_blocks(page.read_text(encoding="utf-8"))
    return [block._replace(page=str(page.relative_to(ROOT))) for block in blocks]
