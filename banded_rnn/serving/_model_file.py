"""The model a server serves: ``module:factory``, and a variables file.

A variables file is an ``.npz`` whose keys are the paths of the variables'
leaves joined by ``/`` (``params/layer_0/kernel``), one array each.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np
from flax import traverse_util

from .._internal import validate as _validate
from .._internal import write_atomically


def save_variables(path: str | os.PathLike, variables: Mapping) -> None:
    """Writes ``variables`` (nested mappings of arrays) to ``path`` as ``.npz``,
    one array per leaf, keyed by its path joined with ``/``: the file
    ``python -m banded_rnn serve ... --variables`` reads. Written atomically
    (a crash leaves the old file or the new one), at ``path`` as given.

    >>> import tempfile, pathlib, jax
    >>> from banded_rnn import BandedLSTM
    >>> model = BandedLSTM(units=8)
    >>> variables = model.init(jax.random.key(0), None, np.zeros((1, 3, 1, 4), np.float32))
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "weights.npz"
    >>> save_variables(path, variables)
    >>> sorted(np.load(path))[:2]
    ['params/layer_0/bias', 'params/layer_0/kernel']
    """
    if not isinstance(variables, Mapping):
        raise TypeError(f"variables: expected nested mappings; received {type(variables).__name__}")
    flat = traverse_util.flatten_dict(_validate.plain_dicts(variables), sep="/")
    arrays = {key: np.asarray(value) for key, value in flat.items()}
    write_atomically(path, lambda file: np.savez(file, **arrays))


def load_model(factory: str, variables: str | os.PathLike | None = None) -> tuple[nn.Module, Any]:
    """``(model, variables)`` from ``factory``, ``"module:function"``: the
    module is imported and the function called with no arguments; it returns
    ``(model, variables)``. Given a ``variables`` file (written by
    :func:`save_variables`), its arrays replace the function's, which must have
    the same paths, shapes and dtypes (or be ``None``: the file's are taken
    as they are).

    >>> model, variables = load_model("banded_rnn.serving._model_file:_example")
    >>> type(model).__name__, variables["params"]["layer_0"]["kernel"].shape
    ('BandedLSTM', (4, 32))
    """
    module_name, _, function_name = str(factory).partition(":")
    if not module_name or not function_name:
        raise ValueError(f"model: expected 'module:function'; received {factory!r}")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"model: cannot load {factory!r}: {error}") from error
    made = function()
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module)):
        raise TypeError(
            f"model: expected {factory}() to return (model, variables), model a Flax module; "
            f"received {type(made).__name__}"
        )
    model, made_variables = made
    if variables is None:
        return model, made_variables
    return model, _read_variables(variables, made_variables)


def _read_variables(path: str | os.PathLike, like: Any) -> dict:
    """The variables in the file ``path``; checked against ``like`` unless it is None."""
    try:
        with np.load(path, allow_pickle=False) as file:
            found = {key: file[key] for key in file.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"variables: cannot read {os.fspath(path)!r} as .npz: {error}") from None
    if like is not None:
        flat = traverse_util.flatten_dict(_validate.plain_dicts(like), sep="/")
        expected = {key: (np.shape(v), np.dtype(v.dtype).name) for key, v in flat.items()}
        received = {key: (value.shape, value.dtype.name) for key, value in found.items()}
        if expected != received:
            missing = sorted(set(expected) - set(received))
            extra = sorted(set(received) - set(expected))
            shapes = [k for k in expected.keys() & received.keys() if expected[k] != received[k]]
            raise ValueError(
                f"variables: {os.fspath(path)!r} does not match the model's variables: missing "
                f"{missing}, unexpected {extra}, other (shape, dtype) at "
                f"{[(k, expected[k], received[k]) for k in sorted(shapes)]}"
            )
    return traverse_util.unflatten_dict(found, sep="/")


def _example() -> tuple[nn.Module, Any]:
    """A small model for the examples: 3 bands of 4 features, 8 units."""
    import jax

    from .. import BandedLSTM

    model = BandedLSTM(units=8)
    return model, model.init(jax.random.key(0), None, np.zeros((1, 3, 1, 4), np.float32))
