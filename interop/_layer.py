"""``BandedLSTMLayer``: ``banded_rnn.BandedLSTM`` as a Keras 3 layer (JAX backend)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

from banded_rnn import BandedLSTM, LSTMState, State

from ._convert import layer_params


def _check_backend() -> None:
    backend = keras.backend.backend()
    if backend != "jax":
        raise RuntimeError(
            "BandedLSTMLayer runs on Keras's JAX backend, but Keras was imported with "
            f"the {backend!r} backend. Set the environment variable KERAS_BACKEND=jax "
            "before Keras is first imported (for example `KERAS_BACKEND=jax python ...`, "
            "or `import interop` before `import keras`, which sets it when it is unset)."
        )


class _LayerVariables(keras.layers.Layer):
    """The variables of one layer of the stack, named like ``keras.layers.LSTM``'s:
    ``kernel``, ``recurrent_kernel``, ``bias`` and, when stateful, the state
    ``hidden`` and ``cell`` (non-trainable). Holds variables only; never called."""

    def create(
        self,
        features: int,
        units: int,
        initializers: tuple[Any, Any, Any],
        state_shape: tuple[int, int, int] | None,
    ) -> None:
        kernel_init, recurrent_init, bias_init = initializers
        self.kernel = self.add_weight(
            shape=(features, 4 * units), initializer=kernel_init, name="kernel"
        )
        self.recurrent_kernel = self.add_weight(
            shape=(units, 4 * units), initializer=recurrent_init, name="recurrent_kernel"
        )
        self.bias = self.add_weight(shape=(4 * units,), initializer=bias_init, name="bias")
        self.hidden = self.cell = None
        if state_shape is not None:
            self.hidden = self.add_weight(
                shape=state_shape, initializer="zeros", trainable=False, name="hidden"
            )
            self.cell = self.add_weight(
                shape=state_shape, initializer="zeros", trainable=False, name="cell"
            )
        self.built = True


@keras.saving.register_keras_serializable(package="banded_rnn")
class BandedLSTMLayer(keras.layers.Layer):
    """One LSTM shared by every band, each band with its own state, as a Keras layer.

    Runs ``banded_rnn.BandedLSTM`` on the layer's variables (JAX backend only).
    Every ``(sequence, band)`` pair of ``inputs [batch, bands, time,
    features]`` has its own ``hidden`` and ``cell`` state; the weights are
    shared. Per stacked layer ``i`` the variables are ``layer_{i}/kernel
    [features, 4 * units]``, ``layer_{i}/recurrent_kernel [units, 4 * units]``
    and ``layer_{i}/bias [4 * units]``, the layout and gate order (``i, f, g,
    o``) of ``keras.layers.LSTM``.

    State: with ``stateful=True`` the state of every sequence and band is kept
    in non-trainable variables ``layer_{i}/hidden`` and ``layer_{i}/cell``,
    ``[batch, bands, units]``, tracked like any Keras variable, so it carries
    over from batch to batch and from call to call in eager calls and in the
    compiled ``predict``, ``evaluate`` and ``fit`` loops (batch ``k`` of a
    stateful ``fit`` continues the sequences of batch ``k - 1``: pass
    ``shuffle=False``). The batch size and band count must then be static
    (``keras.Input(batch_shape=(batch, bands, None, features))``). The state is
    saved with the weights. ``reset_state()`` zeroes it, ``reset_state(batch=[...])``
    only the listed sequences; ``interop.reset_states(model)`` resets every
    stateful ``BandedLSTMLayer`` of a model.

    ``initial_state``: a tuple of ``num_layers`` ``LSTMState(hidden, cell)``,
    each field ``[batch, bands, units]`` (even for one layer), exactly what
    ``return_state=True`` returns as its second output. Given to a stateful
    layer, it replaces the stored state for that call.

    Masks: a Keras mask (from ``keras.layers.Masking``, which gives ``[batch,
    bands, time]``, or ``mask=`` of shape ``[batch, time]`` or ``[batch, bands,
    time]``) is applied step by step, as ``keras.layers.LSTM`` does: a masked
    step leaves that sequence's state unchanged and outputs zeros (Keras's
    ``zero_output_for_mask=True``), wherever it is, and the next valid step
    carries on from the frozen state.

    >>> import numpy as np
    >>> layer = BandedLSTMLayer(8, num_layers=2)
    >>> x = np.zeros((2, 3, 10, 4), "float32")  # [batch, bands, time, features]
    >>> layer(x).shape                          # [batch, bands, time, units]
    (2, 3, 10, 8)

    Args:
      units: size of the state of every layer, and of the outputs.
      num_layers: number of stacked LSTM layers.
      stateful: keep the final state of every sequence and band in variables
        and start the next call from it.
      return_sequences: output every step ``[batch, bands, time, units]``; if
        False, the output at each sequence's last valid step,
        ``[batch, bands, units]``.
      return_state: also return the final state, a tuple of ``num_layers``
        ``LSTMState``: the call returns ``(outputs, final_state)``.
      dropout, recurrent_dropout: fractions of each layer's inputs and of its
        previous hidden state dropped in training (``training=True``); one mask
        per sequence and band for all steps, drawn from a Keras ``SeedGenerator``.
      unit_forget_bias: start the forget gate's bias at one, as Keras does.
      unroll: time steps per iteration of the scanned loop.
      remat_chunk: rematerialise the recurrence in chunks of this many steps in
        the backward pass (see ``BandedLSTM``).
      kernel_initializer, recurrent_initializer, bias_initializer: Keras
        initialisers, with Keras's defaults.
      seed: seed of the dropout masks.
    """

    def __init__(
        self,
        units: int,
        num_layers: int = 1,
        stateful: bool = False,
        return_sequences: bool = True,
        return_state: bool = False,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        unit_forget_bias: bool = True,
        unroll: int = 1,
        remat_chunk: int | None = None,
        kernel_initializer: Any = "glorot_uniform",
        recurrent_initializer: Any = "orthogonal",
        bias_initializer: Any = "zeros",
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        _check_backend()
        # The core checks units, num_layers, rates, unroll and remat_chunk.
        module = BandedLSTM(
            units,
            num_layers=num_layers,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            unit_forget_bias=unit_forget_bias,
            unroll=unroll,
            remat_chunk=remat_chunk,
        )
        super().__init__(**kwargs)
        self._module = module
        self.units = units
        self.num_layers = num_layers
        self.stateful = bool(stateful)
        self.return_sequences = bool(return_sequences)
        self.return_state = bool(return_state)
        self.dropout = dropout
        self.recurrent_dropout = recurrent_dropout
        self.unit_forget_bias = bool(unit_forget_bias)
        self.unroll = unroll
        self.remat_chunk = remat_chunk
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.recurrent_initializer = keras.initializers.get(recurrent_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.seed = seed
        self.seed_generator = (
            keras.random.SeedGenerator(seed) if dropout or recurrent_dropout else None
        )
        self.supports_masking = True
        self._stack = [_LayerVariables(name=f"layer_{i}") for i in range(num_layers)]
        self._state_shape: tuple[int, int] | None = None

    @property
    def module(self) -> BandedLSTM:
        """The ``banded_rnn.BandedLSTM`` this layer runs; ``layer.module.apply(
        layer.get_flax_variables(), state, x)`` computes what the layer does."""
        return self._module

    # -- building ---------------------------------------------------------------

    def _check_input_shape(self, shape: Sequence[int | None], name: str = "inputs") -> None:
        shape = tuple(shape)
        if len(shape) != 4:
            raise ValueError(
                f"{name}: expected rank 4, [batch, bands, time, features]; received shape {shape}"
            )
        if shape[-1] is None:
            raise ValueError(f"{name}: the features axis must be static; received shape {shape}")
        if self.built:
            features = self._stack[0].kernel.shape[0]
            if shape[-1] != features:
                raise ValueError(
                    f"{name}: expected {features} features, [batch, bands, time, {features}], "
                    f"as the layer was built; received shape {shape}"
                )
        if self.stateful and self._state_shape is not None:
            batch, bands = self._state_shape
            if tuple(shape[:2]) != (batch, bands):
                raise ValueError(
                    f"{name}: a stateful layer keeps the state of batch {batch} x bands {bands} "
                    f"and needs inputs [{batch}, {bands}, time, features]; received shape "
                    f"{shape}. Build a new model with keras.Input(batch_shape=(...)) to change them"
                )

    def build(self, input_shape: Sequence[int | None]) -> None:
        """Creates the variables for ``input_shape [batch, bands, time, features]``;
        a stateful layer needs ``batch`` and ``bands``."""
        self._check_input_shape(input_shape, "input_shape")
        batch, bands, _, features = input_shape
        state_shape = None
        if self.stateful:
            if batch is None or bands is None:
                raise ValueError(
                    "input_shape: a stateful BandedLSTMLayer keeps one state per sequence "
                    "and band, so batch and bands must be static; use "
                    "keras.Input(batch_shape=(batch, bands, None, features)); "
                    f"received {tuple(input_shape)}"
                )
            state_shape = (batch, bands, self.units)
            self._state_shape = (batch, bands)
        # Keras's initialisers (orthogonal) rely on implicit rank promotion;
        # allow it here so the layer builds under jax_numpy_rank_promotion="raise".
        with jax.numpy_rank_promotion("allow"):
            for i, variables in enumerate(self._stack):
                variables.create(
                    features if i == 0 else self.units,
                    self.units,
                    (self.kernel_initializer, self.recurrent_initializer, self._bias_init()),
                    state_shape,
                )
        self.built = True

    def _bias_init(self) -> Any:
        if not self.unit_forget_bias:
            return self.bias_initializer
        units, bias_init = self.units, self.bias_initializer

        def init(shape: Any, dtype: Any = None) -> Any:
            del shape
            return keras.ops.concatenate(
                [
                    bias_init((units,), dtype),
                    keras.initializers.Ones()((units,), dtype),
                    bias_init((2 * units,), dtype),
                ]
            )

        return init

    # -- calling ----------------------------------------------------------------

    def _check_initial_state(self, initial_state: Any, batch: Any, bands: Any) -> State:
        """``initial_state`` as a tuple of LSTMState, or a clear error."""
        n = self.num_layers
        if isinstance(initial_state, LSTMState) or not isinstance(initial_state, (list, tuple)):
            raise TypeError(
                f"initial_state: expected a tuple of {n} LSTMState(hidden, cell), one per "
                "layer, as return_state=True returns; received "
                f"{type(initial_state).__name__}"
            )
        if len(initial_state) != n:
            raise ValueError(
                f"initial_state: expected {n} LSTMState (num_layers={n}); "
                f"received {len(initial_state)} items"
            )
        expected = (batch, bands, self.units)
        for i, layer_state in enumerate(initial_state):
            if not isinstance(layer_state, LSTMState):
                raise TypeError(
                    f"initial_state[{i}]: expected an LSTMState(hidden, cell); "
                    f"received {type(layer_state).__name__}"
                )
            for field, value in zip(LSTMState._fields, layer_state, strict=True):
                shape = tuple(np.shape(value)) if not hasattr(value, "shape") else value.shape
                if len(shape) != 3 or any(
                    a is not None and b is not None and a != b
                    for a, b in zip(shape, expected, strict=True)
                ):
                    raise ValueError(
                        f"initial_state[{i}].{field}: expected shape [batch, bands, units] = "
                        f"{expected}; received {tuple(shape)}"
                    )
        return tuple(initial_state)

    def _check_mask(self, mask: Any, shape: tuple[Any, ...]) -> None:
        batch, bands, time, _ = shape
        received = tuple(mask.shape)
        for expected in ((batch, time), (batch, bands, time)):
            if len(received) == len(expected) and all(
                a is None or b is None or a == b for a, b in zip(received, expected, strict=True)
            ):
                return
        raise ValueError(
            f"mask: expected shape [batch, time] = {(batch, time)} or [batch, bands, time] = "
            f"{(batch, bands, time)}; received {received}"
        )

    def get_flax_variables(self) -> dict[str, Any]:
        """The weights as ``BandedLSTM`` variables, ``{'params': {'layer_{i}':
        {'kernel', 'recurrent_kernel', 'bias'}}}``: copies of the current values
        (the layer must be built)."""
        self._require_built("get_flax_variables")
        # Copies: Keras's JAX trainer donates the variables' buffers to fit.
        return self._variables_from(lambda v: jnp.array(v.value))

    def _variables_from(self, read: Any) -> dict[str, Any]:
        return {
            "params": {
                f"layer_{i}": {
                    "kernel": read(v.kernel),
                    "recurrent_kernel": read(v.recurrent_kernel),
                    "bias": read(v.bias),
                }
                for i, v in enumerate(self._stack)
            }
        }

    def set_flax_variables(self, variables: Any) -> None:
        """Assigns ``BandedLSTM`` variables (as ``get_flax_variables``, or
        ``model.init`` of a ``BandedLSTM`` with the same units and layers) to
        the weights. Everything is checked before anything is assigned. An
        unbuilt, non-stateful layer is built for the kernel's features."""
        layers = layer_params(variables)
        if len(layers) != self.num_layers or layers[0][1].shape[0] != self.units:
            raise ValueError(
                f"variables: expected {self.num_layers} layers of {self.units} units; received "
                f"{len(layers)} layers of {layers[0][1].shape[0]} units"
            )
        features = layers[0][0].shape[0]
        if not self.built:
            if self.stateful:
                raise ValueError(
                    "set_flax_variables: build the stateful layer first (call it on an input, "
                    "or layer.build((batch, bands, None, features))), as its state needs batch "
                    "and bands"
                )
            self.build((None, None, None, features))
        expected = self._stack[0].kernel.shape[0]
        if features != expected:
            raise ValueError(
                f"variables['params']['layer_0']['kernel']: expected shape "
                f"({expected}, {4 * self.units}), as the layer was built; received "
                f"{tuple(layers[0][0].shape)}"
            )
        for target, values in zip(self._stack, layers, strict=True):
            for variable, value in zip(
                (target.kernel, target.recurrent_kernel, target.bias), values, strict=True
            ):
                variable.assign(jnp.asarray(value, variable.dtype))

    def _require_built(self, what: str) -> None:
        if not self.built:
            raise ValueError(f"{what}: the layer is not built; call it on an input first")

    def get_state(self) -> State | None:
        """A copy of the stored state of a stateful layer, a tuple of
        ``num_layers`` ``LSTMState`` each ``[batch, bands, units]``; None if not
        stateful or not built."""
        if not self.stateful or not self.built:
            return None
        return tuple(
            LSTMState(jnp.array(v.hidden.value), jnp.array(v.cell.value)) for v in self._stack
        )

    def reset_state(self, batch: Sequence[int] | None = None) -> None:
        """Zeroes the stored state: of every sequence, or only of the sequences
        (batch indices) in ``batch``, leaving the others untouched. Nothing to
        do for a non-stateful or unbuilt layer."""
        if not self.stateful or not self.built:
            return
        size = self._state_shape[0]
        if batch is None:
            keep = jnp.zeros((size,), bool)
        else:
            indices = np.asarray(batch)
            valid = indices.ndim == 1 and (
                indices.size == 0
                or np.issubdtype(indices.dtype, np.integer)
                and bool(np.all((indices >= 0) & (indices < size)))
            )
            if not valid:
                raise ValueError(
                    f"batch: expected a list of sequence indices in [0, {size}); received {batch!r}"
                )
            keep = jnp.ones((size,), bool).at[indices.astype(np.int32)].set(False)
        for v in self._stack:
            for variable in (v.hidden, v.cell):
                variable.assign(jnp.where(keep[:, None, None], variable.value, 0.0))

    def call(
        self,
        inputs: Any,
        initial_state: State | None = None,
        mask: Any = None,
        training: bool | None = None,
    ) -> Any:
        """Runs the stack.

        Args:
          inputs: ``[batch, bands, time, features]``.
          initial_state: optional tuple of ``num_layers`` ``LSTMState``, each
            field ``[batch, bands, units]``; by default zeros, or the stored
            state of a stateful layer.
          mask: optional booleans ``[batch, time]`` or ``[batch, bands, time]``;
            a masked step freezes the state and outputs zeros.
          training: apply dropout.

        Returns:
          ``outputs`` (``[batch, bands, time, units]``, or ``[batch, bands,
          units]`` with ``return_sequences=False``), and with
          ``return_state=True`` also the final state: ``(outputs, final_state)``.
        """
        shape = tuple(inputs.shape)
        self._check_input_shape(shape)
        batch, bands = shape[:2]
        if initial_state is not None:
            state = self._check_initial_state(initial_state, batch, bands)
        elif self.stateful:
            state = tuple(LSTMState(v.hidden.value, v.cell.value) for v in self._stack)
        else:
            state = None
        if mask is not None:
            self._check_mask(mask, shape)
            mask = jnp.asarray(mask).astype(bool)
        deterministic = not training or not (self.dropout or self.recurrent_dropout)
        rngs = None
        if not deterministic:
            rngs = {"dropout": jax.random.wrap_key_data(self.seed_generator.next())}
        final_state, outputs = self._module.apply(
            self._variables_from(lambda v: v.value),
            state,
            inputs,
            mask=mask,
            deterministic=deterministic,
            rngs=rngs,
        )
        if self.stateful:
            for v, layer_state in zip(self._stack, final_state, strict=True):
                v.hidden.assign(layer_state.hidden.astype(v.hidden.dtype))
                v.cell.assign(layer_state.cell.astype(v.cell.dtype))
        output = outputs if self.return_sequences else final_state[-1].hidden
        output = output.astype(self.compute_dtype)
        if self.return_state:
            return output, tuple(
                LSTMState(*(a.astype(self.compute_dtype) for a in s)) for s in final_state
            )
        return output

    def compute_output_spec(
        self,
        inputs: Any,
        initial_state: Any = None,
        mask: Any = None,
        training: bool | None = None,
    ) -> Any:
        shape = tuple(inputs.shape)
        self._check_input_shape(shape)
        batch, bands, time, _ = shape
        if initial_state is not None:
            self._check_initial_state(initial_state, batch, bands)
        if mask is not None:
            self._check_mask(mask, shape)
        dtype = self.compute_dtype
        output_shape = (batch, bands) + ((time,) if self.return_sequences else ()) + (self.units,)
        output = keras.KerasTensor(output_shape, dtype=dtype)
        if not self.return_state:
            return output
        state_shape = (batch, bands, self.units)
        return output, tuple(
            LSTMState(keras.KerasTensor(state_shape, dtype), keras.KerasTensor(state_shape, dtype))
            for _ in range(self.num_layers)
        )

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        output_mask = mask if self.return_sequences else None
        if self.return_state:
            return [output_mask] + [None] * (2 * self.num_layers)
        return output_mask

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            units=self.units,
            num_layers=self.num_layers,
            stateful=self.stateful,
            return_sequences=self.return_sequences,
            return_state=self.return_state,
            dropout=self.dropout,
            recurrent_dropout=self.recurrent_dropout,
            unit_forget_bias=self.unit_forget_bias,
            unroll=self.unroll,
            remat_chunk=self.remat_chunk,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            recurrent_initializer=keras.initializers.serialize(self.recurrent_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            seed=self.seed,
        )
        return config


def reset_states(model: keras.layers.Layer) -> list[BandedLSTMLayer]:
    """Resets the state of every stateful ``BandedLSTMLayer`` in ``model`` (a
    model or layer, searched recursively), as Keras 3 has no
    ``Model.reset_states()``. Returns the layers it reset."""
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"model: expected a keras Model or Layer; received {type(model).__name__}")
    reset = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, BandedLSTMLayer) and layer.stateful:
            layer.reset_state()
            reset.append(layer)
    return reset
