"""Checkpoints of a training run with orbax: everything needed to resume it exactly."""

from __future__ import annotations

import os
import warnings
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax.training.train_state import TrainState
from jax.experimental import multihost_utils

from .._internal import validate as _validate
from ._orbax_noise import drop_orbax_teardown_errors, quiet_orbax_logs

_DAMAGED = "damaged"  # the subdirectory damaged checkpoints are moved to


class Restored(NamedTuple):
    """What :meth:`Checkpointer.restore` returns."""

    train_state: TrainState
    state: Any
    rng: jax.Array
    stream: dict[str, np.ndarray] | None


class _Damaged(Exception):
    """A checkpoint that cannot be read back as it was saved; the message says why."""


def _abstract(tree: Any) -> Any:
    """What orbax restores onto: each ``jax.Array`` as its shape, dtype and
    sharding; NumPy leaves (the step, rng, stream position) stay NumPy, read
    back whole on every process."""
    return jax.tree.map(
        lambda leaf: ocp.utils.to_shape_dtype_struct(leaf) if isinstance(leaf, jax.Array) else leaf,
        tree,
    )


class Checkpointer:
    """Saves and restores a training run in ``directory`` (an orbax ``CheckpointManager``).

    A checkpoint holds the parameters, the optimiser state and the step count
    of the ``TrainState``, the carried recurrent ``state``, the dropout ``rng``
    and, when given, the position of a :class:`ChunkStream` (which sequence and
    chunk every batch entry is at), with a checksum of all of them: a CRC-32
    when one process holds every array, else a sum over every element of the
    global arrays that each process adds its own shards to (any change of one
    bit changes it, whatever devices and processes hold the arrays). Restoring
    all of them and going on gives the losses of the uninterrupted run, bit for
    bit; :meth:`restore` passes over damaged checkpoints.

    Saves are synchronous: the training step donates the training state's
    buffers, so a background save could read memory already reused. Only the
    newest ``max_to_keep`` checkpoints are kept. A save cut short (a killed
    process) leaves a temporary directory that never counts as a checkpoint and
    is removed when a ``Checkpointer`` is next opened on ``directory``, so open
    only one on a directory that a running process saves to. Use as a context
    manager, or call :meth:`close`.

    >>> import tempfile, optax
    >>> from banded_rnn import BandedLSTM
    >>> model = BandedLSTM(units=2)
    >>> params = model.init(jax.random.key(0), None, jnp.zeros((1, 3, 1, 4)))["params"]
    >>> train_state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
    >>> state, rng = model.initial_state(2, 3), jax.random.key(1)
    >>> with Checkpointer(tempfile.mkdtemp()) as checkpointer:
    ...     saved_at = checkpointer.save(train_state.replace(step=5), state, rng)
    ...     restored = checkpointer.restore(train_state, state, rng)  # templates
    >>> saved_at, int(restored.train_state.step)
    (5, 5)
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3) -> None:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=False,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.directory = os.path.abspath(os.fspath(directory))
        with quiet_orbax_logs():  # it reads every checkpoint's metadata, damaged or not
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
            )

    def latest_step(self) -> int | None:
        """The step of the newest checkpoint, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of all checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def save(
        self,
        train_state: TrainState,
        state: Any,
        rng: jax.Array,
        stream: dict[str, np.ndarray] | None = None,
    ) -> int:
        """Saves a checkpoint under ``int(train_state.step)``; returns that step."""
        step = int(train_state.step)
        items = self._items(train_state, state, rng, stream)
        checksum = _checksum(items)
        if checksum is None:  # arrays split over several processes
            metadata = {"sum64": _global_sum(items)}
        else:
            metadata = {"crc32": checksum}
        self._manager.save(step, args=ocp.args.StandardSave(items), custom_metadata=metadata)
        return step

    def restore(
        self,
        train_state: TrainState,
        state: Any,
        rng: jax.Array,
        stream: dict[str, np.ndarray] | None = None,
        step: int | None = None,
    ) -> Restored:
        """Restores the checkpoint of ``step`` (default: the newest that is intact).

        ``train_state``, ``state``, ``rng`` and ``stream`` are templates: their
        structure, shapes, dtypes and shardings say what to read back and where
        to place it; ``apply_fn`` and ``tx`` are kept from ``train_state``.

        A checkpoint is damaged if it cannot be read, its arrays differ from
        their checksum, or ``train_state`` or ``state`` has a non-finite value.
        With ``step=None`` the newest intact checkpoint is restored, and the
        damaged ones after it are moved to ``directory/damaged`` with a
        ``UserWarning``; if all are damaged, a ``ValueError`` says why and
        nothing is moved. A damaged ``step`` given explicitly raises a
        ``ValueError``, as does a checkpoint whose structure or shapes differ
        from the templates; neither is moved.
        """
        template = self._items(train_state, state, rng, stream)
        drop_orbax_teardown_errors()
        if step is not None:
            if step not in self.all_steps():
                self._manager.reload()  # another process may have saved it since
            if step not in self.all_steps():
                raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}")
            try:
                items = self._read(step, template)
            except _Damaged as damage:
                raise ValueError(
                    f"the checkpoint of step {step} in {self.directory} is damaged: {damage}"
                ) from None
            return self._restored(items, train_state, rng)
        if self.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        damaged = []  # (step, reason), newest first
        for step in reversed(self.all_steps()):
            try:
                items = self._read(step, template)
            except _Damaged as damage:
                damaged.append((step, str(damage)))
                continue
            for bad_step, reason in damaged:
                moved_to = self._move_aside(bad_step)
                if jax.process_index() == 0:
                    warnings.warn(
                        f"Checkpointer: the checkpoint of step {bad_step} in {self.directory} is "
                        f"damaged ({reason}); moved it to {moved_to}, restoring step {step}.",
                        stacklevel=2,
                    )
            return self._restored(items, train_state, rng)
        raise ValueError(
            f"no checkpoint in {self.directory} can be restored, all are damaged: "
            + "; ".join(f"step {bad_step}: {reason}" for bad_step, reason in damaged)
            + ". Nothing was moved or deleted; move or delete them to start from scratch."
        )

    def close(self) -> None:
        """Closes the orbax manager (as leaving a ``with`` block does)."""
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
            # On the host: the same on every process, and saved once.
            "rng": np.asarray(jax.random.key_data(rng) if _validate.is_typed_key(rng) else rng),
        }
        if stream is not None:
            items["stream"] = stream
        return items

    @staticmethod
    def _restored(items: dict[str, Any], train_state: TrainState, rng: jax.Array) -> Restored:
        restored_rng = items["rng"]
        if _validate.is_typed_key(rng):
            restored_rng = jax.random.wrap_key_data(restored_rng, impl=jax.random.key_impl(rng))
        train_state = train_state.replace(
            step=jnp.asarray(items["step"]), params=items["params"], opt_state=items["opt_state"]
        )
        return Restored(train_state, items["state"], restored_rng, items.get("stream"))

    def _read(self, step: int, template: dict[str, Any]) -> dict[str, Any]:
        """The items of ``step``'s checkpoint; raises ``_Damaged`` if it is damaged, and
        ``ValueError`` if it holds other structures or shapes than ``template``."""
        with quiet_orbax_logs():
            try:
                metadata = self._manager.metadata(step)
            except Exception as error:  # orbax and tensorstore raise many kinds
                raise _Damaged(f"unreadable metadata: {_one_line(error)}") from error
            if metadata.item_metadata is None:
                raise _Damaged("its array metadata (default/_METADATA) is missing")
            stored = _flat_shapes_and_dtypes(metadata.item_metadata.tree)
            given = _flat_shapes_and_dtypes(ocp.tree.serialize_tree(template))
            _check_same_shapes(stored, given, f"the checkpoint of step {step} in {self.directory}")
            try:
                items = self._manager.restore(
                    step, args=ocp.args.StandardRestore(_abstract(template))
                )
            except Exception as error:
                raise _Damaged(_one_line(error)) from error
        # Not opt_state, which may hold infinities by design (a best loss so far, say).
        for key in ("params", "state"):
            for path, leaf in jax.tree_util.tree_leaves_with_path(items[key]):
                if not _all_finite(leaf):
                    raise _Damaged(f"non-finite values in {key}{jax.tree_util.keystr(path)}")
        custom = metadata.custom_metadata or {}
        if stored == given:  # not if restored into other dtypes
            expected, actual = custom.get("crc32"), None
            if expected is not None:
                actual = _checksum(items)
            elif custom.get("sum64") is not None:
                # Every process reads and sums, so every process agrees.
                expected, actual = custom["sum64"], _global_sum(items)
            if actual is not None and actual != expected:
                raise _Damaged(f"the arrays differ from their checksum ({actual} != {expected})")
        return items

    def _move_aside(self, step: int) -> str:
        """Moves ``step``'s checkpoint to ``directory/damaged/<step>`` (``<step>.1``, ... if
        taken), where orbax neither lists nor deletes it; returns where it went."""
        source = os.path.join(self.directory, str(step))
        os.makedirs(os.path.join(self.directory, _DAMAGED), exist_ok=True)
        target, copy = os.path.join(self.directory, _DAMAGED, str(step)), 0
        while os.path.exists(target):
            copy += 1
            target = os.path.join(self.directory, _DAMAGED, f"{step}.{copy}")
        if jax.process_count() > 1:  # every process has chosen the same target
            multihost_utils.sync_global_devices(f"banded_rnn.move_aside.{step}.chosen")
        if jax.process_index() == 0:
            os.rename(source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"banded_rnn.move_aside.{step}.moved")
        with quiet_orbax_logs():
            self._manager.reload()
        return target


