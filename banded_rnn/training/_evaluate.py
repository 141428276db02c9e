"""Held-out sequences run once each, in batches: metrics over a data set, and predictions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax.training.train_state import TrainState

from .._internal import forward_chunks
from .._internal import validate as _validate
from . import _mesh
from ._sequences import bucket_of, check_buckets, check_pairs, pad_time
from ._step import EvalStep


class _Group(NamedTuple):
    """A batch of held-out sequences: ``indices`` into the data set (-1 for
    an empty entry), their ``inputs [batch, bands, time, features]`` and
    targets (or None), and ``lengths [batch]`` (None: all ``time`` steps)."""

    indices: list[int]
    inputs: np.ndarray
    targets: np.ndarray | None
    lengths: np.ndarray | None


def _groups(inputs, targets, batch_size, buckets, targets_per) -> Iterator[_Group]:
    """The data set in batches: of equal lengths (without ``buckets``), or sorted
    by length and padded to buckets, every batch ``batch_size`` entries."""
    lengths = [x.shape[1] for x in inputs]

    def stack(arrays, length, per_step):
        return np.stack([pad_time(a, length) if per_step else a for a in arrays])

    if buckets is None:
        by_length: dict[int, list[int]] = {}
        for index, time in enumerate(lengths):
            by_length.setdefault(time, []).append(index)
        for _, members in sorted(by_length.items()):
            for start in range(0, len(members), batch_size):
                group = members[start : start + batch_size]
                y = None if targets is None else np.stack([targets[i] for i in group])
                yield _Group(group, np.stack([inputs[i] for i in group]), y, None)
        return
    buckets = check_buckets(buckets, max(lengths))
    order = sorted(range(len(inputs)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        group = order[start : start + batch_size]
        time = buckets[bucket_of(lengths[group[-1]], buckets)]
        empty = batch_size - len(group)
        blank = np.zeros_like(inputs[0][:, :1])
        x = stack([inputs[i] for i in group] + [blank] * empty, time, True)
        y = None
        if targets is not None:
            per_step = targets_per == "step"
            nothing = np.zeros_like(targets[0][:, :1] if per_step else targets[0])
            y = stack([targets[i] for i in group] + [nothing] * empty, time, per_step)
        counts = np.array([lengths[i] for i in group] + [0] * empty, np.int32)
        yield _Group(group + [-1] * empty, x, y, counts)


def _windows(group: _Group, chunk_length: int | None, targets_per: str):
    """``(window, inputs, targets, keywords)`` for each window of ``group``,
    the keywords holding the window's ``seq_lengths`` and ``ends``."""
    time = group.inputs.shape[2]
    lengths = np.full(len(group.indices), time) if group.lengths is None else group.lengths
    for start in range(0, time, chunk_length or time):
        window = slice(start, min(start + (chunk_length or time), time))
        keywords = {}
        if group.lengths is not None:
            keywords["seq_lengths"] = np.clip(lengths - start, 0, window.stop - start)
            keywords["seq_lengths"] = keywords["seq_lengths"].astype(np.int32)
        if targets_per == "sequence":
            keywords["ends"] = (lengths > start) & (lengths <= window.stop)
        y = group.targets
        if y is not None and targets_per == "step":
            y = y[:, :, window]
        yield window, group.inputs[:, :, window], y, keywords


def _carried(windows: int, chunk_length: int | None, caller: str) -> Any:
    """Marks the windows of a batch as chunks fed in time order, the state
    carried from one to the next, when there are several: a model that runs
    backwards then refuses them."""
    if windows < 2:
        return contextlib.nullcontext()
    return forward_chunks(f"{caller}(chunk_length={chunk_length})")


def _placement(eval_step: EvalStep, train_state: TrainState, batch: int):
    """The step and weights for a batch of ``batch`` entries: without the
    mesh, from host copies, when the mesh cannot split it."""
    split = 1 if eval_step.mesh is None else dict(eval_step.mesh.shape)[_mesh.BATCH]
    if batch % split == 0:
        return eval_step, train_state
    return eval_step.without_mesh(), _mesh.gather_to_host(train_state)


