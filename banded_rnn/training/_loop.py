"""The training loop: long sequences cut into chunks, state carried, reset, evaluated, saved."""

from __future__ import annotations

import array
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .._internal import forward_chunks, reset_state
from .._internal import validate as _validate
from . import _mesh
from ._checkpoint import Checkpointer
from ._data import ChunkStream
from ._evaluate import evaluate
from ._step import EvalStep, TrainStep, make_eval_step


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      train_state: the trained ``TrainState``.
      state: the carried state after the last step.
      history: NumPy arrays: ``step``, ``loss`` and ``grad_norm`` for every step
        run by this call; ``eval_step``, ``eval_loss`` and ``eval_<name>`` for
        each metric, for every evaluation; and ``skipped_step``, the steps whose
        window was skipped as non-finite.
    """

    train_state: TrainState
    state: Any
    history: dict[str, np.ndarray]


_reset = jax.jit(reset_state)
_entry_keys = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))
"""One dropout key per batch entry: ``fold_in(rng, the entry's sequence number)``."""


def _eval_windows(stream: ChunkStream, inputs: Any) -> dict[str, Any]:
    """:func:`evaluate`'s batching for held-out ``inputs``, like the stream's:
    its batch size and windows, and when it pads, buckets (its own, or
    multiples of its chunk length) that hold the longest held-out sequence."""
    windows = {"batch_size": stream.batch_size, "chunk_length": stream.chunk_length}
    if stream.padded:
        longest = max(np.shape(x)[1] for x in inputs)
        if stream.chunk_length is None:
            windows["buckets"] = [*stream.buckets, *([longest] * (longest > stream.buckets[-1]))]
        else:
            step = stream.chunk_length
            windows["buckets"] = list(range(step, -(-longest // step) * step + 1, step))
    return windows


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

    def record_evaluation(self, step: int, results: dict[str, float]) -> None:
        self.evaluations["eval_step"].append(step)
        for name, value in results.items():
            self.evaluations.setdefault(f"eval_{name}", []).append(value)

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
    if carry_state and stream.chunk_length is not None:
        # The state goes on from chunk to chunk of a sequence, in time order.
        with forward_chunks(f"fit(carry_state=True) over chunks of {stream.chunk_length} steps"):
            return _train_step(train_step, train_state, state, chunk, reset, rng, keys_per_entry)
    return _train_step(train_step, train_state, state, chunk, reset, rng, keys_per_entry)


def _train_step(train_step, train_state, state, chunk, reset, rng, keys_per_entry):
    """One step on ``chunk``, the entries in ``reset`` restarted."""
    keys = _entry_keys(rng, chunk.sequence) if keys_per_entry else None
    extras = {"seq_lengths": chunk.seq_lengths, "ends": chunk.ends}
    extras = {name: value for name, value in extras.items() if value is not None}
    batch = (chunk.inputs, reset, keys, extras)
    if train_step.mesh is not None and _mesh.spans_processes(train_step.mesh):
        batch = _mesh.global_batch(train_step.mesh, batch)
        per_sequence = train_step.targets_per == "sequence"
        targets = _mesh.global_batch(train_step.mesh, chunk.targets, split_bands=not per_sequence)
    else:
        targets = chunk.targets
    inputs, reset, keys, extras = batch
    return *train_step(train_state, _reset(state, reset), inputs, targets, keys, **extras), chunk


def _nonfinite_error(step, loss, grad_norm, chunk, stream, train_state, state):
    """The :class:`NonFiniteError` for ``step``, naming the batch it ran."""
    sequences, chunks = (list(column) for column in zip(*stream.last_batch(), strict=True))
    batch = ", ".join(
        f"inputs[{s}] chunk {c}" if s >= 0 else "empty"
        for s, c in zip(sequences, chunks, strict=True)
    )
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
    metrics: dict[str, Callable[[Any, Any], Any]] | None = None,
) -> FitResult:
    """Trains until ``train_state.step == num_steps`` on the chunks of ``stream``.

    Every step takes the next :class:`Chunk`, zeros the state of the entries
    that start a new sequence (of every entry if ``carry_state`` is False, the
    baseline that forgets everything at every chunk), and calls ``train_step``
    with the state carried from the previous step, and with the chunk's
    ``seq_lengths`` and ``ends`` when the stream gives them (padded sequences;
    one target per sequence). The stream and the step must agree on
    ``targets_per``. The dropout key of an entry
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
        evaluated every ``eval_every`` steps (if set) and at the end, batched
        as the stream batches (its batch size and chunk length; when the stream
        pads, in buckets that hold the longest held-out sequence).
      eval_step: default ``make_eval_step(train_step.loss_fn, mesh=train_step.mesh,
        targets_per=train_step.targets_per, metrics=metrics)``.
      checkpointer: a :class:`Checkpointer` to save to and resume from.
      checkpoint_every: steps between checkpoints (default: only at the end).
      progress: show a progress bar (rich).
      log_every: steps between updates of the loss shown on the progress bar.
      on_nonfinite: ``"stop"`` or ``"skip"``, for a non-finite window.
      metrics: ``{name: fn(outputs, targets)}``, values per target (e.g.
        :func:`accuracy`), evaluated with the loss on ``eval_data`` (for the
        default ``eval_step``; give them to :func:`make_eval_step` otherwise).

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
    if stream.targets_per != train_step.targets_per:
        raise ValueError(
            f"stream: deals targets per {stream.targets_per}, but train_step takes them per "
            f"{train_step.targets_per}; build both with the same targets_per"
        )
    if metrics is not None and eval_step is not None:
        raise ValueError("metrics: give them to make_eval_step when passing eval_step")
    if metrics is not None and eval_data is None:
        raise ValueError("metrics: are evaluated on eval_data, and eval_data is None")
    if eval_data is not None and eval_step is None:
        eval_step = make_eval_step(
            train_step.loss_fn, mesh=train_step.mesh, targets_per=train_step.targets_per,
            metrics=metrics,
        )  # fmt: skip
    shape = (stream.batch_size, stream.num_bands, stream.window_length, stream.num_features)
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
    if eval_data is not None:
        lengths = _eval_windows(stream, eval_data[0])

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
