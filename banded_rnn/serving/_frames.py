"""Checks on what a client sends: a sequence's id and one frame."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from .._internal import validate as _validate


def check_frame(
    frame: Any, shape: tuple[int, int, int], dtype: np.dtype, check_finite: bool
) -> np.ndarray:
    """``frame`` as a NumPy copy of ``shape [bands, time, features]`` and
    ``dtype`` (a floating frame is cast; the caller may reuse its buffer), or
    ``ValueError`` / ``TypeError`` naming ``frame``, the expected and the
    received shape or dtype."""
    frame = np.asarray(_validate.as_array(frame, "frame"))
    if frame.shape != shape:
        hint = (
            "; for one sequence, drop the batch axis: frame[0]" if frame.shape[1:] == shape else ""
        )
        raise ValueError(
            f"frame: expected shape [bands, time, features] = {shape} (one frame of one "
            f"sequence); received shape {frame.shape}{hint}"
        )
    if not np.issubdtype(frame.dtype, np.floating):
        raise TypeError(
            f"frame: expected a floating dtype (cast to {dtype}); received {frame.dtype}"
        )
    frame = frame.astype(dtype)  # a copy: the frame waits in a queue
    if check_finite:
        _validate.refuse_nonfinite(frame, "frame", "[band, step, feature]")
    return frame


def check_sequence_id(sequence_id: Any) -> Hashable:
    """``sequence_id`` if it can key a sequence (hashable, not ``None``), or ``TypeError``."""
    if sequence_id is None or not isinstance(sequence_id, Hashable):
        raise TypeError(
            f"sequence_id: expected a hashable id (a string or an integer); received "
            f"{type(sequence_id).__name__}"
        )
    try:
        hash(sequence_id)
    except TypeError:  # a tuple holding a list
        raise TypeError(
            f"sequence_id: expected a hashable id (a string or an integer); received "
            f"{sequence_id!r}"
        ) from None
    return sequence_id
