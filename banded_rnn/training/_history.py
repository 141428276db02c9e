"""What :func:`~banded_rnn.training.fit` records and returns: the history of
its steps and evaluations, and the error of a window that is not finite."""

from __future__ import annotations

import array
from typing import Any, NamedTuple

import jax
import numpy as np
from flax.training.train_state import TrainState

from ._data import Chunk, ChunkStream


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


class History:
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


def nonfinite_error(
    step: int,
    loss: float,
    grad_norm: float,
    chunk: Chunk,
    stream: ChunkStream,
    train_state: TrainState,
    state: Any,
) -> NonFiniteError:
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
