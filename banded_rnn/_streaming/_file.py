"""The stream state file: the state's arrays plus a fingerprint of the model they belong to."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any, BinaryIO

import jax
import numpy as np

from .._banded import BandedLSTM
from .._state import LSTMState, nonfinite_rows

FORMAT = "banded_rnn.stream_state/2"
"""Format 2 numbers the state's leaves (``state_0``, ``state_1``, ... in
``jax.tree`` order) and records their layout, for a state of any structure."""
FORMAT_1 = "banded_rnn.stream_state/1"
"""Format 1 (``BandedLSTM`` streams only) named them ``hidden_{layer}`` and
``cell_{layer}``; files in it still load."""


def fingerprint(
    model: Any,
    variables: Any,
    state_layout: list[list[Any]],
    batch_size: int,
    num_bands: int,
) -> dict[str, Any]:
    """What a state depends on: the model's class, every variable's path, shape
    and dtype, a digest of the weights, the state's layout (``[path, shape,
    dtype]`` per leaf) and the stream's ``[batch, bands]``. JSON-serialisable."""
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    digest = hashlib.sha256()
    layout = []
    for path, leaf in leaves:
        array = np.asarray(leaf)
        layout.append([jax.tree_util.keystr(path), list(array.shape), array.dtype.name])
        digest.update(np.ascontiguousarray(array).tobytes())
    return {
        "format": FORMAT,
        "model": _model_config(model),
        "variables": layout,
        "weights_sha256": digest.hexdigest(),
        "state": state_layout,
        "batch_size": batch_size,
        "num_bands": num_bands,
    }


def _model_config(model: Any) -> dict[str, Any]:
    """The model's class, and for a ``BandedLSTM`` its shape-relevant config
    (named in the error when a file of another one is loaded)."""
    config: dict[str, Any] = {"class": type(model).__name__}
    if isinstance(model, BandedLSTM):
        config.update(
            units=model.units,
            num_layers=model.num_layers,
            param_dtype=np.dtype(model.param_dtype).name,
        )
    return config


def save(
    path: str | os.PathLike,
    leaves: list[np.ndarray],
    expected: dict[str, Any],
    allow_nonfinite: bool = False,
) -> None:
    """Writes the state's ``leaves`` and ``expected`` (a fingerprint) as one
    ``.npz`` file, atomically: the file is written and synced beside ``path``
    as ``path + ".partial"`` (replacing one a killed save left), renamed over
    ``path``, and the directory synced, so a crash leaves the old file or the
    new one, never a half-written one. Non-finite states raise ``ValueError``
    unless ``allow_nonfinite``."""
    path = os.fspath(path)
    if not allow_nonfinite:
        _refuse_nonfinite(leaves, f"state: not saved to {path!r}")
    arrays = {"fingerprint": np.asarray(json.dumps(expected, sort_keys=True))}
    arrays.update((f"state_{index}", np.asarray(leaf)) for index, leaf in enumerate(leaves))
    write_atomically(path, lambda file: np.savez(file, **arrays))


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Calls ``write(file)`` on ``path + ".partial"`` (replacing one a killed
    write left), syncs it, renames it over ``path`` and syncs the directory:
    a crash leaves the old file or the new one, never a half-written one."""
    path = os.fspath(path)
    partial = f"{path}.partial"
    with open(partial, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    _sync_directory(os.path.dirname(os.path.abspath(path)))


def _sync_directory(directory: str) -> None:
    """Makes a rename inside ``directory`` durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _refuse_nonfinite(leaves: list[np.ndarray], what: str) -> None:
    rows = nonfinite_rows(leaves)  # every leaf is [batch, bands, ...]
    if rows:
        raise ValueError(
            f"{what}: the state holds NaN or infinite values at [sequence, band] "
            f"{rows[:8]}{' ...' if len(rows) > 8 else ''}; pass allow_nonfinite=True to "
            "accept it"
        )


