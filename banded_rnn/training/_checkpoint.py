"""Checkpoints of a training run with orbax: everything needed to resume it exactly."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax.training.train_state import TrainState

from .._validate import is_typed_key


class Restored(NamedTuple):
    """What :meth:`Checkpointer.restore` returns."""

    train_state: TrainState
    state: Any
    rng: jax.Array
    stream: dict[str, np.ndarray] | None


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves and restores a training run in ``directory`` (an orbax ``CheckpointManager``).

    A checkpoint holds the parameters, the optimiser state and the step count
    of the ``TrainState``, the carried recurrent ``state``, the dropout ``rng``
    and, when given, the position of a :class:`ChunkStream` (which sequence and
    chunk every batch entry is at). Restoring all of them and going on gives
    the losses of the uninterrupted run, bit for bit.

    Saves are synchronous: the training step donates the training state's
    buffers, so a background save could read memory already reused. Only the
    newest ``max_to_keep`` checkpoints are kept. Use as a context manager, or
    call :meth:`close`.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3) -> None:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
        )
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The step of the newest checkpoint, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self,
        train_state: TrainState,
        state: Any,
        rng: jax.Array,
        stream: dict[str, np.ndarray] | None = None,
    ) -> int:
        """Saves a checkpoint under ``int(train_state.step)``; returns that step."""
        step = int(train_state.step)
        self._manager.save(
            step, args=ocp.args.StandardSave(self._items(train_state, state, rng, stream))
        )
        return step

    def restore(
        self,
        train_state: TrainState,
        state: Any,
        rng: jax.Array,
        stream: dict[str, np.ndarray] | None = None,
        step: int | None = None,
    ) -> Restored:
        """Restores the checkpoint of ``step`` (default: the newest).

        ``train_state``, ``state``, ``rng`` and ``stream`` are templates: their
        structure, shapes, dtypes and shardings say what to read back and where
        to place it; ``apply_fn`` and ``tx`` are kept from ``train_state``.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        template = _abstract(self._items(train_state, state, rng, stream))
        items = self._manager.restore(step, args=ocp.args.StandardRestore(template))
        restored_rng = items["rng"]
        if is_typed_key(rng):
            restored_rng = jax.random.wrap_key_data(restored_rng, impl=jax.random.key_impl(rng))
        train_state = train_state.replace(
            step=jnp.asarray(items["step"]), params=items["params"], opt_state=items["opt_state"]
        )
        return Restored(train_state, items["state"], restored_rng, items.get("stream"))

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def _items(train_state, state, rng, stream) -> dict[str, Any]:
        items = {
            "params": train_state.params,
            "opt_state": train_state.opt_state,
            "step": np.asarray(train_state.step, np.int32),
            "state": state,
            "rng": jax.random.key_data(rng) if is_typed_key(rng) else rng,
        }
        if stream is not None:
            items["stream"] = stream
        return items
