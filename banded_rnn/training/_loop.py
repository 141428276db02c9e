"""The training loop: long sequences cut into chunks, state carried, reset, evaluated, saved."""

from __future__ import annotations

import array
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .. import _validate
from .._state import reset_state
from . import _mesh
from ._checkpoint import Checkpointer
from ._step import EvalStep, TrainStep, make_eval_step


class Chunk(NamedTuple):
    """One training window, as :class:`ChunkStream` deals it.

    Attributes:
      inputs: ``[batch, bands, chunk_length, features]``.
      targets: ``[batch, bands, chunk_length, ...]``.
      reset: ``[batch]`` bools: the entry starts a new sequence with this chunk,
        so its state must start from zeros.
      sequence: ``[batch]`` integers: the running number of the sequence each
        entry is playing, unique over the whole stream (the loop derives each
        sequence's dropout key from it).

    With several processes, each field holds this process's entries only
    (``ChunkStream.rows``): ``batch`` is its share of the global batch.
    """

    inputs: np.ndarray
    targets: np.ndarray
    reset: np.ndarray
    sequence: np.ndarray


def _as_sequences(arrays: Any, name: str, rank: int | None) -> list[np.ndarray]:
    sequences = [np.asarray(a) for a in arrays]
    if not sequences:
        raise ValueError(f"{name}: expected at least one sequence; received none")
    for index, seq in enumerate(sequences):
        if (rank is not None and seq.ndim != rank) or seq.ndim < 2:
            expected = "[bands, time, features]" if rank == 3 else "[bands, time, ...]"
            raise ValueError(
                f"{name}[{index}]: expected a sequence {expected}; received shape {seq.shape}"
            )
    return sequences