def _from_format_1(saved: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """A format-1 fingerprint and its arrays in format 2's terms: ``hidden_i``,
    ``cell_i`` become the leaves ``[i].hidden``, ``[i].cell`` of a tuple of
    ``LSTMState``, as a ``BandedLSTM``'s state flattens."""
    model = saved.get("model") if isinstance(saved.get("model"), dict) else {}
    layers = model.get("num_layers")
    names = [
        (f"[{layer}].{field}", f"{field}_{layer}")
        for layer in range(layers if isinstance(layers, int) else 0)
        for field in LSTMState._fields
    ]
    layout = []
    for index, (path, name) in enumerate(names):
        value = arrays.pop(name, None)
        if value is None:
            break
        arrays[f"state_{index}"] = value
        layout.append([path, list(value.shape), value.dtype.name])
    return {**saved, "format": FORMAT, "state": layout}


def _differences(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    differences = []
    for key, value in expected["model"].items():
        if saved.get("model", {}).get(key) != value:
            differences.append(
                f"{key}: saved {saved.get('model', {}).get(key)!r}, this model {value!r}"
            )
    if saved.get("variables") != expected["variables"]:
        differences.append(_layout_difference("variables", saved.get("variables"), expected))
    elif saved.get("weights_sha256") != expected["weights_sha256"]:
        differences.append("weights: same shapes, different values (another trained model)")
    if saved.get("state") != expected["state"]:
        differences.append(_layout_difference("state", saved.get("state"), expected))
    for key in ("batch_size", "num_bands"):
        if saved.get(key) != expected[key]:
            differences.append(f"{key}: saved {saved.get(key)!r}, this stream {expected[key]!r}")
    return differences


def _layout_difference(key: str, saved: Any, expected: dict[str, Any]) -> str:
    """The first entry where two ``[path, shape, dtype]`` layouts differ."""
    ours = expected[key]
    if not isinstance(saved, list):
        return f"{key}: saved {saved!r}, this stream {len(ours)} arrays"
    for theirs, mine in zip(saved, ours, strict=False):
        if theirs != mine:
            return f"{key}: saved {theirs!r}, this stream {mine!r} (as [path, shape, dtype])"
    return f"{key}: saved {len(saved)} arrays, this stream {len(ours)}"


def load(
    path: str | os.PathLike, expected: dict[str, Any], allow_nonfinite: bool = False
) -> list[np.ndarray]:
    """Reads a file written by :func:`save` (or in format 1) and returns the
    state's leaves as NumPy arrays, or raises ``ValueError`` if it is damaged
    (truncated, empty, bit-flipped: the zip's CRC-32 covers every array), not
    a state file, of another model or stream, or non-finite (unless
    ``allow_nonfinite``). A missing file raises ``FileNotFoundError``."""
    # Opened here, so that it is closed whatever np.load raises; a file that
    # cannot be opened raises OSError (FileNotFoundError, PermissionError).
    with open(path, "rb") as opened:
        try:
            with np.load(opened, allow_pickle=False) as file:
                arrays = {name: file[name] for name in file.files}
        except Exception as error:  # noqa: BLE001  (a damaged zip raises a dozen kinds)
            raise ValueError(
                f"path: {os.fspath(path)!r} is not a stream state file or is damaged "
                f"({type(error).__name__}: {error})"
            ) from None
    try:
        saved = json.loads(str(arrays["fingerprint"]))
    except (KeyError, json.JSONDecodeError):
        saved = None
    if isinstance(saved, dict) and saved.get("format") == FORMAT_1:
        saved = _from_format_1(saved, arrays)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(
            f"path: {os.fspath(path)!r} is not a stream state file (expected format {FORMAT!r})"
        )
    differences = _differences(saved, expected)
    if differences:
        raise ValueError(
            f"path: the state in {os.fspath(path)!r} belongs to another model or stream; "
            + "; ".join(differences)
        )
    leaves = []
    for index, (where, shape, dtype) in enumerate(expected["state"]):
        value = arrays.get(f"state_{index}")
        if value is None or value.shape != tuple(shape) or value.dtype.name != dtype:
            raise ValueError(
                f"path: {os.fspath(path)!r} holds no {dtype} state_{index} (the state's "
                f"{where}) of shape {tuple(shape)}"
            )
        leaves.append(value)
    if not allow_nonfinite:
        _refuse_nonfinite(leaves, f"path: {os.fspath(path)!r} not loaded")
    return leaves
