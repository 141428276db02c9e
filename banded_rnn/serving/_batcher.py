"""``SequenceBatcher``: many live sequences, one compiled step per tick."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import Future
from typing import Any

import flax.linen as nn
import numpy as np

from .._internal import stream_spec
from .._internal import validate as _validate
from ._frames import check_frame, check_sequence_id
from ._sequences import SequenceTable
from ._tick import Tick, check_batch_sizes


class SequenceBatcher:
    """Serves many live sequences through one model: each holds a slot of a
    fixed batch, and a scheduler thread runs the frames that are ready as one
    batched call per tick.

    ``start(sequence_id)`` takes a free slot with a zero state;
    ``submit(sequence_id, frame)`` queues one frame ``[bands, frame_length,
    features]`` and returns a ``concurrent.futures.Future`` of its outputs
    ``[bands, frame_length, ...]`` (NumPy; ``await submit_async(...)`` in
    asyncio code); ``end(sequence_id)`` frees the slot once the frames already
    submitted have run. Frames of one sequence run in the order submitted, one
    per tick.

    A tick starts when every live sequence has a frame queued, when as many
    have one as the largest batch size holds, or ``max_delay`` seconds after
    the oldest queued frame arrived, whichever comes first: a lone client
    waits for nobody. It takes the first queued frame of each sequence, up to
    the largest batch size (those that have waited longest first), gathers
    their slots into the smallest compiled batch size that holds them (the
    rest of that batch reads and writes a scratch slot), runs the model once, and
    scatters their new states back; a slot with no frame in a tick is not
    read or written, so its state stays as it was, bit for bit. After
    :meth:`warmup` no tick compiles (:attr:`compile_count`).

    Each sequence's outputs and state are those of the same frames run alone
    through ``Stream(model, variables, 1, num_bands, max_chunk=frame_length)``,
    whatever the other sequences do: bit for bit for a ``BandedLSTM`` on the
    native CPU kernel (its arithmetic per row does not depend on the batch);
    for layers computed by XLA (e.g. dense layers around it), within float32
    rounding, as XLA may round a product differently for another batch size.

    Refusals touch nothing else: a frame of the wrong shape or dtype, for a
    sequence not started, ended or freed, a NaN or infinity (with
    ``check_finite``), or one submitted after :meth:`close`, gets a
    ``ValueError`` / ``TypeError`` / ``RuntimeError`` set on its own future;
    ``start`` raises ``BatcherFullError`` when every slot is taken (it does not
    queue), ``ValueError`` for an id already started. A sequence that sends no
    frame for ``max_idle`` seconds is ended. A sequence may have at most
    ``max_queued`` frames waiting; more are refused (``ValueError``) until
    its outputs catch up. Cancelling a future before its tick drops that
    frame; ``end(sequence_id, drop_queued=True)`` drops every frame not yet
    run and frees the slot at once.

    >>> import jax, numpy as np
    >>> from banded_rnn import BandedLSTM
    >>> model = BandedLSTM(units=8)
    >>> variables = model.init(jax.random.key(0), None, np.zeros((1, 3, 1, 4), np.float32))
    >>> with SequenceBatcher(model, variables, num_slots=2, num_bands=3) as batcher:
    ...     batcher.warmup()
    ...     batcher.start("a")
    ...     frame = np.ones((3, 1, 4), np.float32)            # [bands, time, features]
    ...     batcher.submit("a", frame).result().shape       # [bands, time, units]
    (3, 1, 8)

    Args:
      model: a ``BandedLSTM``, or a Flax module with its calling convention.
      variables: its variables; moved to the device once, here.
      num_slots: how many sequences can be live at once.
      num_bands: the bands of every frame.
      frame_length: the time steps of every frame (fixed: one compiled shape
        per batch size).
      features: the frames' last axis; read from a ``BandedLSTM``'s variables,
        required for other models.
      dtype: the floating dtype frames are cast to.
      max_delay: the longest a ready frame waits for the other sequences' frames.
      max_idle: seconds after a sequence's last frame ran (or it started), with
        no frame queued, after which it is ended (None: never).
      max_queued: the most frames one sequence may have waiting to run.
      batch_sizes: the batch sizes compiled; the largest is the most frames a
        tick runs. By default every size up to 8, then the powers of two, and
        ``num_slots``. Where a frame already fills the cores (batching gains
        nothing), small ticks keep latency down: ``[1]`` runs one frame per tick.
      check_finite: refuse frames holding a NaN or an infinity, and any frame
        whose new state or outputs would hold one (that sequence's state is
        then left as it was).
    """

    def __init__(
        self,
        model: nn.Module,
        variables: Any,
        num_slots: int,
        num_bands: int,
        frame_length: int = 1,
        *,
        features: int | None = None,
        dtype: Any = np.float32,
        max_delay: float = 0.002,
        max_idle: float | None = 60.0,
        max_queued: int = 64,
        batch_sizes: Sequence[int] | None = None,
        check_finite: bool = False,
    ) -> None:
        self.max_delay = _seconds(max_delay, "max_delay")
        self.max_idle = None if max_idle is None else _seconds(max_idle, "max_idle", positive=True)
        self.max_queued = _validate.positive_int(max_queued, "max_queued")
        self.check_finite = bool(check_finite)
        self.num_slots = _validate.positive_int(num_slots, "num_slots")
        self.frame_length = _validate.positive_int(frame_length, "frame_length")
        self.batch_sizes = check_batch_sizes(batch_sizes, self.num_slots)
        spec = stream_spec(model, variables, 1, num_bands, dtype, features)
        self.num_bands, self.features, self.dtype = spec.num_bands, spec.features, spec.dtype
        self._tick = Tick(
            model, variables, spec, self.num_slots, self.frame_length, self.batch_sizes,
            self.check_finite,
        )  # fmt: skip
        self.frame_shape, self.output_shape = self._tick.frame_shape, self._tick.output_shape
        self._table = SequenceTable(self.num_slots)
        self._cond = threading.Condition()
        self._closed: str | None = None  # why, once closed
        self._thread = threading.Thread(target=self._schedule, name="SequenceBatcher", daemon=True)
        self._thread.start()

    @property
    def compile_count(self) -> int:
        """XLA compilations the batcher's ticks and :meth:`warmup` have caused so far."""
        return self._tick.compiles.count

    @property
    def sequences(self) -> tuple[Hashable, ...]:
        """The ids of the sequences holding a slot, in slot order."""
        with self._cond:
            live = sorted(self._table.live.items(), key=lambda item: item[1].slot)
            return tuple(sequence_id for sequence_id, _ in live)

    def warmup(self) -> None:
        """Compiles the tick for every batch size (on a scratch state)."""
        self._tick.warmup()

    def start(self, sequence_id: Hashable) -> None:
        """Starts ``sequence_id`` in a free slot, from a zero state."""
        sequence_id = check_sequence_id(sequence_id)
        with self._cond:
            self._refuse_if_closed()
            self._table.start(sequence_id)
            self._cond.notify()  # its idle time runs from now

    def end(self, sequence_id: Hashable, *, drop_queued: bool = False) -> None:
        """Ends ``sequence_id``: it takes no more frames, those submitted still
        run, and its slot is free once they have; with ``drop_queued``, the
        frames not yet run are dropped (their futures cancelled) and the slot
        is free now. ``ValueError`` if it is not live."""
        with self._cond:
            self._refuse_if_closed()
            dropped = self._table.end(check_sequence_id(sequence_id), "ended", drop=drop_queued)
            self._cond.notify()
        for future in dropped:
            future.cancel()

    def state(self, sequence_id: Hashable) -> Any:
        """A NumPy copy of the state of ``sequence_id`` after its frames run so
        far (zeros before its first): the model's state pytree with leaves
        ``[bands, ...]``."""
        with self._cond:
            sequence = self._table.accepting(check_sequence_id(sequence_id))
            if not sequence.has_run:  # the slot still holds its last occupant's state
                return self._tick.zero_row_state()
        return self._tick.row_state(sequence.slot)

    def submit(self, sequence_id: Hashable, frame: Any) -> Future:
        """Queues ``frame [bands, frame_length, features]`` of ``sequence_id``;
        returns a future of its outputs ``[bands, frame_length, ...]``. A
        refused frame's future holds the error; nothing else changes."""
        future: Future = Future()
        try:
            sequence_id = check_sequence_id(sequence_id)
            frame = check_frame(frame, self.frame_shape, self.dtype, self.check_finite)
            with self._cond:
                self._refuse_if_closed()
                sequence = self._table.accepting(sequence_id)
                if len(sequence.queue) >= self.max_queued:
                    raise ValueError(
                        f"frame: {sequence_id!r} has {len(sequence.queue)} frames waiting to run "
                        f"(max_queued={self.max_queued}); wait for their outputs first"
                    )
                now = time.monotonic()
                sequence.last_seen = now
                if self._table.queue_frame(sequence, (frame, future, now)) and (
                    self._table.ready_count == 1  # the first: its max_delay starts now
                    or self._table.idle_count == 0  # everyone has a frame
                    or self._table.ready_count >= self.batch_sizes[-1]  # a full tick
                ):
                    self._cond.notify()  # otherwise the scheduler's wait ends in time
        except (ValueError, TypeError, RuntimeError) as error:
            future.set_exception(error)
        return future

    async def submit_async(self, sequence_id: Hashable, frame: Any) -> np.ndarray:
        """:meth:`submit`, awaited: the outputs, or the frame's error raised."""
        return await asyncio.wrap_future(self.submit(sequence_id, frame))

    def close(self) -> None:
        """Stops the scheduler after the tick it is running; frames not yet
        run get a ``RuntimeError``. Calling it again does nothing."""
        with self._cond:
            if self._closed is None:
                self._closed = "the SequenceBatcher is closed"
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> SequenceBatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _refuse_if_closed(self) -> None:
        if self._closed is not None:
            raise RuntimeError(f"{self._closed}: it takes no more sequences or frames")

    def _schedule(self) -> None:
        """The scheduler thread: wait for a tick, run it, until closed. If it
        fails, the batcher closes, failing every frame not yet run."""
        try:
            while True:
                with self._cond:
                    batch = self._next_tick()
                    if batch is None:
                        break
                self._run(batch)
        except BaseException as error:
            with self._cond:
                self._closed = f"the SequenceBatcher's scheduler stopped on {error!r}"
            raise
        finally:
            with self._cond:
                self._closed = self._closed or "the SequenceBatcher is closed"
                pending = self._table.drain()
            failure = RuntimeError(f"{self._closed} before this frame ran")
            for future in pending:
                if not future.done():
                    future.set_exception(failure)

    def _next_tick(self) -> list | None:
        """Waits (the lock held, released while waiting) until a tick is due;
        returns its frames, or None once closed."""
        while self._closed is None:
            now = time.monotonic()
            next_expiry = self._table.expire(now, self.max_idle)
            oldest, count, everyone = self._table.ready()
            full = count >= self.batch_sizes[-1]
            if oldest is not None and (everyone or full or now >= oldest + self.max_delay):
                return self._table.take(self.batch_sizes[-1])
            due = None if oldest is None else oldest + self.max_delay
            wake = [t for t in (next_expiry, due) if t is not None]
            self._cond.wait(max(min(wake) - now, 0.0) if wake else None)
        return None

    def _run(self, batch: list) -> None:
        """Runs one tick and settles its futures."""
        if not batch:
            return
        sequences, fresh, frames, futures = (list(column) for column in zip(*batch, strict=True))
        try:
            outputs, finite = self._tick.run([s.slot for s in sequences], fresh, frames)
        except Exception as error:  # the donated state may be lost: stop, failing everything
            for future in futures:
                future.set_exception(error)
            with self._cond:
                self._closed = f"the SequenceBatcher stopped after a tick raised {error!r}"
            return
        with self._cond:  # idle time runs from a frame's end, not its submission
            now = time.monotonic()
            for sequence in sequences:
                sequence.last_seen, sequence.has_run = now, True
        for row, future in enumerate(futures):
            if finite[row]:
                future.set_result(outputs[row])
            else:
                future.set_exception(
                    ValueError(
                        "frame: its outputs or the state it leads to hold NaN or infinite values "
                        "(check_finite=True); refused, the sequence's state left as it was"
                    )
                )


def _seconds(value: Any, name: str, *, positive: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name}: expected a finite number of seconds >= 0; received {value!r}")
    if positive and value == 0:
        raise ValueError(f"{name}: expected a number of seconds > 0 (or None); received 0")
    return float(value)
