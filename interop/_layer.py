"""``BandedLSTMLayer``: ``banded_rnn.BandedLSTM`` as a Keras 3 layer (JAX backend)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras

from banded_rnn import BandedLSTM, LSTMState, State
from banded_rnn._internal import batch_mask, reset_state, unit_forget_bias
from banded_rnn._internal import validate as _validate

from ._convert import activation_name, stack_weights


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
        options: dict[str, tuple[Any, Any, Any]],
        use_bias: bool,
        state_shape: tuple[int, int, int] | None,
    ) -> None:
        """Adds the weights, each with its ``(initializer, regularizer,
        constraint)`` from ``options`` (keyed ``kernel``, ``recurrent_kernel``,
        ``bias``), no ``bias`` without ``use_bias``, and the state variables
        when ``state_shape`` is given."""
        shapes = {
            "kernel": (features, 4 * units),
            "recurrent_kernel": (units, 4 * units),
            "bias": (4 * units,),
        }
        for name, shape in shapes.items():
            initializer, regularizer, constraint = options[name]
            weight = None
            if name != "bias" or use_bias:
                weight = self.add_weight(
                    shape=shape,
                    initializer=initializer,
                    regularizer=regularizer,
                    constraint=constraint,
                    name=name,
                )
            setattr(self, name, weight)
        self.hidden = self.cell = None
        if state_shape is not None:
            self.hidden = self.add_weight(
                shape=state_shape, initializer="zeros", trainable=False, name="hidden"
            )
            self.cell = self.add_weight(
                shape=state_shape, initializer="zeros", trainable=False, name="cell"
            )
        self.built = True

    @property
    def weight_variables(self) -> dict[str, Any]:
        """The weights by ``BandedLSTM``'s names; no ``bias`` without one."""
        names = ("kernel", "recurrent_kernel", "bias")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def state_variables(self) -> LSTMState:
        return LSTMState(self.hidden, self.cell)


class _ModuleField:
    """A read-only attribute of the layer that reads the field of the same name
    of ``layer.module``, the one place that value lives. Declaring it records
    the name in the class's ``_module_fields``, the entries ``get_config`` saves."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        owner._module_fields = (*owner.__dict__.get("_module_fields", ()), name)

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        return self if layer is None else getattr(layer.module, self.name)

    def __set__(self, layer: Any, value: Any) -> None:
        raise AttributeError(
            f"{self.name}: read-only, it is layer.module.{self.name}; build a new "
            f"BandedLSTMLayer to change it"
        )


class _KerasField(_ModuleField):
    """A ``_ModuleField`` read back in Keras's terms, through ``to_keras``."""

    def __init__(self, to_keras: Any) -> None:
        self.to_keras = to_keras

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        return self if layer is None else self.to_keras(getattr(layer.module, self.name))


def _keras_unroll(unroll: int | bool) -> int | bool:
    """``BandedLSTM.unroll`` as Keras says it: ``False`` for one step per iteration."""
    return unroll if unroll is True or unroll != 1 else False


