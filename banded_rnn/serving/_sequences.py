"""The batcher's table of live sequences: their slots, queued frames and idle times.

Not thread-safe on its own: the batcher holds its lock around every call.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Hashable
from concurrent.futures import Future

import numpy as np

_FORGOTTEN = 4096
"""How many ended sequences the table remembers, to say why an id is unknown."""


class BatcherFullError(RuntimeError):
    """``SequenceBatcher.start`` found every slot taken: end a sequence, or
    wait for one to end or to be freed after ``max_idle``, and start again."""


@dataclasses.dataclass
class Sequence:
    """One live sequence: its slot, its frames not yet run (in order), whether
    its next tick starts it from zeros, whether a tick has run it (its slot
    holds its state), when it last sent a frame."""

    slot: int
    queue: collections.deque[tuple[np.ndarray, Future, float]]
    fresh: bool = True
    has_run: bool = False
    last_seen: float = 0.0
    ending: bool = False


class SequenceTable:
    """Which sequence holds which slot; and, kept up to date by every method,
    how many live sequences have a frame queued (``ready``) and how many that
    may still send have none (``idle``), so that a new frame decides in
    constant time whether it can start a tick."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.live: dict[Hashable, Sequence] = {}
        self.ready_count = 0
        self.idle_count = 0
        self._free = list(range(num_slots))  # lowest first
        self._gone: collections.OrderedDict[Hashable, str] = collections.OrderedDict()

    def start(self, sequence_id: Hashable) -> Sequence:
        if sequence_id in self.live:
            raise ValueError(f"sequence_id: {sequence_id!r} is already started; end it first")
        if not self._free:
            raise BatcherFullError(
                f"start({sequence_id!r}): every one of the {self.num_slots} slots holds a "
                f"sequence; end one (or wait for one to be freed after max_idle) and start again"
            )
        self._gone.pop(sequence_id, None)
        sequence = Sequence(self._free.pop(0), collections.deque(), last_seen=time.monotonic())
        self.live[sequence_id] = sequence
        self.idle_count += 1
        return sequence

    def queue_frame(self, sequence: Sequence, item: tuple[np.ndarray, Future, float]) -> bool:
        """Queues ``item`` for the accepting ``sequence``; returns whether the
        sequence had no frame queued before (it became ready)."""
        sequence.queue.append(item)
        if len(sequence.queue) > 1:
            return False
        self.ready_count += 1
        self.idle_count -= 1
        return True

    def accepting(self, sequence_id: Hashable) -> Sequence:
        """The live sequence ``sequence_id`` if it takes frames, or ``ValueError``."""
        sequence = self.live.get(sequence_id)
        if sequence is not None and not sequence.ending:
            return sequence
        why = "ended" if sequence is not None else self._gone.get(sequence_id, "never started")
        raise ValueError(
            f"sequence_id: expected a started sequence; {sequence_id!r} is {why} (start it with "
            f"start({sequence_id!r}))"
        )

    def end(self, sequence_id: Hashable, why: str, *, drop: bool = False) -> list[Future]:
        """No more frames for ``sequence_id``; its slot is free once its queue
        is run, or now with ``drop``: returns the futures of the frames
        dropped, for the caller to cancel outside the lock."""
        sequence = self.accepting(sequence_id)
        sequence.ending = True
        self._gone[sequence_id] = why
        dropped = [future for _, future, _ in sequence.queue] if drop else []
        if not sequence.queue:
            self.idle_count -= 1  # it may not send any more
        elif drop:
            sequence.queue.clear()
            self.ready_count -= 1
        if not sequence.queue:
            self._free_slot(sequence_id)
        return dropped

    def _free_slot(self, sequence_id: Hashable) -> None:
        sequence = self.live.pop(sequence_id)
        self._free.append(sequence.slot)
        self._free.sort()
        while len(self._gone) > _FORGOTTEN:
            self._gone.popitem(last=False)

    def expire(self, now: float, max_idle: float | None) -> float | None:
        """Ends the sequences idle (no frame queued) for more than ``max_idle``
        seconds; returns when the next one would expire, or None."""
        if max_idle is None:
            return None
        soonest = None
        for sequence_id, sequence in list(self.live.items()):
            if sequence.queue or sequence.ending:
                continue
            expires = sequence.last_seen + max_idle
            if expires <= now:
                self.end(sequence_id, f"freed after {max_idle:g} s without a frame (max_idle)")
            elif soonest is None or expires < soonest:
                soonest = expires
        return soonest

    def take(self, limit: int) -> list[tuple[Sequence, bool, np.ndarray, Future]]:
        """The first queued frame of at most ``limit`` sequences, those whose
        frame has waited longest first, as ``(sequence, fresh, frame,
        future)``; frames whose future was cancelled are dropped. Frees the
        slots of ended sequences run dry."""
        batch = []
        waiting = sorted((s for s in self.live.values() if s.queue), key=lambda s: s.queue[0][2])
        for sequence in waiting[:limit]:
            while sequence.queue:
                frame, future, _ = sequence.queue.popleft()
                if future.set_running_or_notify_cancel():
                    batch.append((sequence, sequence.fresh, frame, future))
                    sequence.fresh = False
                    break
            if not sequence.queue:
                self.ready_count -= 1
                self.idle_count += 0 if sequence.ending else 1
        for sequence_id, sequence in list(self.live.items()):
            if sequence.ending and not sequence.queue:
                self._free_slot(sequence_id)
        return batch

    def ready(self) -> tuple[float | None, int, bool]:
        """When the oldest queued frame arrived (None: no frame), how many
        sequences have a frame queued, and whether every sequence that may
        still send has one."""
        oldest = min((s.queue[0][2] for s in self.live.values() if s.queue), default=None)
        return oldest, self.ready_count, self.idle_count == 0

    def counts(self) -> tuple[int, int]:
        """``(ready, idle)`` counted afresh from the sequences (for the tests)."""
        ready = sum(1 for s in self.live.values() if s.queue)
        idle = sum(1 for s in self.live.values() if not s.queue and not s.ending)
        return ready, idle

    def drain(self) -> list[Future]:
        """Every queued future, the table emptied (the batcher is closing)."""
        futures = [future for s in self.live.values() for _, future, _ in s.queue]
        for sequence_id in list(self.live):
            self.live[sequence_id].queue.clear()
            self._gone[sequence_id] = "in a closed batcher"
            self._free_slot(sequence_id)
        self.ready_count = self.idle_count = 0
        return futures
