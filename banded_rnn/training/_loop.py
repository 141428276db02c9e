"""The training loop: long sequences cut into chunks, state carried, reset, evaluated, saved."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

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
from ._data import Chunk, ChunkStream
from ._evaluate import evaluate
from ._history import FitResult, History, nonfinite_error
from ._make import make_eval_step
from ._step import EvalStep, TrainStep

ON_NONFINITE = ("stop", "skip")
"""``fit``'s ``on_nonfinite`` values."""

_reset = jax.jit(reset_state)
_entry_keys = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))
"""One dropout key per batch entry: ``fold_in(rng, the entry's sequence number)``."""


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
    _check_options(train_step, stream, on_nonfinite, eval_data, eval_step, metrics)
    evaluation = _Evaluation.of(train_step, stream, eval_data, eval_step, metrics)
    run = _Run.start(train_step, train_state, stream, rng, checkpointer, carry_state)
    if _finished_already(run.step, num_steps, checkpointer):
        return run.result()
    with _progress(progress and _main_process()) as bar:
        task = bar.add_task("training", total=num_steps, completed=run.step, status="")
        while run.step < num_steps:
            chunk = run.train_one()
            logged = run.step % log_every == 0 or run.step == num_steps
            # "stop" checks every step before the next is dispatched; "skip" needs no sync.
            if on_nonfinite == "stop" or logged:
                run.check_finite(chunk, stop=on_nonfinite == "stop")
            if evaluation is not None and eval_every and run.step % eval_every == 0:
                evaluation.run(run)
            if checkpointer is not None and checkpoint_every and run.step % checkpoint_every == 0:
                run.save(checkpointer)
            if logged:
                bar.update(task, status=f"loss {run.history.steps['loss'][-1]:.4g}")
            bar.update(task, completed=run.step)
    run.history.flush()
    _warn_skipped(run.history.steps["skipped_step"])
    if evaluation is not None and not run.history.evaluated_at(run.step):
        evaluation.run(run)
    if checkpointer is not None and checkpointer.latest_step() != run.step:
        run.save(checkpointer)
    return run.result()


class _Run:
    """One :func:`fit` call's moving parts: the training state, the carried
    state, the dropout key, the step count and the history."""

    def __init__(self, train_step, train_state, state, rng, stream, *, carry_state) -> None:
        self.train_step, self.stream, self.carry_state = train_step, stream, carry_state
        self.train_state, self.state, self.rng = train_state, state, rng
        self.step = int(train_state.step)
        self.history = History()
        self._keys_per_entry: bool | None = None

    @classmethod
    def start(cls, train_step, train_state, stream, rng, checkpointer, carry_state) -> _Run:
        """The run from ``train_state`` with the model's zero state, or from
        the newest checkpoint of ``checkpointer`` (the stream set to its position)."""
        _check_rows(train_step.mesh, stream)
        state = train_step.initial_state(
            train_state, stream.batch_size, stream.num_bands, stream.num_features
        )
        train_state, _ = train_step.place(train_state)  # where checkpoints are restored to
        if checkpointer is not None and checkpointer.latest_step() is not None:
            restored = checkpointer.restore(train_state, state, rng, stream.position())
            stream.set_position(restored.stream)
            train_state, state, rng = restored.train_state, restored.state, restored.rng
        return cls(train_step, train_state, state, rng, stream, carry_state=carry_state)

    def train_one(self) -> Chunk:
        """Takes the next chunk, restarts the entries that begin a sequence, runs one step."""
        chunk = next(self.stream)
        reset = chunk.reset if self.carry_state else np.ones_like(chunk.reset)
        in_time_order = self.carry_state and self.stream.chunk_length is not None
        with (
            # The state goes on from chunk to chunk of a sequence, in time order.
            forward_chunks(f"fit(carry_state=True) over chunks of {self.stream.chunk_length} steps")
            if in_time_order
            else contextlib.nullcontext()
        ):
            self.train_state, self.state, step_metrics = self._step(chunk, reset)
        self.step += 1
        self.history.record_step(self.step, step_metrics)
        return chunk

    def _step(self, chunk: Chunk, reset: np.ndarray):
        """One step on ``chunk``, the entries in ``reset`` restarted. With several
        processes the chunk holds this process's rows, joined into the global batch here."""
        keys = _entry_keys(self.rng, chunk.sequence) if self.keys_per_entry() else None
        extras = {"seq_lengths": chunk.seq_lengths, "ends": chunk.ends}
        extras = {name: value for name, value in extras.items() if value is not None}
        batch, targets = (chunk.inputs, reset, keys, extras), chunk.targets
        mesh = self.train_step.mesh
        if mesh is not None and _mesh.spans_processes(mesh):
            batch = _mesh.global_batch(mesh, batch)
            per_sequence = self.train_step.targets_per == "sequence"
            targets = _mesh.global_batch(mesh, targets, split_bands=not per_sequence)
        inputs, reset, keys, extras = batch
        state = _reset(self.state, reset)
        return self.train_step(self.train_state, state, inputs, targets, keys, **extras)

    def keys_per_entry(self) -> bool:
        """Whether the model needs dropout keys (one per entry); without dropout
        no keys are needed, and the step runs the batch in one piece."""
        if self._keys_per_entry is None:
            shape = (
                self.stream.batch_size, self.stream.num_bands, self.stream.window_length,
                self.stream.num_features,
            )  # fmt: skip
            inputs = jax.ShapeDtypeStruct(shape, jnp.float32)
            self._keys_per_entry = self.train_step.needs_rng(self.train_state, inputs)
        return self._keys_per_entry

    def check_finite(self, chunk: Chunk, *, stop: bool) -> None:
        """Fetches the pending steps' metrics; with ``stop``, raises
        :class:`NonFiniteError` for the first whose window was not finite."""
        nonfinite = self.history.flush()
        if nonfinite and stop:
            raise nonfinite_error(*nonfinite[0], chunk, self.stream, self.train_state, self.state)

    def save(self, checkpointer: Checkpointer) -> None:
        checkpointer.save(self.train_state, self.state, self.rng, self.stream.position())

    def result(self) -> FitResult:
        return FitResult(self.train_state, self.state, self.history.as_arrays())


