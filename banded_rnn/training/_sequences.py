"""A data set of sequences of any lengths: checked as pairs of inputs and
targets, and padded to buckets of lengths."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._internal import validate as _validate
from ._targets import TARGETS_PER


def as_sequences(arrays: Any, name: str, rank: int | None) -> list[np.ndarray]:
    sequences = [np.asarray(a) for a in arrays]
    if not sequences:
        raise ValueError(f"{name}: expected at least one sequence; received none")
    for index, seq in enumerate(sequences):
        if (rank is not None and seq.ndim != rank) or seq.ndim < 2:
            expected = "[bands, time, features]" if rank == 3 else "[bands, time, ...]"
            raise ValueError(
                f"{name}[{index}]: expected a sequence {expected}; received shape {seq.shape}"
            )
        if rank == 3 and seq.shape[1] == 0:
            raise ValueError(f"{name}[{index}]: expected at least one time step; received none")
    return sequences


def check_pairs(inputs: Any, targets: Any, targets_per: str) -> tuple[list, list]:
    """``inputs`` as ``[bands, time_i, features]`` sequences of one band and
    feature count, and ``targets`` as their per-step ``[bands, time_i, ...]``
    or per-sequence ``[...]`` targets, all alike (None: placeholders); or raises."""
    if targets_per not in TARGETS_PER:
        raise ValueError(f"targets_per: expected one of {TARGETS_PER}; received {targets_per!r}")
    inputs = as_sequences(inputs, "inputs", 3)
    if targets is None:  # inputs alone (for predictions)
        targets = [x[:, :, :0] if targets_per == "step" else np.zeros(()) for x in inputs]
    elif targets_per == "step":
        targets = as_sequences(targets, "targets", None)
    else:
        targets = [np.asarray(t) for t in targets]
    if len(targets) != len(inputs):
        raise ValueError(
            f"targets: expected {len(inputs)} sequences (one per input sequence); "
            f"received {len(targets)}"
        )
    bands, _, features = inputs[0].shape
    for index, (x, y) in enumerate(zip(inputs, targets, strict=True)):
        if x.shape[0] != bands or x.shape[2] != features:
            raise ValueError(
                f"inputs[{index}]: expected [bands, time, features] = ({bands}, time, "
                f"{features}) like inputs[0]; received {x.shape}"
            )
        if targets_per == "step" and (
            y.shape[:2] != x.shape[:2] or y.shape[2:] != targets[0].shape[2:]
        ):
            raise ValueError(
                f"targets[{index}]: expected [bands, time, ...] = "
                f"{x.shape[:2] + targets[0].shape[2:]}; received {y.shape}"
            )
        if targets_per == "sequence" and y.shape != targets[0].shape:
            raise ValueError(
                f"targets[{index}]: expected one target per sequence shaped like targets[0], "
                f"{targets[0].shape}; received {y.shape}"
            )
    return inputs, targets


def check_buckets(buckets: Any, longest: int) -> tuple[int, ...]:
    """``buckets`` as increasing padded lengths, the last covering ``longest``;
    None is one bucket, ``longest``."""
    if buckets is None:
        return (longest,)
    if not isinstance(buckets, (list, tuple, np.ndarray)):
        raise TypeError(
            f"buckets: expected a sequence of lengths; received {type(buckets).__name__}"
        )
    buckets = tuple(_validate.positive_int(b, "buckets") for b in buckets)
    if not buckets or list(buckets) != sorted(set(buckets)) or buckets[-1] < longest:
        raise ValueError(
            f"buckets: expected increasing lengths, the last at least the longest sequence "
            f"({longest}); received {buckets}"
        )
    return buckets


def bucket_of(length: int, buckets: tuple[int, ...]) -> int:
    """The index of the shortest bucket that holds ``length`` steps."""
    return int(np.searchsorted(buckets, length))


def pad_time(array: np.ndarray, length: int) -> np.ndarray:
    """``array [bands, time, ...]`` padded with zeros to ``length`` steps."""
    missing = length - array.shape[1]
    if missing == 0:
        return array
    return np.pad(array, [(0, 0), (0, missing)] + [(0, 0)] * (array.ndim - 2))