def evaluate(
    eval_step: EvalStep,
    train_state: TrainState,
    inputs: Sequence[np.ndarray] | np.ndarray,
    targets: Sequence[Any] | np.ndarray,
    *,
    batch_size: int,
    chunk_length: int | None = None,
    buckets: Sequence[int] | None = None,
) -> dict[str, float]:
    """The loss and the step's metrics over held-out sequences, each run once
    from zeros (in windows of ``chunk_length`` steps, state carried; whole
    without it).

    Without ``buckets``, sequences of equal length are batched together (up
    to ``batch_size``) and run unpadded, so any model works. With
    ``buckets`` (padded lengths, as :class:`ChunkStream` takes), sequences are
    sorted by length, batched ``batch_size`` at a time (the last batch filled
    with empty entries) and padded to the shortest bucket that holds each
    batch: fewer shapes to compile, and the model must take
    ``seq_lengths=``.

    Returns ``{"loss": ..., name: ... for each metric}``, each the mean of the
    windows' values weighted by the targets that count in each (the step's
    ``"count"``): for a loss that is a mean over its targets, and for the
    metrics, the mean over every held-out target.

    >>> import jax.numpy as jnp, optax
    >>> from banded_rnn import BandedLSTM
    >>> from banded_rnn.training import make_eval_step
    >>> model = BandedLSTM(units=2)
    >>> rng = np.random.default_rng(0)
    >>> inputs = [rng.normal(size=(3, t, 4)).astype(np.float32) for t in (8, 8, 12)]
    >>> targets = [np.zeros((3, t, 2), np.float32) for t in (8, 8, 12)]
    >>> params = model.init(jax.random.key(0), None, inputs[0][None])["params"]
    >>> train_state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
    >>> step = make_eval_step(lambda out, target: jnp.mean((out - target) ** 2))
    >>> results = evaluate(step, train_state, inputs, targets, batch_size=2, chunk_length=4)
    >>> 0.0 < results["loss"] < 1.0                    # outputs in (-1, 1), targets 0
    True
    """
    batch_size = _validate.positive_int(batch_size, "batch_size")
    chunk_length = _validate.positive_int(chunk_length, "chunk_length", optional=True)
    inputs, targets = check_pairs(inputs, targets, eval_step.targets_per)
    pending = []
    for group in _groups(inputs, targets, batch_size, buckets, eval_step.targets_per):
        step, weights = _placement(eval_step, train_state, len(group.indices))
        state = None
        windows = list(_windows(group, chunk_length, eval_step.targets_per))
        with _carried(len(windows), chunk_length, "evaluate"):
            for _, x, y, keywords in windows:
                state, metrics = step(weights, state, x, y, **keywords)
                pending.append(metrics)
    totals: dict[str, float] = {}
    count = 0.0
    for metrics in jax.device_get(pending):  # one transfer, after everything is dispatched
        weight = float(metrics["count"])
        count += weight
        for name, value in metrics.items():
            if name != "count" and weight:
                totals[name] = totals.get(name, 0.0) + float(value) * weight
    names = ["loss", *eval_step.metrics]
    return {name: totals.get(name, 0.0) / count if count else float("nan") for name in names}


def predict(
    eval_step: EvalStep,
    train_state: TrainState,
    inputs: Sequence[np.ndarray] | np.ndarray,
    *,
    batch_size: int,
    chunk_length: int | None = None,
    buckets: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """The model's outputs for each sequence of ``inputs``, in their order,
    dropout off: run as :func:`evaluate` runs them (batches, windows,
    ``buckets``).

    With per-step targets (``eval_step.targets_per == "step"``), each output
    is ``[bands, time_i, ...]``, cut to the sequence's length; with
    per-sequence targets, the outputs of the window where the sequence ends
    (``[...]``, the model's outputs less the batch axis). NumPy arrays on the host.

    >>> import optax
    >>> from banded_rnn import BandedLSTM
    >>> from banded_rnn.training import make_eval_step
    >>> model = BandedLSTM(units=2)
    >>> rng = np.random.default_rng(0)
    >>> inputs = [rng.normal(size=(3, t, 4)).astype(np.float32) for t in (5, 9, 7)]
    >>> params = model.init(jax.random.key(0), None, inputs[0][None])["params"]
    >>> train_state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
    >>> step = make_eval_step(lambda out, target: 0.0)
    >>> outputs = predict(step, train_state, inputs, batch_size=2, buckets=[10])
    >>> [o.shape for o in outputs]                     # [bands, time_i, units]
    [(3, 5, 2), (3, 9, 2), (3, 7, 2)]
    """
    batch_size = _validate.positive_int(batch_size, "batch_size")
    chunk_length = _validate.positive_int(chunk_length, "chunk_length", optional=True)
    per_step = eval_step.targets_per == "step"
    inputs, _ = check_pairs(inputs, None, eval_step.targets_per)
    results: list[Any] = [None] * len(inputs)
    for group in _groups(inputs, None, batch_size, buckets, eval_step.targets_per):
        step, weights = _placement(eval_step, train_state, len(group.indices))
        state, pieces = None, []
        windows = list(_windows(group, chunk_length, eval_step.targets_per))
        with _carried(len(windows), chunk_length, "predict"):
            for window, x, _, keywords in windows:
                ends = keywords.pop("ends", None)
                state, outputs = step.predict(weights, state, x, **keywords)
                pieces.append((window, ends, outputs))
        pieces = jax.device_get(_mesh.gather_to_host(pieces))
        if per_step:
            joined = np.concatenate([outputs for _, _, outputs in pieces], axis=2)
        for row, index in enumerate(group.indices):
            if index < 0:
                continue
            if per_step:
                results[index] = joined[row, :, : inputs[index].shape[1]]
            else:
                results[index] = next(out[row] for _, ends, out in pieces if ends[row])
    return results
