"""Keras 3 interop for ``banded_rnn``: a Keras layer, and weights to and from Keras and PyTorch.

``BandedLSTMLayer`` is a ``keras.layers.Layer`` (JAX backend) whose call runs
``banded_rnn.BandedLSTM`` on the layer's variables: one LSTM shared by every
band of ``[batch, bands, time, features]``, every band with its own state. With
``stateful=True`` that state lives in tracked non-trainable variables, so it
persists across compiled ``predict``, ``evaluate`` and ``fit`` calls.

Importing this package sets ``KERAS_BACKEND=jax`` unless it is already set; it
must come before the first ``import keras`` of the process to take effect. A
backend set to something else that cannot be imported (``tensorflow`` without
TensorFlow installed) makes this import fail with an ``ImportError`` saying so.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

try:
    import keras as _keras  # noqa: F401  (Keras imports its backend here, once)
except ImportError as error:
    _backend = os.environ["KERAS_BACKEND"]
    if _backend == "jax":
        raise
    raise ImportError(
        f"interop runs Keras on its JAX backend, but KERAS_BACKEND={_backend!r} and Keras "
        f"failed to import that backend ({error}). Set KERAS_BACKEND=jax before Keras is "
        "first imported: `KERAS_BACKEND=jax python ...`, or leave it unset and "
        "`import interop` before `import keras`."
    ) from error

from ._convert import from_keras_lstm as from_keras_lstm
from ._convert import from_torch_lstm as from_torch_lstm
from ._convert import keras_lstm_options as keras_lstm_options
from ._convert import to_keras_lstm as to_keras_lstm
from ._convert import to_torch_lstm as to_torch_lstm
from ._convert import torch_lstm_options as torch_lstm_options
from ._layer import BandedLSTMLayer as BandedLSTMLayer
from ._layer import reset_states as reset_states

__all__ = [
    "BandedLSTMLayer",
    "from_keras_lstm",
    "from_torch_lstm",
    "keras_lstm_options",
    "reset_states",
    "to_keras_lstm",
    "to_torch_lstm",
    "torch_lstm_options",
]