def _checksum(items: dict[str, Any]) -> int | None:
    """A CRC-32 of the leaves of ``items`` (dtype, shape and bytes), or None when some
    leaf is not all on this process (a multi-process array)."""
    crc = 0
    for leaf in jax.tree.leaves(items):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return None
        array = np.asarray(leaf)
        crc = zlib.crc32(f"{array.dtype.str}{array.shape}".encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(array).view(np.uint8), crc)
    return crc


_WORD = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _global_sum(items: dict[str, Any]) -> int:
    """A checksum of the leaves of ``items`` that does not depend on how they
    are split over devices and processes: the sum, modulo 2**64, over every
    element of every leaf of ``bits * (2 * i + 1)``, ``i`` the element's flat
    index in the global array plus the leaf's offset. Each process adds the
    shards it holds (one copy of each) and the processes' sums are added up,
    so every process calls it (the sum is gathered from all of them). A
    changed element changes ``bits`` by ``d``, and the sum by ``d * (2 * i +
    1)``, never a multiple of 2**64 for ``0 < |d| < 2**64``."""
    total, offset = 0, 0
    for leaf in jax.tree.leaves(items):
        shape = tuple(np.shape(leaf))
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                if shard.replica_id == 0:
                    total += _shard_sum(np.asarray(shard.data), shard.index, shape, offset)
        elif jax.process_index() == 0:  # on the host, the same on every process
            total += _shard_sum(np.asarray(leaf), (), shape, offset)
        offset += int(np.prod(shape))
    if jax.process_count() > 1:
        halves = np.array([total >> 32 & 0xFFFFFFFF, total & 0xFFFFFFFF], np.uint32).view(np.int32)
        gathered = np.asarray(multihost_utils.process_allgather(halves)).view(np.uint32)
        total = sum(int(high) << 32 | int(low) for high, low in gathered.reshape(-1, 2))
    return total % (1 << 64)


