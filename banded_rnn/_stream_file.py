"""The stream state file: the state arrays plus a fingerprint of the model they belong to."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

from ._banded import BandedLSTM
from ._state import LSTMState, State

FORMAT = "banded_rnn.stream_state/1"


def fingerprint(
    model: BandedLSTM, variables: Any, batch_size: int, num_bands: int
) -> dict[str, Any]:
    """What a state depends on: the model's shape-relevant config, every
    variable's path, shape and dtype, a digest of the weights, and the stream's
    ``[batch, bands]``. JSON-serialisable."""
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    digest = hashlib.sha256()
    layout = []
    for path, leaf in leaves:
        array = np.asarray(leaf)
        layout.append([jax.tree_util.keystr(path), list(array.shape), array.dtype.name])
        digest.update(np.ascontiguousarray(array).tobytes())
    return {
        "format": FORMAT,
        "model": {
            "class": type(model).__name__,
            "units": model.units,
            "num_layers": model.num_layers,
            "param_dtype": np.dtype(model.param_dtype).name,
        },
        "variables": layout,
        "weights_sha256": digest.hexdigest(),
        "batch_size": batch_size,
        "num_bands": num_bands,
    }


def save(path: str | os.PathLike, state: State, expected: dict[str, Any]) -> None:
    """Writes ``state`` and ``expected`` (a fingerprint) as one ``.npz`` file,
    atomically: a crash mid-write never leaves a half-written file at ``path``."""
    arrays = {"fingerprint": np.asarray(json.dumps(expected, sort_keys=True))}
    for layer, layer_state in enumerate(state):
        for field, value in zip(LSTMState._fields, layer_state, strict=True):
            arrays[f"{field}_{layer}"] = np.asarray(value)
    path = os.fspath(path)
    partial = f"{path}.partial"
    with open(partial, "wb") as file:
        np.savez(file, **arrays)
    os.replace(partial, path)


def _differences(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    differences = []
    for key, value in expected["model"].items():
        if saved.get("model", {}).get(key) != value:
            differences.append(
                f"{key}: saved {saved.get('model', {}).get(key)!r}, this model {value!r}"
            )
    if saved.get("variables") != expected["variables"]:
        differences.append(
            f"variables: saved {saved.get('variables')!r}, this model {expected['variables']!r}"
        )
    elif saved.get("weights_sha256") != expected["weights_sha256"]:
        differences.append("weights: same shapes, different values (another trained model)")
    for key in ("batch_size", "num_bands"):
        if saved.get(key) != expected[key]:
            differences.append(f"{key}: saved {saved.get(key)!r}, this stream {expected[key]!r}")
    return differences


def load(
    path: str | os.PathLike, expected: dict[str, Any], shape: tuple[int, ...], dtype: Any
) -> State:
    """Reads a file written by :func:`save` and returns its state as NumPy
    arrays, or raises ``ValueError`` if it belongs to another model or stream."""
    try:
        with np.load(path, allow_pickle=False) as file:
            arrays = {name: file[name] for name in file.files}
    except (OSError, ValueError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(
            f"path: {os.fspath(path)!r} is not a stream state file ({error})"
        ) from None
    try:
        saved = json.loads(str(arrays["fingerprint"]))
    except (KeyError, json.JSONDecodeError):
        saved = None
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
    dtype = np.dtype(dtype)
    state = []
    for layer in range(expected["model"]["num_layers"]):
        fields = []
        for field in LSTMState._fields:
            value = arrays.get(f"{field}_{layer}")
            if value is None or value.shape != tuple(shape) or value.dtype != dtype:
                raise ValueError(
                    f"path: {os.fspath(path)!r} holds no {dtype.name} {field}_{layer} of "
                    f"shape [batch, bands, units] = {tuple(shape)}"
                )
            fields.append(value)
        state.append(LSTMState(*fields))
    return tuple(state)
