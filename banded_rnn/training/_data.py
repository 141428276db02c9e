"""Sequences of any lengths dealt as fixed-shape batches: chunks for truncated
BPTT, or whole sequences in buckets, padded, with the lengths that say so."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from .._internal import validate as _validate
from ._sequences import bucket_of, check_buckets, check_pairs, pad_time


class Chunk(NamedTuple):
    """One training window, as :class:`ChunkStream` deals it.

    Attributes:
      inputs: ``[batch, bands, chunk_length, features]``, zeros past each
        entry's ``seq_lengths``.
      targets: ``[batch, bands, chunk_length, ...]`` (per step, zeros past the
        lengths), or ``[batch, ...]``: each entry's sequence's target (per sequence).
      reset: ``[batch]`` bools: the entry starts a new sequence with this chunk,
        so its state must start from zeros.
      sequence: ``[batch]`` integers: the running number of the sequence each
        entry is playing, unique over the whole stream (the loop derives each
        sequence's dropout key from it); -1 for an entry left empty.
      seq_lengths: ``[batch]`` int32, the valid steps of each entry in this
        window, or None when every step of every window is valid (sequences
        whose lengths need no padding).
      ends: ``[batch]`` bools, per-sequence targets only (else None): the
        entry's sequence ends in this window, so its target counts here.

    With several processes, each field holds this process's entries only
    (``ChunkStream.rows``): ``batch`` is its share of the global batch.
    """

    inputs: np.ndarray
    targets: np.ndarray
    reset: np.ndarray
    sequence: np.ndarray
    seq_lengths: np.ndarray | None = None
    ends: np.ndarray | None = None


class ChunkStream:
    """Deals training windows of sequences of any lengths, endlessly.

    Two ways, each with every window's shape fixed (so the step compiles once
    per shape):

    * ``chunk_length=K`` (truncated BPTT): every batch entry plays one
      sequence after another, ``K`` steps per call, so its state can be carried
      from chunk to chunk. A sequence's last chunk may be short: it is padded
      with zeros and ``Chunk.seq_lengths`` says how many steps are its own (a
      chunk never holds two sequences). When an entry's sequence ends, it
      takes the next sequence of a shuffled order (shuffled anew every epoch,
      from ``seed``) and its ``reset`` flag is set for that chunk.
    * ``chunk_length=None`` (whole sequences): each window holds
      ``batch_size`` whole sequences of one bucket, padded to the bucket's
      length (``buckets``, default one bucket as long as the longest
      sequence), every entry reset. Each epoch deals every sequence once:
      sequences go to the shortest bucket that holds them, are shuffled
      within it, cut into batches (the last one of a bucket filled with
      empty entries: length 0, ``sequence`` -1, no target counts), and the
      batches of all buckets are shuffled together.

    ``seq_lengths`` is given with every window when some sequence needs
    padding (and None otherwise); ``ends`` with every window when
    ``targets_per="sequence"``. :func:`fit` passes both to the step.

    The stream is a pure function of ``seed`` and its :meth:`position`, which
    a checkpoint saves and :meth:`set_position` restores.

    With several processes (``jax.distributed``), ``batch_size`` is the global
    batch and each process is dealt its own block of entries, ``batch_size //
    process_count`` rows from ``process_index * rows`` on (``rows``): the
    windows of those entries alone are cut from ``inputs``, while every
    process keeps the bookkeeping of the whole batch, so the entries play
    exactly the sequences they would in one process. Every process passes the
    same sequences (their lengths at least: it reads only the ones its
    entries play) and seed.

    Args:
      inputs: sequences ``[bands, time_i, features]``: a list, or an array
        ``[sequences, bands, time, features]``.
      targets: per step, the matching ``[bands, time_i, ...]``; per sequence,
        one target each (an integer label, or any array of one shape).
      batch_size: entries per window, over all processes.
      chunk_length: time steps per window, or None for whole sequences.
      seed: the shuffling seed.
      shuffle: if False, sequences are played in order, epoch after epoch.
      targets_per: ``"step"`` or ``"sequence"``, as the training step's.
      buckets: with ``chunk_length=None``, the padded lengths (increasing; the
        last at least the longest sequence).
      process_index, process_count: this process's block of entries; by
        default JAX's ``jax.process_index()`` and ``jax.process_count()`` (so
        build the stream after ``jax.distributed.initialize()``).

    >>> rng = np.random.default_rng(0)
    >>> inputs = [rng.normal(size=(3, t, 4)) for t in (8, 14)]   # [bands, time_i, features]
    >>> targets = [rng.normal(size=(3, t, 2)) for t in (8, 14)]
    >>> chunks = ChunkStream(inputs, targets, batch_size=2, chunk_length=4, seed=0)
    >>> chunk = next(chunks)
    >>> chunk.inputs.shape, chunk.reset                # [batch, bands, chunk_length, features]
    ((2, 3, 4, 4), array([ True,  True]))
    >>> next(chunks).reset                             # both entries go on with their sequence
    array([False, False])
    >>> whole = ChunkStream(inputs, [0, 1], batch_size=2, targets_per="sequence")
    >>> batch = next(whole)                            # both sequences, padded to 14 steps
    >>> batch.inputs.shape, sorted(batch.seq_lengths.tolist()), batch.ends
    ((2, 3, 14, 4), [8, 14], array([ True,  True]))
    """

    def __init__(
        self,
        inputs: Sequence[np.ndarray] | np.ndarray,
        targets: Sequence[Any] | np.ndarray,
        *,
        batch_size: int,
        chunk_length: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        targets_per: str = "step",
        buckets: Sequence[int] | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> None:
        batch_size = _validate.positive_int(batch_size, "batch_size")
        self.rows = _process_block(batch_size, process_index, process_count)
        chunk_length = _validate.positive_int(chunk_length, "chunk_length", optional=True)
        self.inputs, self.targets = check_pairs(inputs, targets, targets_per)
        self.targets_per = targets_per
        self.batch_size = batch_size
        self.chunk_length = chunk_length
        self.seed = seed
        self.shuffle = shuffle
        self._lengths = np.array([x.shape[1] for x in self.inputs])
        self._orders: dict[int, np.ndarray] = {}
        if chunk_length is None:
            self.buckets = check_buckets(buckets, int(self._lengths.max()))
            self._plans: dict[int, list[tuple[int, list[tuple[int, int]]]]] = {}
            counts = np.bincount(
                [bucket_of(t, self.buckets) for t in self._lengths], minlength=len(self.buckets)
            )
            self._batches_per_epoch = int(sum(-(-c // batch_size) for c in counts))
            full = all(c % batch_size == 0 for c in counts)
            padded = not full or any(t != self.buckets[bucket_of(t, self.buckets)] for t in
                                     self._lengths)  # fmt: skip
            self.padded = bool(padded)
            position = {"next_batch": np.zeros((), np.int64)}
        else:
            if buckets is not None:
                raise ValueError(
                    "buckets: pads whole sequences (chunk_length=None); with chunk_length="
                    f"{chunk_length} every window is {chunk_length} steps long"
                )
            self.buckets = None
            self._chunks = -(-self._lengths // chunk_length)
            self.padded = bool(np.any(self._lengths % chunk_length))
            position = {
                "next_sequence": np.zeros((), np.int64),
                "entry_sequence": np.full(batch_size, -1, np.int64),
                "entry_chunk": np.zeros(batch_size, np.int64),
            }
        self._last: tuple[list[int], list[int]] = ([], [])
        self.set_position(position)

    @property
    def num_bands(self) -> int:
        return self.inputs[0].shape[0]

    @property
    def num_features(self) -> int:
        return self.inputs[0].shape[2]

    @property
    def window_length(self) -> int:
        """The time steps of the shortest window the stream deals."""
        return self.chunk_length or self.buckets[0]

    def position(self) -> dict[str, np.ndarray]:
        """Where the stream is. With ``chunk_length``: ``next_sequence`` (a
        counter), and per entry the running number of its sequence
        (``entry_sequence``, -1 before the first) and the index of its next
        chunk (``entry_chunk``). With whole sequences: ``next_batch``, the
        number of batches dealt."""
        return {k: v.copy() for k, v in self._position.items()}

    def set_position(self, position: dict[str, Any]) -> None:
        """Moves the stream to ``position``, as :meth:`position` returned it."""
        self._position = {k: np.array(v, np.int64) for k, v in position.items()}

    def last_batch(self) -> list[tuple[int, int]]:
        """Per entry of the last window dealt (this process's rows): the index
        into ``inputs`` of its sequence (-1 for an empty entry) and the index
        of the window within that sequence."""
        return list(zip(*self._last, strict=True))

    def _order(self, epoch: int) -> np.ndarray:
        """The order of the sequences in ``epoch``: indices into ``inputs``."""
        if not self.shuffle:
            return np.arange(len(self.inputs))
        if epoch not in self._orders:
            # Entries can straddle a few epochs at once; keep only recent orders.
            for old in [e for e in self._orders if e < epoch - 2]:
                del self._orders[old]
            self._orders[epoch] = np.random.default_rng((self.seed, epoch)).permutation(
                len(self.inputs)
            )
        return self._orders[epoch]

    def _sequence_index(self, number: int) -> int:
        """The index into ``inputs`` of the stream's ``number``-th sequence."""
        epoch, offset = divmod(number, len(self.inputs))
        return int(self._order(epoch)[offset])

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        return self._next_chunk() if self.chunk_length else self._next_batch()

    def _window(self, index: int, start: int, length: int):
        """Sequence ``index``'s inputs, targets and valid steps from ``start``,
        padded to ``length`` steps."""
        stop = min(start + length, self._lengths[index])
        x = pad_time(self.inputs[index][:, start:stop], length)
        y = self.targets[index]
        if self.targets_per == "step":
            y = pad_time(y[:, start:stop], length)
        return x, y, stop - start

    def _empty(self, length: int):
        x = np.zeros((self.num_bands, length, self.num_features), self.inputs[0].dtype)
        y = self.targets[0]
        shape = (self.num_bands, length, *y.shape[2:]) if self.targets_per == "step" else y.shape
        return x, np.zeros(shape, y.dtype), 0

    def _chunk(self, windows, reset, sequence, ends) -> Chunk:
        xs, ys, lengths = zip(*windows, strict=True)
        return Chunk(
            np.stack(xs),
            np.stack(ys),
            reset,
            sequence,
            np.array(lengths, np.int32) if self.padded else None,
            ends if self.targets_per == "sequence" else None,
        )

    def _next_chunk(self) -> Chunk:
        pos = self._position
        reset = np.zeros(self.batch_size, bool)
        ends = np.zeros(self.batch_size, bool)
        windows, indices, chunks = [], [], []
        for entry in range(self.batch_size):  # every entry's bookkeeping; our rows' data
            number = pos["entry_sequence"][entry]
            if (
                number < 0
                or pos["entry_chunk"][entry] >= self._chunks[self._sequence_index(number)]
            ):
                pos["entry_sequence"][entry] = pos["next_sequence"]
                pos["next_sequence"] += 1
                pos["entry_chunk"][entry] = 0
                reset[entry] = True
            index = self._sequence_index(int(pos["entry_sequence"][entry]))
            chunk = int(pos["entry_chunk"][entry])
            ends[entry] = chunk + 1 == self._chunks[index]
            if self.rows.start <= entry < self.rows.stop:
                windows.append(self._window(index, chunk * self.chunk_length, self.chunk_length))
                indices.append(index)
                chunks.append(chunk)
            pos["entry_chunk"][entry] += 1
        self._last = (indices, chunks)
        ours = self.rows
        return self._chunk(windows, reset[ours], pos["entry_sequence"][ours].copy(), ends[ours])

    def _plan(self, epoch: int) -> list[tuple[int, list[tuple[int, int]]]]:
        """The batches of ``epoch``, shuffled over all buckets: each its padded
        length and, per entry, the index into ``inputs`` and the running
        number of its sequence (``(-1, -1)`` for an empty entry)."""
        if epoch not in self._plans:
            self._plans = {k: v for k, v in self._plans.items() if k >= epoch - 1}
            by_bucket: list[list[tuple[int, int]]] = [[] for _ in self.buckets]
            first = epoch * len(self.inputs)
            for rank, index in enumerate(self._order(epoch)):
                bucket = by_bucket[bucket_of(self._lengths[index], self.buckets)]
                bucket.append((int(index), first + rank))
            plan = []
            for length, members in zip(self.buckets, by_bucket, strict=True):
                for start in range(0, len(members), self.batch_size):
                    batch = members[start : start + self.batch_size]
                    plan.append((length, batch + [(-1, -1)] * (self.batch_size - len(batch))))
            if self.shuffle:
                order = np.random.default_rng((self.seed, epoch, 1)).permutation(len(plan))
                plan = [plan[i] for i in order]
            self._plans[epoch] = plan
        return self._plans[epoch]

    def _next_batch(self) -> Chunk:
        epoch, offset = divmod(int(self._position["next_batch"]), self._batches_per_epoch)
        length, members = self._plan(epoch)[offset]
        self._position["next_batch"] += 1
        indices, numbers = (list(column) for column in zip(*members[self.rows], strict=True))
        windows = [self._empty(length) if i < 0 else self._window(i, 0, length) for i in indices]
        self._last = (indices, [0] * len(indices))
        ends = np.array([i >= 0 for i in indices])
        return self._chunk(windows, np.ones(len(indices), bool), np.array(numbers), ends)


def _process_block(batch_size: int, index: Any, count: Any) -> slice:
    """The entries ``[start, stop)`` of process ``index`` of ``count``."""
    count = _validate.positive_int(jax.process_count() if count is None else count, "process_count")
    index = _validate.positive_int(
        jax.process_index() if index is None else index, "process_index", minimum=0
    )
    if index >= count or batch_size % count:
        raise ValueError(
            f"batch_size, process_index: expected a batch_size divisible by process_count = "
            f"{count} and 0 <= process_index < {count}; received batch_size={batch_size}, "
            f"process_index={index}"
        )
    rows = batch_size // count
    return slice(index * rows, (index + 1) * rows)