# Saved files name the layer "interop>BandedLSTMLayer", the package to import before
# loading; files saved by earlier versions name it "banded_rnn>BandedLSTMLayer" and load too.
@keras.saving.register_keras_serializable(package="interop")
@keras.saving.register_keras_serializable(package="banded_rnn")
class BandedLSTMLayer(keras.layers.Layer):
    """One LSTM shared by every band, each band with its own state, as a Keras layer.

    Runs ``banded_rnn.BandedLSTM`` on the layer's variables (JAX backend only).
    Every ``(sequence, band)`` pair of ``inputs [batch, bands, time,
    features]`` has its own ``hidden`` and ``cell`` state; the weights are
    shared. Per stacked layer ``i`` the variables are ``layer_{i}/kernel
    [features, 4 * units]``, ``layer_{i}/recurrent_kernel [units, 4 * units]``
    and ``layer_{i}/bias [4 * units]`` (none with ``use_bias=False``), the
    layout and gate order (``i, f, g, o``) of ``keras.layers.LSTM``.

    It takes every argument of ``keras.layers.LSTM`` with Keras's meaning
    (activations, ``use_bias``, initialisers, regularizers, constraints,
    dropout, ``go_backwards``, ``stateful``, ``unroll``, ``use_cudnn``,
    ``zero_output_for_mask``), and Keras's defaults except
    ``return_sequences=True``: a banded layer usually feeds per-step heads.
    ``keras.layers.Bidirectional(BandedLSTMLayer(...))`` runs it both ways,
    with every merge mode, ``return_state``, ``initial_state`` and
    ``stateful`` (see ``call`` for how the bands stay in order).

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
    ``return_state=True`` returns as its second output; or Keras's flat list,
    ``[h, c]`` per layer (``[h_0, c_0, h_1, c_1, ...]``: a list, as Keras
    writes it; a tuple of arrays is refused, as Flax's carry is ``(c, h)``).
    Given to a stateful
    layer, it replaces the stored state for that call.

    Masks: a Keras mask (from ``keras.layers.Masking``, which gives ``[batch,
    bands, time]``, or ``mask=`` of shape ``[batch, time]`` or ``[batch, bands,
    time]``) is applied step by step, as ``keras.layers.LSTM`` does: a masked
    step leaves that sequence's state unchanged, wherever it is, and the next
    valid step carries on from the frozen state. It outputs the last valid
    step's output (Keras's default ``zero_output_for_mask=False``) or zeros
    (``zero_output_for_mask=True``). With ``return_sequences=False`` the output
    is the last step's, as in Keras.

    Saving: models save and load as usual, the layer under the registered name
    ``interop>BandedLSTMLayer``. ``import interop`` before
    ``keras.saving.load_model``: Keras imports only its own packages, so without
    it the load fails with "Could not locate class 'BandedLSTMLayer'".

    The configuration ``BandedLSTM`` holds (``units``, ``num_layers``,
    ``dropout``, ``recurrent_dropout``, ``unit_forget_bias``, ``unroll``,
    ``remat_chunk``, ``use_bias``, ``activation``, ``recurrent_activation``)
    lives in ``layer.module`` only; the layer's attributes of those names read
    it and cannot be assigned.

    >>> import numpy as np
    >>> layer = BandedLSTMLayer(8, num_layers=2)
    >>> x = np.zeros((2, 3, 10, 4), "float32")  # [batch, bands, time, features]
    >>> layer(x).shape                          # [batch, bands, time, units]
    (2, 3, 10, 8)

    Args:
      units: size of the state of every layer, and of the outputs.
      num_layers: number of stacked LSTM layers.
      activation: the cell's activation (Keras's ``activation``; ``None``
        means linear).
      recurrent_activation: the gates' activation. Other than tanh and
        sigmoid, the layer runs on the XLA scan instead of the native kernel.
      use_bias: whether each layer has a bias.
      kernel_initializer, recurrent_initializer, bias_initializer: Keras
        initialisers, with Keras's defaults.
      unit_forget_bias: start the forget gate's bias at ones, as Keras does
        (that slice of the initial bias is ones, the rest ``bias_initializer``'s).
      kernel_regularizer, recurrent_regularizer, bias_regularizer: Keras
        regularizers of every layer's weights (their losses are in
        ``layer.losses``).
      activity_regularizer: a regularizer of the outputs, as for any Keras layer.
      kernel_constraint, recurrent_constraint, bias_constraint: Keras
        constraints, applied by the optimiser after each update.
      dropout, recurrent_dropout: fractions of each layer's inputs and of its
        previous hidden state dropped in training (``training=True``); one mask
        per sequence and band for all steps, drawn from a Keras ``SeedGenerator``.
      seed: seed of the dropout masks.
      return_sequences: output every step ``[batch, bands, time, units]``; if
        False, the last step's output ``[batch, bands, units]``.
      return_state: also return the final state, a tuple of ``num_layers``
        ``LSTMState``: the call returns ``(outputs, final_state)``.
      go_backwards: run the sequence from its last step to its first and
        return the outputs in that (reversed) order, as Keras does.
      stateful: keep the final state of every sequence and band in variables
        and start the next call from it.
      unroll: ``True`` unrolls every step (Keras's meaning), ``False`` none; an
        integer gives the steps per iteration of the scanned loop.
      use_cudnn: ``"auto"`` (the default: the native kernel on CPU, the scan
        elsewhere), ``True`` (cuDNN's fused LSTM, refused where it cannot
        run) or ``False``.
      zero_output_for_mask: masked steps output zeros instead of the last
        valid output.
      remat_chunk: rematerialise the recurrence in chunks of this many steps in
        the backward pass (see ``BandedLSTM``).
    """

    # The fields shared with BandedLSTM, declared once: read from self.module,
    # saved by get_config under these names.
    units = _ModuleField()
    num_layers = _ModuleField()
    dropout = _ModuleField()
    recurrent_dropout = _ModuleField()
    unit_forget_bias = _ModuleField()
    unroll = _KerasField(_keras_unroll)
    remat_chunk = _ModuleField()
    use_bias = _ModuleField()
    activation = _KerasField(keras.activations.get)
    recurrent_activation = _KerasField(keras.activations.get)

    def __init__(
        self,
        units: int,
        num_layers: int = 1,
        *,
        activation: Any = "tanh",
        recurrent_activation: Any = "sigmoid",
        use_bias: bool = True,
        kernel_initializer: Any = "glorot_uniform",
        recurrent_initializer: Any = "orthogonal",
        bias_initializer: Any = "zeros",
        unit_forget_bias: bool = True,
        kernel_regularizer: Any = None,
        recurrent_regularizer: Any = None,
        bias_regularizer: Any = None,
        activity_regularizer: Any = None,
        kernel_constraint: Any = None,
        recurrent_constraint: Any = None,
        bias_constraint: Any = None,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        seed: int | None = None,
        return_sequences: bool = True,
        return_state: bool = False,
        go_backwards: bool = False,
        stateful: bool = False,
        unroll: bool | int = False,
        use_cudnn: bool | str = "auto",
        zero_output_for_mask: bool = False,
        remat_chunk: int | None = None,
        **kwargs: Any,
    ) -> None:
        _check_backend()
        if use_cudnn not in ("auto", True, False):
            raise ValueError(f"use_cudnn: expected 'auto', True or False; received {use_cudnn!r}")
        # Validates units, num_layers, the rates, unroll and remat_chunk.
        module = BandedLSTM(
            units,
            num_layers=num_layers,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            unit_forget_bias=bool(unit_forget_bias),
            unroll=1 if unroll is False else unroll,
            remat_chunk=remat_chunk,
            use_bias=bool(use_bias),
            activation=activation_name(keras.activations.get(activation)),
            recurrent_activation=activation_name(keras.activations.get(recurrent_activation)),
            reverse=bool(go_backwards),
            zero_output_for_mask=bool(zero_output_for_mask),
            implementation="cudnn" if use_cudnn is True else "auto",
        )
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self._module = module
        self.stateful = bool(stateful)
        self.return_sequences = bool(return_sequences)
        self.return_state = bool(return_state)
        self.use_cudnn = use_cudnn
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.recurrent_initializer = keras.initializers.get(recurrent_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.recurrent_regularizer = keras.regularizers.get(recurrent_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.recurrent_constraint = keras.constraints.get(recurrent_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.seed = seed
        self.seed_generator = (
            keras.random.SeedGenerator(seed) if dropout or recurrent_dropout else None
        )
        self.supports_masking = True
        self._stack = [_LayerVariables(name=f"layer_{i}") for i in range(num_layers)]
        self._state_shape: tuple[int, int] | None = None  # (batch, bands) once built stateful

    @property
    def module(self) -> BandedLSTM:
        """The ``banded_rnn.BandedLSTM`` this layer runs; ``layer.module.apply(
        layer.get_flax_variables(), state, x)`` computes what the layer does."""
        return self._module

    @property
    def go_backwards(self) -> bool:
        """Whether the layer runs from the last step to the first (read-only)."""
        return self._module.reverse

    @property
    def zero_output_for_mask(self) -> bool:
        """Whether masked steps output zeros rather than the last valid output."""
        return self._module.zero_output_for_mask

    @zero_output_for_mask.setter
    def zero_output_for_mask(self, value: bool) -> None:
        # Settable, as on keras.layers.LSTM: Keras's Bidirectional sets it on
        # the layers it wraps.
        self._module = self._module.clone(zero_output_for_mask=bool(value))

    @property
    def states(self) -> list[Any] | None:
        """The state variables of a built stateful layer, ``[hidden, cell]`` per
        layer (as ``keras.layers.LSTM.states``); None otherwise."""
        if not self.stateful or not self.built:
            return None
        return [v for layer in self._stack for v in layer.state_variables]

    # -- building ---------------------------------------------------------------

    def _check_input_shape(self, shape: Sequence[int | None], name: str = "inputs") -> None:
        """Rank 4 with the built features and, when stateful, the stored batch and bands."""
        shape = tuple(shape)
        features = self._stack[0].kernel.shape[0] if self.built else None
        _validate.check_input_shape(shape, name, features=features)
        if self.stateful and self._state_shape is not None:
            batch, bands = self._state_shape
            if shape[:2] != (batch, bands):
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
        bias_init = self.bias_initializer
        if self.unit_forget_bias:
            bias_init = unit_forget_bias(self.units, bias_init)
        options = {
            "kernel": (self.kernel_initializer, self.kernel_regularizer, self.kernel_constraint),
            "recurrent_kernel": (
                self.recurrent_initializer,
                self.recurrent_regularizer,
                self.recurrent_constraint,
            ),
            "bias": (bias_init, self.bias_regularizer, self.bias_constraint),
        }
        # Keras's initialisers (orthogonal) rely on implicit rank promotion;
        # allow it here so the layer builds under jax_numpy_rank_promotion="raise".
        with jax.numpy_rank_promotion("allow"):
            for i, variables in enumerate(self._stack):
                features_in = features if i == 0 else self.units
                variables.create(features_in, self.units, options, self.use_bias, state_shape)
        self.built = True

    # -- weights ------------------------------------------------------------------

    def get_flax_variables(self) -> dict[str, Any]:
        """The weights as ``BandedLSTM`` variables, ``{'params': {'layer_{i}':
        {'kernel', 'recurrent_kernel', 'bias'}}}`` (no ``bias`` without one):
        copies of the current values (the layer must be built)."""
        if not self.built:
            raise ValueError(
                "get_flax_variables: the layer is not built; call it on an input first"
            )
        # Copies: Keras's JAX trainer donates the variables' buffers to fit.
        return self._variables_from(lambda v: jnp.array(v.value))

    def _variables_from(self, read: Any) -> dict[str, Any]:
        """``BandedLSTM`` variables made of ``read(variable)`` for every weight."""
        return {
            "params": {
                f"layer_{i}": {name: read(v) for name, v in layer.weight_variables.items()}
                for i, layer in enumerate(self._stack)
            }
        }

    def set_flax_variables(self, variables: Any) -> None:
        """Assigns ``BandedLSTM`` variables (as ``get_flax_variables``, or
        ``model.init`` of a ``BandedLSTM`` with the same units, layers and
        ``use_bias``) to the weights. Everything is checked before anything is
        assigned. An unbuilt, non-stateful layer is built for the kernel's
        features."""
        stack = stack_weights(variables)
        units = stack[0][0][1].shape[0]
        if len(stack[0]) == 2:
            raise ValueError(
                "variables: expected one direction per layer; received a bidirectional stack "
                "(layer_{i}_reverse): give its layer_{i} to the forward layer of a "
                "keras.layers.Bidirectional and its layer_{i}_reverse to the backward layer"
            )
        stack = [layer for (layer,) in stack]
        if len(stack) != self.num_layers or units != self.units:
            raise ValueError(
                f"variables: expected {self.num_layers} layers of {self.units} units; received "
                f"{len(stack)} layers of {units} units"
            )
        has_bias = len(stack[0]) == 3
        if has_bias != self.use_bias:
            raise ValueError(
                f"variables: the layer has use_bias={self.use_bias}, so expected "
                f"{'a' if self.use_bias else 'no'} 'bias' in every layer; received "
                f"{'one' if has_bias else 'none'}"
            )
        features = stack[0][0].shape[0]
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
                f"{tuple(stack[0][0].shape)}"
            )
        for layer, weights in zip(self._stack, stack, strict=True):
            for variable, value in zip(layer.weight_variables.values(), weights, strict=True):
                variable.assign(jnp.asarray(value, variable.dtype))

    # -- stored state -------------------------------------------------------------

    def get_state(self) -> State | None:
        """A copy of the stored state of a stateful layer, a tuple of
        ``num_layers`` ``LSTMState`` each ``[batch, bands, units]``; None if not
        stateful or not built."""
        if not self.stateful or not self.built:
            return None
        return jax.tree.map(jnp.array, self._stored_state())

    def reset_state(self, batch: Sequence[int] | None = None) -> None:
        """Zeroes the stored state: of every sequence, or only of the sequences
        (batch indices) in ``batch``, leaving the others untouched. Nothing to
        do for a non-stateful or unbuilt layer. A non-integer index is a
        ``TypeError``, one outside ``[0, batch_size)`` a ``ValueError``."""
        if not self.stateful or not self.built:
            return
        if batch is not None:
            batch = _validate.check_batch_indices(batch, self._state_shape[0], "batch")
        self._store_state(reset_state(self._stored_state(), batch_mask(batch, self._state_shape)))

    def _stored_state(self) -> State:
        return tuple(LSTMState(v.hidden.value, v.cell.value) for v in self._stack)

    def _store_state(self, state: State) -> None:
        for layer, layer_state in zip(self._stack, state, strict=True):
            for variable, value in zip(layer.state_variables, layer_state, strict=True):
                variable.assign(value.astype(variable.dtype))

    # -- calling ----------------------------------------------------------------

    def _check_call(self, inputs: Any, initial_state: Any, mask: Any) -> State | None:
        """Checks the arguments of a call; returns ``initial_state`` as a tuple of
        ``LSTMState`` (or None)."""
        shape = tuple(inputs.shape)
        self._check_input_shape(shape)
        batch, bands, time, _ = shape
        if mask is not None:
            _validate.check_mask_shape(tuple(mask.shape), batch, bands, time, "mask")
        if initial_state is None:
            return None
        if (
            isinstance(initial_state, list | tuple)
            and len(initial_state) == 1
            and isinstance(initial_state[0], list | tuple)
            and not isinstance(initial_state[0], LSTMState)
        ):
            # One direction's half of a Bidirectional's initial_state: [state].
            initial_state = initial_state[0]
        if (
            isinstance(initial_state, list)
            and len(initial_state) == 2 * self.num_layers
            and not any(isinstance(s, list | tuple) for s in initial_state)
        ):
            # Keras's flat list, [h, c] per layer, as keras.layers.LSTM takes it. A
            # tuple stays refused: (c, h) is Flax's carry, and h and c would swap.
            pairs = zip(initial_state[::2], initial_state[1::2], strict=True)
            initial_state = tuple(LSTMState(h, c) for h, c in pairs)
        state_shape = (batch, bands, self.units)
        return _validate.check_state(initial_state, self.num_layers, state_shape, "initial_state")

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        # Ahead of Keras's own argument handling, whose messages for None, a
        # string or ragged lists do not say what the layer expected; and a
        # NumPy masked array would lose its mask.
        return super().__call__(_validate.as_array(inputs, "inputs"), *args, **kwargs)

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
            a masked step freezes the state (see ``zero_output_for_mask``).
          training: apply dropout.

        Returns:
          ``outputs`` (``[batch, bands, time, units]``, or ``[batch, bands,
          units]`` with ``return_sequences=False``), and with
          ``return_state=True`` also the final state: ``(outputs, final_state)``.

        In the ``backward_layer`` slot of a ``keras.layers.Bidirectional``
        (recognised by that wrapper's ``call`` being the caller), the outputs
        of a layer that returns sequences come reversed along both the time and
        the bands axes: the wrapper then reverses axis 1, which it takes for
        time and which here is the bands, so its result has the bands in order
        and time reversed, as it intends. A wrapper that reimplements ``call``
        without ``keras.layers.Bidirectional.call`` gets the plain outputs.
        """
        state = self._check_call(inputs, initial_state, mask)
        if state is None and self.stateful:
            state = self._stored_state()
        final_state, outputs = self._module.apply(
            self._variables_from(lambda v: v.value),
            state,
            inputs,
            mask=None if mask is None else jnp.asarray(mask).astype(bool),
            **self._dropout_arguments(training),
        )
        if self.stateful:
            self._store_state(final_state)
        if self.return_sequences:
            output = outputs
            if _in_keras_backward_slot(self):
                # keras.layers.Bidirectional reverses its backward layer's outputs
                # along axis 1, meaning time, which here is the bands. So that
                # layer hands it its outputs reversed in time and in bands: Keras's
                # reversal restores the bands, and time ends up reversed, as Keras
                # meant (whichever way the layer runs).
                output = jnp.flip(outputs, axis=(1, 2))
        elif outputs.shape[2]:
            # The last step's output, in the order the steps ran, as Keras returns.
            output = outputs[:, :, -1]
        else:
            output = final_state[-1].hidden
        output = output.astype(self.compute_dtype)
        if not self.return_state:
            return output
        return output, jax.tree.map(lambda a: a.astype(self.compute_dtype), final_state)

    def _dropout_arguments(self, training: bool | None) -> dict[str, Any]:
        """``deterministic`` and ``rngs`` for ``BandedLSTM.apply``: dropout only
        in training, with a key drawn from the layer's ``SeedGenerator``."""
        if not training or self.seed_generator is None:
            return {"deterministic": True, "rngs": None}
        key = jax.random.wrap_key_data(self.seed_generator.next())
        return {"deterministic": False, "rngs": {"dropout": key}}

    def compute_output_shape(
        self, sequences_shape: Sequence[int | None], initial_state_shape: Any = None
    ) -> Any:
        """The shapes of what the call returns for inputs of ``sequences_shape``:
        the outputs', and with ``return_state`` a tuple of ``num_layers``
        ``LSTMState`` of ``[batch, bands, units]`` shapes."""
        shape = tuple(sequences_shape)
        self._check_input_shape(shape, "sequences_shape")
        batch, bands, time, _ = shape
        output = (batch, bands) + ((time,) if self.return_sequences else ()) + (self.units,)
        if not self.return_state:
            return output
        state = (batch, bands, self.units)
        return output, tuple(LSTMState(state, state) for _ in range(self.num_layers))

    def compute_output_spec(
        self,
        inputs: Any,
        initial_state: Any = None,
        mask: Any = None,
        training: bool | None = None,
    ) -> Any:
        self._check_call(inputs, initial_state, mask)
        shapes = self.compute_output_shape(inputs.shape)
        dtype = self.compute_dtype
        if not self.return_state:
            return keras.KerasTensor(shapes, dtype=dtype)
        output, state = shapes
        return keras.KerasTensor(output, dtype=dtype), tuple(
            LSTMState(*(keras.KerasTensor(s, dtype) for s in layer)) for layer in state
        )

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        output_mask = mask if self.return_sequences else None
        if self.return_state:
            return [output_mask] + [None] * (2 * self.num_layers)
        return output_mask

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({name: getattr(self, name) for name in self._module_fields})
        config.update(
            activation=keras.activations.serialize(self.activation),
            recurrent_activation=keras.activations.serialize(self.recurrent_activation),
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            recurrent_initializer=keras.initializers.serialize(self.recurrent_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
            recurrent_regularizer=keras.regularizers.serialize(self.recurrent_regularizer),
            bias_regularizer=keras.regularizers.serialize(self.bias_regularizer),
            kernel_constraint=keras.constraints.serialize(self.kernel_constraint),
            recurrent_constraint=keras.constraints.serialize(self.recurrent_constraint),
            bias_constraint=keras.constraints.serialize(self.bias_constraint),
            seed=self.seed,
            return_sequences=self.return_sequences,
            return_state=self.return_state,
            go_backwards=self.go_backwards,
            stateful=self.stateful,
            use_cudnn=self.use_cudnn,
            zero_output_for_mask=self.zero_output_for_mask,
        )
        return config


def _in_keras_backward_slot(layer: BandedLSTMLayer) -> bool:
    """Whether ``layer`` is being called by ``keras.layers.Bidirectional.call``
    (or a subclass's that keeps it) as that wrapper's ``backward_layer``: the
    outputs Keras then reverses along axis 1."""
    keras_call = keras.layers.Bidirectional.call.__code__
    frame = sys._getframe(1)
    for _ in range(40):  # Keras's call wrappers sit between the two calls
        if frame is None:
            return False
        if frame.f_code is keras_call:
            return getattr(frame.f_locals.get("self"), "backward_layer", None) is layer
        frame = frame.f_back
    return False


def reset_states(model: keras.layers.Layer) -> list[BandedLSTMLayer]:
    """Resets the state of every stateful ``BandedLSTMLayer`` in ``model`` (a
    model or layer, searched recursively), as Keras 3 has no
    ``Model.reset_states()``. Returns the layers it reset.

    >>> import keras
    >>> inputs = keras.Input(batch_shape=(2, 3, None, 4))  # [batch, bands, time, features]
    >>> model = keras.Model(inputs, BandedLSTMLayer(8, stateful=True)(inputs))
    >>> [layer.name for layer in reset_states(model)] == [model.layers[1].name]
    True
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"model: expected a keras Model or Layer; received {type(model).__name__}")
    reset = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, BandedLSTMLayer) and layer.stateful:
            layer.reset_state()
            reset.append(layer)
    return reset