class _Evaluation:
    """Held-out data evaluated during :func:`fit`: the step, the data, and
    :func:`evaluate`'s batching."""

    def __init__(self, eval_step: EvalStep, data: tuple[Any, Any], batching: dict) -> None:
        self.eval_step, self.data, self.batching = eval_step, data, batching

    @classmethod
    def of(cls, train_step, stream, eval_data, eval_step, metrics) -> _Evaluation | None:
        if eval_data is None:
            return None
        if eval_step is None:
            eval_step = make_eval_step(
                train_step.loss_fn, mesh=train_step.mesh, targets_per=train_step.targets_per,
                metrics=metrics,
            )  # fmt: skip
        return cls(eval_step, eval_data, _eval_batching(stream, eval_data[0]))

    def run(self, run: _Run) -> None:
        results = evaluate(self.eval_step, run.train_state, *self.data, **self.batching)
        run.history.record_evaluation(run.step, results)


def _eval_batching(stream: ChunkStream, inputs: Sequence[Any]) -> dict[str, Any]:
    """:func:`evaluate`'s batching for held-out ``inputs``, like the stream's:
    its batch size and windows, and when it pads, buckets (its own, or
    multiples of its chunk length) that hold the longest held-out sequence."""
    batching = {"batch_size": stream.batch_size, "chunk_length": stream.chunk_length}
    if stream.padded:
        longest = max(np.shape(x)[1] for x in inputs)
        if stream.chunk_length is None:
            batching["buckets"] = [*stream.buckets, *([longest] * (longest > stream.buckets[-1]))]
        else:
            step = stream.chunk_length
            batching["buckets"] = list(range(step, -(-longest // step) * step + 1, step))
    return batching


def _check_options(train_step, stream, on_nonfinite, eval_data, eval_step, metrics) -> None:
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


def _warn_skipped(skipped: Sequence[int]) -> None:
    """Says, from the main process, how many windows were skipped as non-finite."""
    if skipped and _main_process():
        warnings.warn(
            f"fit: skipped {len(skipped)} window(s) with a non-finite loss or gradient, at "
            f"steps {list(skipped[:10])}{' ...' if len(skipped) > 10 else ''} "
            "(history['skipped_step'])",
            stacklevel=3,
        )
