"""The time-order mark: calls that feed a sequence in chunks, in time order.

``Stream``, the training step's ``chunk_length``, ``fit(carry_state=True)``,
``evaluate`` and ``predict`` with ``chunk_length`` carry the state forwards
from one chunk to the next. A ``BandedLSTM`` that runs backwards threads its
state from a sequence's end, so it must refuse them. They mark the code they
trace with :func:`forward_chunks`; the model reads the mark with
:func:`refuse_backwards` while it is traced. A jitted function that traces the
model later takes :func:`chunks_in_time_order` as a static argument, so that
the mark is part of its cache key (docs/guides/internals.md).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_caller: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "banded_rnn_chunks_in_time_order", default=None
)


@contextlib.contextmanager
def forward_chunks(what: str) -> Iterator[None]:
    """Marks the calls traced inside as one chunk of a sequence fed in time
    order, each continuing the last one's state; ``what`` names the caller,
    for the error a backward model raises."""
    token = _caller.set(what)
    try:
        yield
    finally:
        _caller.reset(token)


def chunks_in_time_order() -> str | None:
    """What :func:`forward_chunks` marked the current code with (its caller's
    name), or None."""
    return _caller.get()


def refuse_backwards(*, reverse: bool, bidirectional: bool) -> None:
    """Raises ``ValueError`` if the current code is marked and the model runs
    backwards (``reverse``) or both ways (``bidirectional``)."""
    what = _caller.get()
    if what is None or not (reverse or bidirectional):
        return
    raise ValueError(
        f"{what} feeds a sequence in chunks in time order, but this BandedLSTM runs "
        f"{'both ways' if bidirectional else 'backwards'}: its backward state "
        "threads from the sequence's end. Run it on whole sequences (one call "
        "each), or a reversed stack on chunks from the last to the first"
    )
