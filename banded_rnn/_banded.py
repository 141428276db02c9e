"""``BandedLSTM``: one shared LSTM scanned over time and run over every band."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import _backends, _validate
from ._cell import LayerWeights, activation_fn, lstm_gates
from ._directions import MERGE_MODES, Direction, directions, flip_time, flip_valid, merge
from ._state import LSTMState, State, zero_state
from ._time_order import refuse_backwards
from ._weights import Initializer, LayerParams, packed_weights

IMPLEMENTATIONS = _backends.IMPLEMENTATIONS


class _Call(NamedTuple):
    """One call's checked arguments, time-major: ``inputs [time, batch,
    bands, features]`` in the arithmetic's ``dtype``, zero at invalid steps;
    ``valid [time, batch, bands]`` (None: every step) from ``lengths`` (int32
    ``[batch, bands]``) or a mask; the state, one ``LSTMState`` per layer and
    direction."""

    inputs: jax.Array
    state: State
    valid: jax.Array | None
    lengths: jax.Array | None
    dtype: Any


class BandedLSTM(nn.Module):
    """A stack of LSTM layers shared by every band, with explicit per-band state.

    Every band of ``inputs [batch, bands, time, features]`` runs through the
    same weights, and every (sequence, band) pair keeps its own state: bands
    never see each other. Per layer and time step, with
    ``z = x_t @ kernel + h @ recurrent_kernel + bias`` split into the gates
    ``i, f, g, o``, ``act = activation`` and ``rec = recurrent_activation``
    (by default tanh and sigmoid)::

        c' = rec(f) * c + rec(i) * act(g)
        h' = rec(o) * act(c')

    exactly as ``keras.layers.LSTM``, with its parameter layout per layer:
    ``kernel [features, 4 * units]``, ``recurrent_kernel [units, 4 * units]``,
    ``bias [4 * units]`` (absent with ``use_bias=False``), stored under
    ``params/layer_{i}`` (a backward direction's under ``layer_{i}_reverse``).
    Layer ``i + 1`` reads the hidden outputs of layer ``i``.

    The state goes in first and comes out first, like ``jax.lax.scan``:
    feeding a sequence whole, or in consecutive chunks while passing each
    chunk's ``final_state`` to the next, gives the same outputs. A backward
    direction's state threads from the sequence's end, so a reversed stack
    takes its chunks from the last to the first, and a bidirectional one
    whole sequences (docs/guides/conventions.md).

    >>> import jax, jax.numpy as jnp
    >>> model = BandedLSTM(units=8, num_layers=2)
    >>> x = jax.random.normal(jax.random.key(1), (2, 3, 10, 4))  # [batch, bands, time, features]
    >>> variables = model.init(jax.random.key(0), None, x)
    >>> state, y = model.apply(variables, None, x)
    >>> y.shape                                        # [batch, bands, time, units]
    (2, 3, 10, 8)
    >>> len(state), state[0].hidden.shape              # per layer: [batch, bands, units]
    (2, (2, 3, 8))
    >>> state, y2 = model.apply(variables, state, x)  # carry on where it ended

    Attributes:
      units: size of the hidden and cell state of every layer.
      num_layers: number of stacked layers.
      dropout: fraction of each layer's inputs dropped in training.
      recurrent_dropout: fraction of each layer's previous hidden state dropped
        before the recurrent kernel in training. Both draw one mask per
        (sequence, band) from the ``'dropout'`` rng and keep it for every time
        step (variational dropout, as Keras does), so the same rng gives the
        same masks however the sequence is chunked.
      unit_forget_bias: start the forget gate's bias at one (Keras's default).
      unroll: time steps per iteration of the scanned loop; ``True`` unrolls
        every step of a call (Keras's ``unroll=True``).
      remat_chunk: if set, the backward pass stores the state only every this
        many steps and recomputes the rest: less memory on long sequences.
      kernel_init: the input weights' initialiser; Keras's default, Glorot uniform.
      recurrent_kernel_init: the recurrent weights' initialiser; Keras's
        default, orthogonal.
      param_dtype: dtype of the parameters.
      use_bias: whether each layer has a ``bias`` (Keras's ``use_bias``).
      activation: the cell's activation ``act``: a name of
        ``keras.activations`` (with Keras 3's definitions) or any function of
        one array.
      recurrent_activation: the gates' activation ``rec``, named or a function.
      reverse: run every layer from the sequence's last step to its first, as
        one ``keras.layers.RNN(StackedRNNCells(...), go_backwards=True)``. With
        ``seq_lengths``, each sequence's valid steps are reversed in place
        (flax's ``flip_sequences``); otherwise the whole time axis is.
      keep_order: with ``reverse``, return the outputs in the order of the
        inputs; without it (the default, as flax and Keras), reversed.
      bidirectional: run every layer both ways and merge the two outputs into
        the next layer's inputs, as ``torch.nn.LSTM(bidirectional=True)`` and
        Keras's ``Bidirectional``. The state is then ``2 * num_layers``
        LSTMState in PyTorch's ``h_n`` order: layer 0 forward, layer 0
        backward, layer 1 forward, ...
      merge_mode: how a bidirectional layer merges its directions' outputs
        (each in input order): ``"concat"`` (the forward half first),
        ``"sum"``, ``"mul"`` or ``"ave"``.
      zero_output_for_mask: a step that ``seq_lengths`` or ``mask`` leaves out
        outputs zeros if True (the default); if False it repeats the last
        valid step's output, as ``keras.layers.LSTM``'s default does. Its
        state is left as it was either way.
      time_major: inputs and outputs are ``[time, batch, bands, ...]``;
        masks, lengths and the state keep their layouts.
      implementation: how the recurrence runs: ``"kernel"`` (the native CPU
        kernel: float32 on CPU, tanh and sigmoid), ``"cudnn"`` (cuDNN's fused
        LSTM on a CUDA GPU; opt-in), ``"scan"`` (a ``jax.lax.scan``, every
        platform and dtype, the only one with forward-mode derivatives and
        ``jax.export``), or ``"auto"`` (the default: the kernel where it
        applies, else the scan). They agree to float32 rounding; what each
        supports and costs: docs/guides/performance.md.
    """

    units: int
    num_layers: int = 1
    dropout: float = 0.0
    recurrent_dropout: float = 0.0
    unit_forget_bias: bool = True
    unroll: int | bool = 1
    remat_chunk: int | None = None
    kernel_init: Initializer = nn.initializers.glorot_uniform()
    recurrent_kernel_init: Initializer = nn.initializers.orthogonal()
    param_dtype: Any = jnp.float32
    implementation: str = "auto"
    use_bias: bool = True
    activation: str | Callable[[jax.Array], jax.Array] = "tanh"
    recurrent_activation: str | Callable[[jax.Array], jax.Array] = "sigmoid"
    reverse: bool = False
    keep_order: bool = False
    bidirectional: bool = False
    merge_mode: str = "concat"
    zero_output_for_mask: bool = True
    time_major: bool = False

    def __post_init__(self) -> None:
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation: expected one of {IMPLEMENTATIONS}; "
                f"received {self.implementation!r}"
            )
        if self.merge_mode not in MERGE_MODES:
            raise ValueError(
                f"merge_mode: expected one of {MERGE_MODES}; received {self.merge_mode!r}"
            )
        for name in ("units", "num_layers"):
            _validate.positive_int(getattr(self, name), name)
        if self.unroll is not True:
            _validate.positive_int(self.unroll, "unroll")
        _validate.positive_int(self.remat_chunk, "remat_chunk", optional=True)
        for name in ("dropout", "recurrent_dropout"):
            _validate.rate(getattr(self, name), name)
        activation_fn(self.activation, "activation")
        activation_fn(self.recurrent_activation, "recurrent_activation")
        if self.merge_mode != "concat" and not self.bidirectional:
            raise ValueError(
                f"merge_mode: merges the two directions of a bidirectional stack; received "
                f"merge_mode={self.merge_mode!r} with bidirectional=False"
            )
        if self.bidirectional and self.reverse:
            raise ValueError(
                "reverse: a bidirectional stack runs both directions already; "
                "give bidirectional=True or reverse=True, not both"
            )
        super().__post_init__()

    @property
    def num_directions(self) -> int:
        """2 for a bidirectional stack, else 1."""
        return 2 if self.bidirectional else 1

    @property
    def output_units(self) -> int:
        """Width of the outputs, ``2 * units`` for a bidirectional stack that
        concatenates its directions, else ``units``."""
        return 2 * self.units if self.bidirectional and self.merge_mode == "concat" else self.units

    def initial_state(self, batch_size: int, num_bands: int, dtype: Any = jnp.float32) -> State:
        """Zeros for every layer and direction: a tuple of ``num_layers *
        num_directions`` LSTMState, each field ``[batch_size, num_bands,
        units]``, every field its own buffer (so the state can be donated).
        Needs no parameters."""
        return zero_state(
            self.num_layers * self.num_directions, (batch_size, num_bands, self.units), dtype
        )

    @nn.compact
    def __call__(
        self,
        state: State | None,
        inputs: jax.Array,
        *,
        seq_lengths: jax.Array | None = None,
        mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[State, jax.Array]:
        """Runs the stack over ``inputs`` from ``state``.

        Args:
          state: a tuple of ``num_layers * num_directions`` LSTMState, each
            field ``[batch, bands, units]``; ``None`` starts from zeros.
          inputs: ``[batch, bands, time, features]`` (``[time, batch, bands,
            features]`` if ``time_major``), any floating dtype. The state and
            the arithmetic are at least float32.
          seq_lengths: optional integers, ``[batch]`` or ``[batch, bands]``.
            Steps at or past a sequence's length leave its state unchanged and
            output zeros (see ``zero_output_for_mask``), and what they hold
            never counts (a NaN there reaches neither the outputs nor the
            gradients); lengths longer than ``time`` mean every step. Under
            ``jax.jit`` with 64-bit types off, pass int32 or uint32 lengths
            (JAX casts int64 arguments to int32 before the model sees them).
          mask: optional booleans, ``[batch, time]`` or ``[batch, bands, time]``:
            a false step leaves that sequence's state unchanged and outputs
            zeros (see ``zero_output_for_mask``), wherever it is. Give
            ``seq_lengths`` or ``mask``, not both.
          deterministic: if False, apply dropout with the ``'dropout'`` rng.

        Returns:
          ``(final_state, outputs)``: the state after each sequence's last
          valid step (for a backward direction, after its first), and the last
          layer's hidden outputs ``[batch, bands, time, output_units]``.
        """
        refuse_backwards(reverse=self.reverse, bidirectional=self.bidirectional)
        call = self._check_call(state, inputs, seq_lengths, mask)
        time, batch, bands, features = call.inputs.shape
        backend = _backends.Backend(
            _backends.choose(
                self.implementation,
                dtype=call.dtype,
                activation=self.activation,
                recurrent_activation=self.recurrent_activation,
                masked=mask is not None,
                recurrent_dropout=not deterministic and self.recurrent_dropout > 0,
                remat_chunk=self.remat_chunk,
                time=time,
            ),
            remat_chunk=self.remat_chunk,
            unroll=self.unroll,
            gates=partial(
                lstm_gates,
                activation=activation_fn(self.activation),
                recurrent_activation=activation_fn(self.recurrent_activation),
            ),
        )
        dropout_masks = self._dropout_masks(deterministic, (batch, bands), features)
        # The model's outputs come out of its last layer: with one direction
        # running forwards, in the layout the model returns (no transpose).
        batch_major = not self.time_major and not self.bidirectional and not self.reverse
        layer_inputs, final_state = call.inputs, []
        for layer in range(self.num_layers):
            outputs = []
            for direction in directions(
                layer,
                self.num_layers,
                reverse=self.reverse,
                bidirectional=self.bidirectional,
                keep_order=self.keep_order,
            ):
                (hidden, cell), y = self._run_direction(
                    backend,
                    direction,
                    layer_inputs,
                    call,
                    dropout_masks[direction.index],
                    batch_major=batch_major and layer == self.num_layers - 1,
                )
                final_state.append(LSTMState(hidden, cell))
                outputs.append(y)
            layer_inputs = merge(self.merge_mode, outputs)
        if not batch_major:
            layer_inputs = jnp.moveaxis(layer_inputs, 0, 0 if self.time_major else 2)
        return tuple(final_state), layer_inputs

    def _check_call(self, state, inputs, seq_lengths, mask) -> _Call:
        """Every check of a call, before anything is traced, and its arguments
        laid out time-major."""
        features = _validate.input_features(self.variables)  # None while initialising
        if features is None and not self.is_initializing():
            _validate.check_variables(self, self.variables)  # raises, naming what is missing
        if self.time_major:
            inputs = _validate.check_time_major_inputs(inputs, features)
        inputs = _validate.check_inputs(inputs, features=features)
        _validate.check_devices(variables=self.variables, state=state, inputs=inputs)
        batch, bands, time, _ = inputs.shape
        if state is None:
            state = self.initial_state(batch, bands)
        else:
            state = _validate.check_state(
                state, self.num_layers, (batch, bands, self.units), directions=self.num_directions
            )
        if seq_lengths is not None and mask is not None:
            raise ValueError("seq_lengths, mask: give one or the other, not both")
        lengths = None
        if seq_lengths is not None:
            lengths = _validate.check_seq_lengths(seq_lengths, batch, bands, time)
            valid = jnp.arange(time)[:, None, None] < lengths[None]
        elif mask is not None:
            valid = jnp.moveaxis(_validate.check_mask(mask, batch, bands, time), 2, 0)
        else:
            valid = None
        dtype = _compute_dtype(inputs.dtype, self.param_dtype)
        inputs = jnp.moveaxis(inputs, 2, 0).astype(dtype)
        if valid is not None:
            # Steps past the lengths never count, whatever they hold: zeroed,
            # a NaN there cannot reach the weights' gradient (0 * NaN).
            inputs = jnp.where(valid[..., None], inputs, jnp.zeros((), dtype))
        state = tuple(LSTMState(*(leaf.astype(dtype) for leaf in layer)) for layer in state)
        return _Call(inputs, state, valid, lengths, dtype)

    def _run_direction(
        self,
        backend: _backends.Backend,
        direction: Direction,
        inputs: jax.Array,
        call: _Call,
        dropout_masks: tuple[jax.Array | None, jax.Array | None],
        *,
        batch_major: bool,
    ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        """One direction of one layer over ``inputs [time, batch, bands, ...]``:
        its final ``(hidden, cell)`` and its outputs, in input order unless the
        direction leaves them reversed."""
        weights = self._weights(direction.name, inputs.shape[-1], call.dtype)
        input_mask, recurrent_mask = (
            None if m is None else m.astype(call.dtype) for m in dropout_masks
        )
        if input_mask is not None:
            inputs = inputs * input_mask[None]
        valid = flip_valid(call.valid, call.lengths) if direction.backward else call.valid
        if direction.flips_inputs:
            inputs = flip_time(inputs, call.lengths)
        packed = None
        if backend.name == "native":
            packed = packed_weights(self, direction.name, weights)
        carry, outputs = backend.run_layer(
            weights,
            tuple(call.state[direction.index]),
            inputs,
            valid=valid,
            lengths=call.lengths,
            recurrent_mask=recurrent_mask,
            packed=packed,
            batch_major=batch_major,
        )
        if valid is not None and self.zero_output_for_mask:
            kept = jnp.moveaxis(valid, 0, 2) if batch_major else valid
            outputs = jnp.where(kept[..., None], outputs, jnp.zeros((), call.dtype))
        if direction.restores_order:
            outputs = flip_time(outputs, call.lengths)
        return carry, outputs

    def _weights(self, name: str, features: int, dtype: Any) -> LayerWeights:
        """Layer direction ``name``'s ``(kernel, recurrent_kernel, bias)`` in ``dtype``."""
        weights = LayerParams(
            self.units,
            self.kernel_init,
            self.recurrent_kernel_init,
            self.unit_forget_bias,
            self.param_dtype,
            self.use_bias,
            name=name,
        )(features)
        return tuple(w.astype(dtype) for w in weights)

    def _dropout_masks(
        self, deterministic: bool, batch_bands: tuple[int, int], features: int
    ) -> list[tuple[jax.Array | None, jax.Array | None]]:
        """One ``(input_mask, recurrent_mask)`` per layer and direction (in the
        state's order), ``[batch, bands, size]``, or Nones: the dropout masks,
        kept for every time step; each direction draws its own."""
        rates = (self.dropout, self.recurrent_dropout)
        count = self.num_layers * self.num_directions
        if deterministic or not any(rates):
            return [(None, None)] * count
        if not self.has_rng("dropout"):
            raise ValueError(
                "rngs: dropout is on (deterministic=False) but no 'dropout' rng was "
                "given; pass rngs={'dropout': key} to apply"
            )
        keys = jax.random.split(self.make_rng("dropout"), (count, 2))
        masks = []
        for index in range(count):
            layer = index // self.num_directions
            sizes = (features if layer == 0 else self.output_units, self.units)
            masks.append(
                tuple(
                    _keep_mask(key, 1.0 - rate, (*batch_bands, size)) / (1.0 - rate)
                    if rate
                    else None
                    for key, rate, size in zip(keys[index], rates, sizes, strict=True)
                )
            )
        return masks


def _keep_mask(key: jax.Array, keep: float, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.bernoulli(key, keep, shape)``, bit for bit: JAX numbers the
    values in row-major order, so a flat draw reshaped is the same draw. Drawn
    flat because a shaped draw builds its counters from one iota per axis,
    which XLA:CPU compiles several times slower (benchmarks/NOTES.md, 26).
    """
    return jax.random.bernoulli(key, keep, (math.prod(shape),)).reshape(shape)


def _compute_dtype(inputs_dtype: Any, param_dtype: Any) -> Any:
    """The dtype of the state and the arithmetic: at least float32, float64
    only where JAX enables it (no cast warning with x64 off)."""
    dtype = jnp.promote_types(jnp.promote_types(inputs_dtype, param_dtype), jnp.float32)
    return jax.dtypes.canonicalize_dtype(dtype)