class ChunkStream:
    """Deals chunks of long sequences to the entries of a batch, endlessly.

    Every batch entry plays one sequence after another, ``chunk_length`` steps
    per call, so its state can be carried from chunk to chunk. When an entry's
    sequence ends it takes the next sequence of a shuffled order (shuffled
    anew every epoch, from ``seed``) and its ``reset`` flag is set for that
    chunk. Sequences may have different lengths, so entries start new
    sequences at different times.

    The stream is a pure function of ``seed`` and its :meth:`position`, which
    a checkpoint saves and :meth:`set_position` restores.

    With several processes (``jax.distributed``), ``batch_size`` is the global
    batch and each process is dealt its own block of entries, ``batch_size //
    process_count`` rows from ``process_index * rows`` on (``rows``): the
    chunks of those entries alone are cut from ``inputs``, while every
    process keeps the bookkeeping of the whole batch, so the entries play
    exactly the sequences they would in one process. Every process passes the
    same sequences (their lengths at least: it reads only the ones its
    entries play) and seed.

    Args:
      inputs: sequences ``[bands, time_i, features]``: a list, or an array
        ``[sequences, bands, time, features]``.
      targets: the matching ``[bands, time_i, ...]``.
      batch_size: entries per chunk, over all processes.
      chunk_length: time steps per chunk; every ``time_i`` must be a multiple.
      seed: the shuffling seed.
      shuffle: if False, sequences are played in order, epoch after epoch.
      process_index, process_count: this process's block of entries; by
        default JAX's ``jax.process_index()`` and ``jax.process_count()`` (so
        build the stream after ``jax.distributed.initialize()``).

    >>> rng = np.random.default_rng(0)
    >>> inputs = [rng.normal(size=(3, t, 4)) for t in (8, 16)]   # [bands, time_i, features]
    >>> targets = [rng.normal(size=(3, t, 2)) for t in (8, 16)]
    >>> chunks = ChunkStream(inputs, targets, batch_size=2, chunk_length=4, seed=0)
    >>> chunk = next(chunks)
    >>> chunk.inputs.shape, chunk.reset                # [batch, bands, chunk_length, features]
    ((2, 3, 4, 4), array([ True,  True]))
    >>> next(chunks).reset                             # both entries go on with their sequence
    array([False, False])
    """

    def __init__(
        self,
        inputs: Sequence[np.ndarray] | np.ndarray,
        targets: Sequence[np.ndarray] | np.ndarray,
        *,
        batch_size: int,
        chunk_length: int,
        seed: int = 0,
        shuffle: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> None:
        batch_size = _validate.positive_int(batch_size, "batch_size")
        self.rows = _process_block(batch_size, process_index, process_count)
        chunk_length = _validate.positive_int(chunk_length, "chunk_length")
        self.inputs = _as_sequences(inputs, "inputs", 3)
        self.targets = _as_sequences(targets, "targets", None)
        if len(self.targets) != len(self.inputs):
            raise ValueError(
                f"targets: expected {len(self.inputs)} sequences (one per input sequence); "
                f"received {len(self.targets)}"
            )
        bands, _, features = self.inputs[0].shape
        for index, (x, y) in enumerate(zip(self.inputs, self.targets, strict=True)):
            if x.shape[0] != bands or x.shape[2] != features:
                raise ValueError(
                    f"inputs[{index}]: expected [bands, time, features] = ({bands}, time, "
                    f"{features}) like inputs[0]; received {x.shape}"
                )
            if y.shape[:2] != x.shape[:2] or y.shape[2:] != self.targets[0].shape[2:]:
                raise ValueError(
                    f"targets[{index}]: expected [bands, time, ...] = "
                    f"{x.shape[:2] + self.targets[0].shape[2:]}; received {y.shape}"
                )
            if x.shape[1] % chunk_length or x.shape[1] == 0:
                raise ValueError(
                    f"inputs[{index}]: expected a length that is a positive multiple of "
                    f"chunk_length={chunk_length}; received time {x.shape[1]}"
                )
        self.batch_size = batch_size
        self.chunk_length = chunk_length
        self.seed = seed
        self.shuffle = shuffle
        self._chunks = np.array([x.shape[1] // chunk_length for x in self.inputs])
        self._orders: dict[int, np.ndarray] = {}
        self.set_position(
            {
                "next_sequence": np.zeros((), np.int64),
                "entry_sequence": np.full(batch_size, -1, np.int64),
                "entry_chunk": np.zeros(batch_size, np.int64),
            }
        )

    @property
    def num_bands(self) -> int:
        return self.inputs[0].shape[0]

    @property
    def num_features(self) -> int:
        return self.inputs[0].shape[2]

    def position(self) -> dict[str, np.ndarray]:
        """Where the stream is: ``next_sequence`` (a counter), and per entry the
        running number of its sequence (``entry_sequence``, -1 before the first)
        and the index of its next chunk (``entry_chunk``)."""
        return {k: v.copy() for k, v in self._position.items()}

    def set_position(self, position: dict[str, Any]) -> None:
        """Moves the stream to ``position``, as :meth:`position` returned it."""
        self._position = {k: np.array(v, np.int64) for k, v in position.items()}

    def _sequence_index(self, number: int) -> int:
        """The index into ``inputs`` of the stream's ``number``-th sequence."""
        epoch, offset = divmod(number, len(self.inputs))
        if not self.shuffle:
            return offset
        if epoch not in self._orders:
            # Entries can straddle a few epochs at once; keep only recent orders.
            for old in [e for e in self._orders if e < epoch - 2]:
                del self._orders[old]
            self._orders[epoch] = np.random.default_rng((self.seed, epoch)).permutation(
                len(self.inputs)
            )
        return int(self._orders[epoch][offset])

    def __iter__(self) -> ChunkStream:
        return self

    def __next__(self) -> Chunk:
        pos = self._position
        reset = np.zeros(self.batch_size, bool)
        inputs, targets = [], []
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
            if self.rows.start <= entry < self.rows.stop:
                index = self._sequence_index(int(pos["entry_sequence"][entry]))
                start = int(pos["entry_chunk"][entry]) * self.chunk_length
                window = slice(start, start + self.chunk_length)
                inputs.append(self.inputs[index][:, window])
                targets.append(self.targets[index][:, window])
            pos["entry_chunk"][entry] += 1
        ours = self.rows
        return Chunk(
            np.stack(inputs), np.stack(targets), reset[ours], pos["entry_sequence"][ours].copy()
        )


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


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      train_state: the trained ``TrainState``.
      state: the carried state after the last step.
      history: NumPy arrays: ``step``, ``loss`` and ``grad_norm`` for every step
        run by this call, ``eval_step``, ``eval_loss`` for every evaluation,
        and ``skipped_step``, the steps whose window was skipped as non-finite.
    """

    train_state: TrainState
    state: Any
    history: dict[str, np.ndarray]


_reset = jax.jit(reset_state)
_entry_keys = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))
"""One dropout key per batch entry: ``fold_in(rng, the entry's sequence number)``."""


def evaluate(
    eval_step: EvalStep,
    train_state: TrainState,
    inputs: Sequence[np.ndarray] | np.ndarray,
    targets: Sequence[np.ndarray] | np.ndarray,
    *,
    batch_size: int,
    chunk_length: int,
) -> float:
    """The loss on held-out sequences, each run once from zeros in chunks, state carried.

    Sequences of equal length are batched together (up to ``batch_size``). The
    result averages the chunks' losses weighted by the number of (sequence,
    time step) pairs each covers: for a loss that is a mean over its elements,
    the mean over every held-out step.

    >>> import optax
    >>> from banded_rnn import BandedLSTM
    >>> model = BandedLSTM(units=2)
    >>> rng = np.random.default_rng(0)
    >>> inputs = [rng.normal(size=(3, t, 4)).astype(np.float32) for t in (8, 8, 12)]
    >>> targets = [np.zeros((3, t, 2), np.float32) for t in (8, 8, 12)]
    >>> params = model.init(jax.random.key(0), None, inputs[0][None])["params"]
    >>> train_state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
    >>> step = make_eval_step(lambda out, target: jnp.mean((out - target) ** 2))
    >>> loss = evaluate(step, train_state, inputs, targets, batch_size=2, chunk_length=4)
    >>> 0.0 < loss < 1.0                               # outputs in (-1, 1), targets 0
    True
    """
    inputs = _as_sequences(inputs, "inputs", 3)
    targets = _as_sequences(targets, "targets", None)
    if len(inputs) != len(targets):
        raise ValueError(f"targets: expected {len(inputs)} sequences; received {len(targets)}")
    by_length: dict[int, list[int]] = {}
    for index, x in enumerate(inputs):
        by_length.setdefault(x.shape[1], []).append(index)
    split = 1 if eval_step.mesh is None else dict(eval_step.mesh.shape)[_mesh.BATCH]
    here = None  # for a group the mesh cannot split: the step without it, host copies
    total, weight = 0.0, 0
    for time, indices in sorted(by_length.items()):
        for start in range(0, len(indices), batch_size):
            group = indices[start : start + batch_size]
            x = np.stack([inputs[i] for i in group])
            y = np.stack([targets[i] for i in group])
            step, weights = eval_step, train_state
            if len(group) % split:
                if here is None:
                    here = eval_step.without_mesh(), _mesh.gather_to_host(train_state)
                step, weights = here
            state = None
            losses = []
            for t in range(0, time, chunk_length):
                window = slice(t, t + chunk_length)
                state, metrics = step(weights, state, x[:, :, window], y[:, :, window])
                losses.append((metrics["loss"], len(group) * (min(t + chunk_length, time) - t)))
            for loss, count in losses:
                total += float(loss) * count
                weight += count
    return total / weight


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        # Not Jupyter's widget (it needs ipywidgets): plain text outside a terminal.
        console=Console(force_jupyter=False),
        disable=not enabled,
    )


class NonFiniteError(ValueError):
    """:func:`fit` met a window whose loss or gradient is NaN or infinite, and
    stopped before applying it.

    Attributes:
      step: the step that was not applied.
      train_state: the training state of the step before (its buffers are
        live: the donated one was not updated).
      state: the carried state before that window.
      sequences: per batch entry, the index into the stream's ``inputs`` of
        the sequence it was playing.
      chunks: per batch entry, the index of that window within its sequence.
    """

    def __init__(self, message, *, step, train_state, state, sequences, chunks) -> None:
        super().__init__(message)
        self.step, self.train_state, self.state = step, train_state, state
        self.sequences, self.chunks = sequences, chunks


ON_NONFINITE = ("stop", "skip")
"""``fit``'s ``on_nonfinite`` values."""


class _History:
    """The per-step metrics and the evaluations of one :func:`fit` call.

    A step's metrics stay on the device until :meth:`flush` fetches every
    pending step's at once, into compact host arrays (4 to 8 bytes per value:
    no device buffer is kept per step)."""

    def __init__(self) -> None:
        self.steps = {"step": array.array("q"), "loss": array.array("f")}
        self.steps["grad_norm"] = array.array("f")
        self.steps["skipped_step"] = array.array("q")
        self.evaluations: dict[str, list[Any]] = {"eval_step": [], "eval_loss": []}
        self._pending: list[tuple[int, jax.Array, jax.Array]] = []

    def record_step(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self._pending.append((step, metrics["loss"], metrics["grad_norm"]))

    def flush(self) -> list[tuple[int, float, float]]:
        """Fetches the pending steps' metrics; returns ``(step, loss,
        grad_norm)`` of those that were not finite (their windows were skipped)."""
        if not self._pending:
            return []
        steps, losses, norms = zip(*self._pending, strict=True)
        self._pending.clear()
        nonfinite = []
        for step, loss, norm in zip(steps, *jax.device_get((losses, norms)), strict=True):
            self.steps["step"].append(step)
            self.steps["loss"].append(loss)
            self.steps["grad_norm"].append(norm)
            if not (np.isfinite(loss) and np.isfinite(norm)):
                self.steps["skipped_step"].append(step)
                nonfinite.append((step, float(loss), float(norm)))
        return nonfinite

    def record_evaluation(self, step: int, loss: float) -> None:
        self.evaluations["eval_step"].append(step)
        self.evaluations["eval_loss"].append(loss)

    def evaluated_at(self, step: int) -> bool:
        return bool(self.evaluations["eval_step"]) and self.evaluations["eval_step"][-1] == step

    def as_arrays(self) -> dict[str, np.ndarray]:
        self.flush()
        arrays = {k: np.array(v) for k, v in self.steps.items()}
        arrays.update({k: np.asarray(v) for k, v in self.evaluations.items()})
        return arrays


def _resume(checkpointer, train_state, state, rng, stream):
    """The newest checkpoint's ``(train_state, state, rng)``, the stream set to
    its position; the arguments themselves when there is no checkpoint."""
    if checkpointer is None or checkpointer.latest_step() is None:
        return train_state, state, rng
    restored = checkpointer.restore(train_state, state, rng, stream.position())
    stream.set_position(restored.stream)
    return restored.train_state, restored.state, restored.rng


def _main_process() -> bool:
    """Whether this process logs: the only one, or the first of several."""
    return jax.process_index() == 0


def _check_rows(mesh, stream: ChunkStream) -> None:
    """Raises unless ``stream`` deals this process the rows its devices hold
    (all of them, without a mesh spanning processes)."""
    if mesh is None or not _mesh.spans_processes(mesh):
        rows = slice(0, stream.batch_size)
    else:
        rows = _mesh.process_rows(mesh, stream.batch_size)
    if rows != stream.rows:
        raise ValueError(
            f"stream: deals this process the batch rows [{stream.rows.start}, "
            f"{stream.rows.stop}), but its devices on the step's mesh hold [{rows.start}, "
            f"{rows.stop}); build the ChunkStream with process_index and process_count "
            "matching the mesh (by default, JAX's)"
        )


def _finished_already(step: int, num_steps: int, checkpointer: Checkpointer | None) -> bool:
    """True, with a warning, when a run (resumed) at ``step`` has nothing left to train."""
    if step < num_steps or num_steps == 0:
        return False
    if not _main_process():
        return True
    where = "" if checkpointer is None else f" (resumed from {checkpointer.directory})"
    warnings.warn(
        f"fit: train_state is already at step {step}{where}, and num_steps={num_steps}: "
        "nothing to train. Raise num_steps to train on.",
        stacklevel=3,
    )
    return True


def _train_one(train_step, train_state, state, stream, rng, carry_state, keys_per_entry):
    """Takes the next chunk, restarts the entries that begin a sequence, runs
    one step; returns the step's results and the chunk. With several
    processes, the chunk holds this process's rows, joined into the global
    batch here."""
    chunk = next(stream)
    reset = chunk.reset if carry_state else np.ones_like(chunk.reset)
    keys = _entry_keys(rng, chunk.sequence) if keys_per_entry else None
    batch = (chunk.inputs, chunk.targets, reset, keys)
    if train_step.mesh is not None and _mesh.spans_processes(train_step.mesh):
        batch = _mesh.global_batch(train_step.mesh, batch)
    inputs, targets, reset, keys = batch
    return *train_step(train_state, _reset(state, reset), inputs, targets, keys), chunk


def _nonfinite_error(step, loss, grad_norm, chunk, stream, train_state, state):
    """The :class:`NonFiniteError` for ``step``, naming the batch it ran."""
    sequences = [stream._sequence_index(int(n)) for n in chunk.sequence]
    chunks = [int(c) - 1 for c in stream.position()["entry_chunk"][stream.rows]]
    batch = ", ".join(f"inputs[{s}] chunk {c}" for s, c in zip(sequences, chunks, strict=True))
    entries = [
        entry
        for entry in range(len(sequences))
        if not (np.isfinite(chunk.inputs[entry]).all() and np.isfinite(chunk.targets[entry]).all())
    ]
    cause = (
        f"non-finite inputs or targets in batch entries {entries}"
        if entries
        else "inputs and targets are finite: the model or the loss diverged"
    )
    message = (
        f"fit: step {step} has loss {loss} and gradient norm {grad_norm} ({cause}); its "
        f"update was not applied, and training stopped. The batch: {batch}. The error's "
        f"train_state and state are those before it (step {step - 1}); checkpoints stop there "
        "too. Pass on_nonfinite='skip' to skip such windows and go on."
    )
    return NonFiniteError(
        message,
        step=step,
        train_state=train_state.replace(step=train_state.step - 1),
        state=state,
        sequences=sequences,
        chunks=chunks,
    )


def fit(
    train_step: TrainStep,
    train_state: TrainState,
    stream: ChunkStream,
    *,
    num_steps: int,
    rng: jax.Array,
    carry_state: bool = True,
    eval_data: tuple[Any, Any] | None = None,
    eval_every: int | None = None,
    eval_step: EvalStep | None = None,
    checkpointer: Checkpointer | None = None,
    checkpoint_every: int | None = None,
    progress: bool = True,
    log_every: int = 10,
    on_nonfinite: str = "stop",
) -> FitResult:
    """Trains until ``train_state.step == num_steps`` on the chunks of ``stream``.

    Every step takes the next :class:`Chunk`, zeros the state of the entries
    that start a new sequence (of every entry if ``carry_state`` is False, the
    baseline that forgets everything at every chunk), and calls ``train_step``
    with the state carried from the previous step. The dropout key of an entry
    is ``jax.random.fold_in(rng, sequence number)``: the same for all the
    chunks of one sequence, so its masks are those of the sequence run whole.
    (A model without dropout gets no keys, and runs the batch in one piece.)

    With a ``checkpointer`` that already holds a checkpoint, training resumes
    from its newest one (training state, carried state, rng and the stream's
    position): the losses are then those of the uninterrupted run. A checkpoint
    is saved every ``checkpoint_every`` steps and at the end. If the training
    state is already at ``num_steps`` (a finished run resumed), nothing is
    trained or evaluated, and a ``UserWarning`` says so.

    A window whose loss or gradient is NaN or infinite is never applied (see
    :func:`make_train_step`). With ``on_nonfinite="stop"`` (the default),
    ``fit`` then raises :class:`NonFiniteError`, naming the step and the
    sequences and chunks of its batch, and holding the training state and
    carried state of the step before; no checkpoint is saved after the last
    good step, so the checkpoints are untouched. With ``"skip"``, training
    goes on from the state before that window (the step count advances), the
    step is listed in ``history["skipped_step"]``, and a ``UserWarning`` at the
    end says how many were skipped. ``"stop"`` fetches each step's loss to the
    host before the next step is dispatched (on a model whose step takes 0.15
    ms, that doubles its time; on larger ones it is lost in the noise);
    ``"skip"`` fetches them every ``log_every`` steps.

    With several processes (``jax.distributed``), every process calls ``fit``
    with the same arguments: a ``train_step`` whose mesh spans every process's
    devices, a ``stream`` dealing this process its rows (the default), and the
    same fresh ``train_state`` and ``rng``. The rows are joined into the global
    batch, checkpoints are saved and restored by all together, and the
    progress bar and warnings come from process 0. ``FitResult.state`` is then
    split over the processes: :func:`gather_to_host` brings it whole to each.

    Args:
      train_step: from :func:`make_train_step`.
      train_state: the ``TrainState`` to start from (donated to the step).
      stream: the training chunks.
      num_steps: the step count to reach, counting steps already in ``train_state``.
      rng: the base dropout key.
      carry_state: carry each entry's state from chunk to chunk (truncated BPTT).
      eval_data: held-out ``(inputs, targets)`` sequences, as for :func:`evaluate`,
        evaluated every ``eval_every`` steps (if set) and at the end.
      eval_step: default ``make_eval_step(train_step.loss_fn, mesh=train_step.mesh)``.
      checkpointer: a :class:`Checkpointer` to save to and resume from.
      checkpoint_every: steps between checkpoints (default: only at the end).
      progress: show a progress bar (rich).
      log_every: steps between updates of the loss shown on the progress bar.
      on_nonfinite: ``"stop"`` or ``"skip"``, for a non-finite window.

    Returns:
      A :class:`FitResult` ``(train_state, state, history)``.

    >>> import optax
    >>> from banded_rnn import BandedLSTM
    >>> from banded_rnn.training import make_train_step
    >>> model = BandedLSTM(units=2)
    >>> rng = np.random.default_rng(0)
    >>> inputs = [rng.normal(size=(3, t, 4)).astype(np.float32) for t in (8, 16, 8)]
    >>> targets = [np.zeros((3, t, 2), np.float32) for t in (8, 16, 8)]
    >>> params = model.init(jax.random.key(0), None, inputs[0][None])["params"]
    >>> train_state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(0.05))
    >>> step = make_train_step(lambda out, target: jnp.mean((out - target) ** 2))
    >>> chunks = ChunkStream(inputs, targets, batch_size=2, chunk_length=4)
    >>> result = fit(step, train_state, chunks, num_steps=20, rng=jax.random.key(1),
    ...              progress=False)
    >>> result.history["loss"].shape, bool(result.history["loss"][-1] < result.history["loss"][0])
    ((20,), True)
    """
    num_steps = _validate.positive_int(num_steps, "num_steps", minimum=0)
    log_every = _validate.positive_int(log_every, "log_every")
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite: expected one of {ON_NONFINITE}; received {on_nonfinite!r}")
    if not isinstance(stream, ChunkStream):
        raise TypeError(f"stream: expected a ChunkStream; received {type(stream).__name__}")
    if eval_data is not None and eval_step is None:
        eval_step = make_eval_step(train_step.loss_fn, mesh=train_step.mesh)
    shape = (stream.batch_size, stream.num_bands, stream.chunk_length, stream.num_features)
    _check_rows(train_step.mesh, stream)
    state = train_step.initial_state(train_state, *shape[:2], shape[3])
    train_state, _ = train_step.place(train_state)  # where checkpoints are restored to
    train_state, state, rng = _resume(checkpointer, train_state, state, rng, stream)
    step = int(train_state.step)
    history = _History()
    if _finished_already(step, num_steps, checkpointer):
        return FitResult(train_state, state, history.as_arrays())
    # Without dropout no keys are needed, and the step runs the batch in one piece.
    keys_per_entry = train_step.needs_rng(train_state, jax.ShapeDtypeStruct(shape, jnp.float32))
    lengths = {"batch_size": stream.batch_size, "chunk_length": stream.chunk_length}

    def run_evaluation() -> None:
        history.record_evaluation(step, evaluate(eval_step, train_state, *eval_data, **lengths))

    with _progress(progress and _main_process()) as bar:
        task = bar.add_task("training", total=num_steps, completed=step, status="")
        while step < num_steps:
            train_state, state, metrics, chunk = _train_one(
                train_step, train_state, state, stream, rng, carry_state, keys_per_entry
            )
            step += 1
            history.record_step(step, metrics)
            logged = step % log_every == 0 or step == num_steps
            # "stop" checks every step before the next is dispatched; "skip" needs no sync.
            if on_nonfinite == "stop" or logged:
                nonfinite = history.flush()
                if nonfinite and on_nonfinite == "stop":
                    raise _nonfinite_error(*nonfinite[0], chunk, stream, train_state, state)
            if eval_data is not None and eval_every and step % eval_every == 0:
                run_evaluation()
            if checkpointer is not None and checkpoint_every and step % checkpoint_every == 0:
                checkpointer.save(train_state, state, rng, stream.position())
            if logged:
                bar.update(task, status=f"loss {history.steps['loss'][-1]:.4g}")
            bar.update(task, completed=step)
    history.flush()
    skipped = history.steps["skipped_step"]
    if skipped and _main_process():
        warnings.warn(
            f"fit: skipped {len(skipped)} window(s) with a non-finite loss or gradient, at "
            f"steps {list(skipped[:10])}{' ...' if len(skipped) > 10 else ''} "
            "(history['skipped_step'])",
            stacklevel=2,
        )
    if eval_data is not None and not history.evaluated_at(step):
        run_evaluation()
    if checkpointer is not None and checkpointer.latest_step() != step:
        checkpointer.save(train_state, state, rng, stream.position())
    return FitResult(train_state, state, history.as_arrays())