def _shard_sum(data: np.ndarray, index: tuple, shape: tuple, offset: int) -> int:
    """One shard's part of :func:`_global_sum`: ``data`` at ``index`` (slices)
    of a leaf of ``shape`` whose first element is number ``offset``."""
    if data.size == 0:
        return 0
    word = _WORD[data.dtype.itemsize]
    bits = np.ascontiguousarray(data).view(word).astype(np.uint64)
    flat = np.full((), offset, np.uint64)
    stride = 1
    for axis in reversed(range(len(shape))):
        window = index[axis] if axis < len(index) else slice(None)
        positions = np.arange(shape[axis], dtype=np.uint64)[window]
        flat = flat + positions.reshape((-1,) + (1,) * (len(shape) - 1 - axis)) * np.uint64(stride)
        stride *= shape[axis]
    weights = np.uint64(2) * np.broadcast_to(flat, bits.shape) + np.uint64(1)
    with np.errstate(over="ignore"):
        return int(np.sum(bits * weights, dtype=np.uint64))


def _all_finite(leaf: Any) -> bool:
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
        return True
    if isinstance(leaf, jax.Array):
        return bool(jnp.isfinite(leaf).all())
    return bool(np.isfinite(leaf).all())


def _flat_shapes_and_dtypes(tree: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], Any]]:
    """``{path: (shape, dtype)}`` of the array leaves of an orbax-serialised tree."""
    return {
        path: (tuple(leaf.shape), np.dtype(leaf.dtype))
        for path, leaf in ocp.tree.to_flat_dict(tree).items()
        if hasattr(leaf, "shape")
    }


def _check_same_shapes(stored: dict, given: dict, what: str) -> None:
    """Raises ``ValueError`` if the paths or shapes of ``stored`` and ``given`` differ."""
    differences = [
        f"{'/'.join(path)}: "
        + (f"{stored[path][0]} saved" if path in stored else "not saved")
        + (f", {given[path][0]} given" if path in given else ", not given")
        for path in sorted(stored.keys() | given.keys())
        if path not in stored or path not in given or stored[path][0] != given[path][0]
    ]
    if differences:
        raise ValueError(
            f"{what} does not match the given train_state, state, rng and stream: "
            + "; ".join(differences[:5])
            + ("; ..." if len(differences) > 5 else "")
        )


def _one_line(error: BaseException) -> str:
    """The innermost cause of ``error`` as one short line, without tensorstore's spec."""
    while error.__cause__ is not None:
        error = error.__cause__
    message = (str(error).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
    message = f"{type(error).__name__}: {message}"
    return message if len(message) <= 300 else message[:297] + "..."
