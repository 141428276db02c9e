"""``BandedLSTM``: one shared LSTM scanned over time and run over every band."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from . import _cudnn, _kernel, _validate
from ._cell import LayerWeights, activation_fn, is_standard, lstm_gates
from ._chunked import scan_chunks
from ._init import unit_forget_bias
from ._state import LSTMState, State, zero_state

Initializer = Callable[..., jax.Array]


class _LayerWeights(nn.Module):
    """Holds one layer's ``kernel``, ``recurrent_kernel`` and ``bias``."""

    units: int
    kernel_init: Initializer
    recurrent_kernel_init: Initializer
    unit_forget_bias: bool
    param_dtype: Any
    use_bias: bool

    @nn.compact
    def __call__(self, features: int) -> LayerWeights:
        """The weights, with zeros for the bias when ``use_bias`` is off (no
        ``bias`` parameter then, as in ``keras.layers.LSTM(use_bias=False)``)."""
        gates = 4 * self.units
        kernel = self.param("kernel", self.kernel_init, (features, gates), self.param_dtype)
        recurrent_kernel = self.param(
            "recurrent_kernel", self.recurrent_kernel_init, (self.units, gates), self.param_dtype
        )
        if not self.use_bias:
            return kernel, recurrent_kernel, jnp.zeros((gates,), self.param_dtype)
        bias = self.param("bias", self._bias_init, (gates,), self.param_dtype)
        return kernel, recurrent_kernel, bias

    def _bias_init(self, key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        del key
        if self.unit_forget_bias:
            return unit_forget_bias(self.units, jnp.zeros)(shape, dtype)
        return jnp.zeros(shape, dtype)


_FUSED_MAX_BYTES = 1 << 20
"""A layer whose weights take at most this many bytes runs one matmul of
``[x, h]`` with ``[kernel; recurrent_kernel]`` per step, stacked once per call
(6.7 % faster on ``seed``, 2.3 % on ``train``); a larger one runs ``x @ kernel
+ h @ recurrent_kernel``, as stacking megabytes of weights on every call costs
more than a one-frame call's step (``subband-stream``). The choice depends on
the layer's shapes and dtype only, never on the chunk length: the two formulas
round differently, and one formula per layer keeps chunked runs equal to whole
runs bit for bit (benchmarks/NOTES.md, entries 3 and 12)."""


Gates = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
"""``lstm_gates`` with the layer's activations bound."""


def _time_step(
    project: Callable[[jax.Array, jax.Array], jax.Array],
    recurrent_mask: jax.Array | None,
    gates: Gates,
    carry: tuple[jax.Array, jax.Array],
    xs: tuple[jax.Array, jax.Array | None],
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """One time step for every (sequence, band) at once: ``[batch, bands, ...]``.
    An invalid step leaves the state as it was and outputs its hidden state."""
    hidden, cell = carry
    inputs, valid = xs
    dropped = hidden if recurrent_mask is None else hidden * recurrent_mask
    preactivations = checkpoint_name(project(inputs, dropped), "preactivations")
    new_hidden, new_cell = gates(preactivations, cell)
    if valid is not None:
        valid = valid[..., None]
        new_hidden = jnp.where(valid, new_hidden, hidden)
        new_cell = jnp.where(valid, new_cell, cell)
    return (new_hidden, new_cell), new_hidden


def _shard_like(state: jax.Array, inputs: jax.Array) -> jax.Array:
    """``state [batch, bands, units]`` split over devices as ``inputs [time,
    batch, bands, features]`` is.

    A zero state made with ``jnp.zeros`` (or a state passed in replicated) is
    split over nothing. Inside ``shard_map`` the scan then refuses a carry that
    varies over fewer mesh axes than its update; under a mesh with explicit
    axes, concatenating it with the sharded inputs fails. Adding zeros sliced
    from the inputs gives the state their batch and bands layout; without a
    mesh, XLA folds the addition away.
    """
    # Summed over time rather than indexed, so that zero time steps work too.
    return state + jnp.zeros_like(inputs[..., :1].sum(axis=0), dtype=state.dtype)


def _scan_layer(weights, recurrent_mask, carry, xs, *, unroll, gates=lstm_gates):
    """Scans one layer over ``xs = (inputs [time, batch, bands, features], valid
    [time, batch, bands] or None)`` from ``carry``.

    The input projection stays inside the loop. Hoisting ``x @ kernel`` out of
    it as one large matmul is slower under XLA:CPU: the gate fusion that then
    reads a dynamic slice of the hoisted ``[time, rows, 4 * units]`` array is
    compiled by the legacy loop emitter, about 5x slower than the new one
    (benchmarks/NOTES.md, entry 2).
    """
    kernel, recurrent_kernel, bias = weights
    bias = bias.reshape((1,) * (xs[0].ndim - 2) + bias.shape)
    if (kernel.size + recurrent_kernel.size) * kernel.dtype.itemsize <= _FUSED_MAX_BYTES:
        stacked = jnp.concatenate([kernel, recurrent_kernel], axis=0)  # [features + units, 4u]

        def project(x, h):
            return jnp.concatenate([x, h], axis=-1) @ stacked + bias
    else:

        def project(x, h):
            return x @ kernel + h @ recurrent_kernel + bias

    # For the backward pass, each step keeps only its gate pre-activations and
    # the carry; the gate maths is recomputed from them. JAX's default would
    # stack every intermediate of the gate maths (11 arrays the size of the
    # state, per step), and writing and zero-initialising those costs more than
    # the recomputation (benchmarks/NOTES.md, entry 8). No effect without
    # differentiation.
    step = jax.checkpoint(
        partial(_time_step, project, recurrent_mask, gates),
        policy=jax.checkpoint_policies.save_only_these_names("preactivations"),
        prevent_cse=False,  # the scan already keeps XLA from merging steps
    )
    return jax.lax.scan(step, carry, xs, unroll=unroll)


def _run_layer(
    weights,
    recurrent_mask,
    carry,
    xs,
    *,
    unroll,
    remat_chunk,
    kernel,
    packed=None,
    gates=lstm_gates,
    batch_major=False,
):
    """One layer over ``xs``: on the native CPU kernel if ``kernel`` (reading
    ``packed`` weights if given, and with ``batch_major`` returning its
    outputs as ``[batch, bands, time, units]``), else ``_scan_layer``;
    optionally rematerialised in chunks of ``remat_chunk`` steps.

    Every (sequence, band) pair is one row of each step's matmul: bands are
    folded into the batch, and rows never mix, so this is vmap over bands with
    shared weights. The ``[batch, bands]`` axes are kept rather than flattened:
    the state then goes out in the shape it came in, and XLA:CPU fuses the gate
    maths into two loops per step instead of materialising each gate
    (benchmarks/NOTES.md, entry 5).

    With remat, the backward pass keeps only the inputs and the state at chunk
    boundaries and recomputes each chunk, so a training step's memory no
    longer grows with ``time * 4 * units``.
    """
    if kernel:
        layer = partial(_kernel.run_layer, packed=packed)
    else:
        layer = partial(_scan_layer, unroll=unroll, gates=gates)
    if remat_chunk is None or xs[0].shape[0] <= remat_chunk:
        if kernel:
            return layer(weights, recurrent_mask, carry, xs, batch_major=batch_major)
        carry, ys = layer(weights, recurrent_mask, carry, xs)
    else:
        run_chunk = jax.checkpoint(partial(layer, weights, recurrent_mask))
        carry, ys = scan_chunks(run_chunk, carry, xs, remat_chunk, axis=0)
    return carry, jnp.moveaxis(ys, 0, 2) if batch_major else ys


IMPLEMENTATIONS = ("auto", "kernel", "cudnn", "scan")
"""``BandedLSTM.implementation``'s values."""

MERGE_MODES = ("concat", "sum", "mul", "ave")
"""``BandedLSTM.merge_mode``'s values, Keras's ``Bidirectional`` merge modes."""

_streaming: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "banded_rnn_streaming", default=None
)


@contextlib.contextmanager
def forward_chunks(what: str) -> Iterator[None]:
    """Marks the calls traced inside as one chunk of a sequence fed in time
    order, each continuing the last one's state (``what`` names the caller, for
    the error): a ``BandedLSTM`` that runs backwards refuses them, as its state
    threads from a sequence's end."""
    token = _streaming.set(what)
    try:
        yield
    finally:
        _streaming.reset(token)


def chunks_in_time_order() -> str | None:
    """What ``forward_chunks`` marked the current code with (its caller's
    name), or None: for a jitted function that traces the model later, and so
    must make it part of its cache key (a static argument)."""
    return _streaming.get()


def _flip_time(x: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """``x [time, batch, bands, ...]`` reversed in time: each (sequence, band)'s
    first ``lengths [batch, bands]`` steps reversed in place and the rest after
    them (as flax's ``flip_sequences``), or the whole axis when ``lengths`` is
    None. Its own inverse."""
    time = x.shape[0]
    if lengths is None or time == 0:
        return jnp.flip(x, axis=0)
    index = (jnp.arange(time - 1, -1, -1)[:, None, None] + lengths[None]) % time
    index = index.reshape(index.shape + (1,) * (x.ndim - index.ndim))
    return jnp.take_along_axis(x, index, axis=0)


def _merge(mode: str, forward: jax.Array, backward: jax.Array) -> jax.Array:
    """The two directions' outputs merged as Keras's ``Bidirectional`` does."""
    if mode == "concat":
        return jnp.concatenate([forward, backward], axis=-1)
    if mode == "sum":
        return forward + backward
    if mode == "mul":
        return forward * backward
    return (forward + backward) / 2


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
    ``params/layer_{i}``. Layer ``i + 1`` reads the hidden outputs of layer ``i``.

    Directions: ``reverse=True`` runs every layer from the last step to the
    first (flax ``nn.RNN(reverse=True)``, Keras ``go_backwards``).
    ``bidirectional=True`` runs each layer both ways, the backward direction's
    weights under ``params/layer_{i}_reverse``, and merges the two outputs
    (``merge_mode``) into the next layer's inputs and the outputs, as
    ``torch.nn.LSTM(bidirectional=True)`` (which concatenates) and Keras's
    ``Bidirectional`` do. A backward direction's state threads from the end:
    the state it takes is the one after the steps that follow the call's
    inputs, and its final state is the one after the call's first step. So a
    reversed stack fed a sequence in chunks from the last chunk to the first
    equals the whole call; a bidirectional one needs the whole sequence in
    one call. What feeds chunks in time order, carrying the state forwards,
    refuses both: ``Stream``, the training step's ``chunk_length``,
    ``fit(carry_state=True)`` over chunks, ``evaluate`` and ``predict`` with
    ``chunk_length``.

    The state goes in first and comes out first, like ``jax.lax.scan``:
    feeding a sequence whole, or in consecutive chunks while passing each
    chunk's ``final_state`` to the next, gives the same outputs.

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
        every step of a call (Keras's ``unroll=True``: compiles longer, for
        short sequences).
      remat_chunk: if set, rematerialise the recurrence in chunks of this many
        steps: the backward pass stores the state only at chunk boundaries and
        recomputes the rest, trading compute for memory on long sequences.
      kernel_init: the input weights' initialiser; Keras's default, Glorot uniform.
      recurrent_kernel_init: the recurrent weights' initialiser; Keras's
        default, orthogonal.
      param_dtype: dtype of the parameters.
      use_bias: whether each layer has a ``bias``; without it, none is created
        (Keras's ``use_bias=False``).
      activation: the cell's activation ``act`` (Keras's ``activation``, flax's
        ``activation_fn``): a name of ``keras.activations`` (``"tanh"``,
        ``"relu"``, ``"hard_sigmoid"``, ... with Keras 3's definitions) or any
        function of one array.
      recurrent_activation: the gates' activation ``rec`` (Keras's
        ``recurrent_activation``, flax's ``gate_fn``), named or a function.
        The fused paths (the kernel, cuDNN) run tanh and sigmoid only; other
        activations run on the scan, which ``"auto"`` chooses.
      reverse: run every layer from the sequence's last step to its first:
        the stack run on the reversed sequence, as one
        ``keras.layers.RNN(StackedRNNCells(...), go_backwards=True)``
        (separately stacked reversed layers, as two Keras ``LSTM(go_backwards=
        True)`` or flax ``nn.RNN(reverse=True)`` without ``keep_order``,
        alternate directions instead, each reversing the last one's outputs). With
        ``seq_lengths``, each sequence's valid steps are reversed in place and
        its padding stays at the end (flax's ``flip_sequences``); otherwise,
        and with a ``mask``, the whole time axis is (Keras's ``go_backwards``).
      keep_order: with ``reverse``, return the outputs in the order of the
        inputs; without it (the default, as flax and Keras), in the order they
        were computed, i.e. reversed.
      bidirectional: run every layer forwards and backwards (see above). The
        state is then a tuple of ``2 * num_layers`` LSTMState, ordered as
        PyTorch's ``h_n``: layer 0 forward, layer 0 backward, layer 1 forward, ...
      merge_mode: how a bidirectional layer merges its directions' outputs
        (each in input order): ``"concat"`` (outputs ``2 * units`` wide, the
        forward half first), ``"sum"``, ``"mul"`` or ``"ave"``.
      zero_output_for_mask: a step that ``seq_lengths`` or ``mask`` leaves out
        outputs zeros if True (the default); if False it repeats the last
        valid step's output (the initial hidden state before any), as
        ``keras.layers.LSTM``'s default does. Its state is left as it was either way.
      time_major: inputs and outputs are ``[time, batch, bands, ...]`` instead
        of ``[batch, bands, time, ...]`` (flax's and PyTorch's time-major
        layout); masks, lengths and the state keep theirs. Free under
        ``jax.jit``: the stack runs time-major inside.
      implementation: how the recurrence runs. ``"kernel"``: the native CPU
        kernel (``csrc/``, one custom call per layer and chunk, rows split
        over threads), float32 on CPU only. ``"cudnn"``: cuDNN's fused LSTM
        (``jax.experimental.rnn``, one call per layer and chunk, bands folded
        into its rows) on a CUDA GPU, for float32 calls with ``seq_lengths``
        or no mask, no recurrent dropout in training and no ``remat_chunk``,
        not under ``jax.vmap`` (cuDNN's call has no batching rule, and the
        training step's per-entry dropout keys vmap over the entries); not
        yet run on a GPU by this project's tests, so opt-in. ``"scan"``: a
        ``jax.lax.scan`` that XLA compiles, for every platform and dtype.
        ``"auto"`` (the default): the kernel where it applies (float32
        arithmetic, CPU backend, extension built, tanh and sigmoid), else the
        scan. The kernel
        and the scan give the same results to float32 rounding; cuDNN does
        where ``jax_default_matmul_precision`` is ``"highest"`` or
        ``"float32"``, and otherwise runs TF32 (``"bfloat16"`` is refused by
        JAX's wrapper);
        ``unroll`` applies to the scan only. The kernel and cuDNN have
        first-order reverse-mode derivatives only (``grad``, ``vjp``) and are
        custom calls that ``jax.export`` refuses: use ``"scan"`` for ``jvp``,
        ``jacfwd``, ``hessian``, gradients of gradients and exports.
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
            gradients); lengths longer than ``time`` mean every step is valid,
            also past int32 (they are clipped to ``time`` before the cast).
            Under ``jax.jit`` with 64-bit types off, JAX itself casts int64
            arguments to int32 (2**40 becomes 0) before the model sees them:
            pass int32 or uint32 lengths there.
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
        what = _streaming.get()
        if what is not None and (self.reverse or self.bidirectional):
            raise ValueError(
                f"{what} feeds a sequence in chunks in time order, but this BandedLSTM runs "
                f"{'both ways' if self.bidirectional else 'backwards'}: its backward state "
                "threads from the sequence's end. Run it on whole sequences (one call "
                "each), or a reversed stack on chunks from the last to the first"
            )
        features = _validate.input_features(self.variables)  # None while initialising
        if features is None and not self.is_initializing():
            _validate.check_variables(self, self.variables)  # raises, naming what is missing
        if self.time_major:
            inputs = _validate.as_array(inputs, "inputs")
            if inputs.ndim != 4:
                raise ValueError(
                    "inputs: with time_major=True, expected rank 4, [time, batch, bands, "
                    f"features]; received shape {tuple(inputs.shape)}"
                )
            if features is not None and inputs.shape[-1] != features:
                raise ValueError(
                    f"inputs: with time_major=True, expected [time, batch, bands, {features}] "
                    "(the features the parameters were built for); "
                    f"received shape {tuple(inputs.shape)}"
                )
            inputs = jnp.moveaxis(inputs, 0, 2)
        inputs = _validate.check_inputs(inputs, features=features)
        _validate.check_devices(variables=self.variables, state=state, inputs=inputs)
        batch, bands, time, features = inputs.shape
        directions = (False, True) if self.bidirectional else (self.reverse,)
        if state is None:
            state = self.initial_state(batch, bands)
        else:
            state = _validate.check_state(
                state, self.num_layers, (batch, bands, self.units), directions=len(directions)
            )
        if seq_lengths is not None and mask is not None:
            raise ValueError("seq_lengths, mask: give one or the other, not both")
        lengths = None
        if seq_lengths is not None:
            lengths = _validate.check_seq_lengths(seq_lengths, batch, bands, time)
        valid = _valid_steps(lengths, mask, batch, bands, time)
        dtype = _compute_dtype(inputs.dtype, self.param_dtype)
        kernel = self._uses_kernel(dtype)
        recurrent_dropout = not deterministic and self.recurrent_dropout > 0
        cudnn = not kernel and self._uses_cudnn(dtype, mask is not None, recurrent_dropout, time)
        dropout_masks = self._dropout_masks(deterministic, (batch, bands), features)
        gates = partial(
            lstm_gates,
            activation=activation_fn(self.activation),
            recurrent_activation=activation_fn(self.recurrent_activation),
        )
        layer_weights = partial(
            _LayerWeights,
            self.units,
            self.kernel_init,
            self.recurrent_kernel_init,
            self.unit_forget_bias,
            self.param_dtype,
            self.use_bias,
        )
        # Time-major from here on, so that layers chain without transposes
        # (see _run_layer on the [batch, bands] axes).
        layer_inputs = jnp.moveaxis(inputs, 2, 0).astype(dtype)
        if valid is not None:
            # Steps past the lengths never count, whatever they hold: zeroed,
            # a NaN there cannot reach the weights' gradient (0 * NaN).
            layer_inputs = jnp.where(valid[..., None], layer_inputs, jnp.zeros((), dtype))
        final_state = []
        for layer in range(self.num_layers):
            outputs = []
            for direction, backward in enumerate(directions):
                index = layer * len(directions) + direction
                suffix = "_reverse" if direction else ""
                weights = layer_weights(name=f"layer_{layer}{suffix}")(layer_inputs.shape[-1])
                weights = tuple(w.astype(dtype) for w in weights)
                input_mask, recurrent_mask = dropout_masks[index]
                x = layer_inputs
                if input_mask is not None:
                    x = x * input_mask.astype(dtype)[None]
                # A backward direction runs forwards over the reversed steps.
                # Reversed in place within seq_lengths, the valid steps stay first.
                # A reversed stack reverses its inputs once and chains its layers
                # in that order, so every layer runs backwards; a bidirectional
                # layer reverses and restores its own.
                steps = valid
                if backward:
                    if self.bidirectional or layer == 0:
                        x = _flip_time(x, lengths)
                    if lengths is None and valid is not None:
                        steps = valid[::-1]
                carry = tuple(_shard_like(c.astype(dtype), x) for c in state[index])
                last = layer == self.num_layers - 1
                # A model's outputs come out of its last layer: with one
                # direction running forwards, the layer returns them in the
                # layout the model returns (on the kernel, written so: no
                # transpose of the largest array follows).
                batch_major = (
                    not cudnn
                    and last
                    and not self.time_major
                    and len(directions) == 1
                    and not backward
                )
                if cudnn:
                    (hidden, cell), y = _cudnn.run_layer(weights, carry, x, lengths)
                else:
                    (hidden, cell), y = _run_layer(
                        weights,
                        None if recurrent_mask is None else recurrent_mask.astype(dtype),
                        carry,
                        (x, steps),
                        unroll=self.unroll,
                        remat_chunk=self.remat_chunk,
                        kernel=kernel,
                        packed=(
                            self._packed_weights(f"layer_{layer}{suffix}", weights)
                            if kernel
                            else None
                        ),
                        gates=gates,
                        batch_major=batch_major,
                    )
                final_state.append(LSTMState(hidden, cell))
                if steps is not None and self.zero_output_for_mask:
                    held = jnp.moveaxis(steps, 0, 2) if batch_major else steps
                    y = jnp.where(held[..., None], y, jnp.zeros((), dtype))
                if backward and (self.bidirectional or (self.keep_order and last)):
                    y = _flip_time(y, lengths)
                outputs.append(y)
            layer_inputs = outputs[0] if len(outputs) == 1 else _merge(self.merge_mode, *outputs)
        if batch_major:
            return tuple(final_state), layer_inputs
        return tuple(final_state), jnp.moveaxis(layer_inputs, 0, 0 if self.time_major else 2)

    def _packed_weights(self, name: str, weights: tuple[jax.Array, ...]) -> jax.Array | None:
        """Layer ``name``'s forward weights packed ahead of time, or None.

        Read from :data:`~banded_rnn._kernel.PACKED_COLLECTION` where a
        ``Stream`` stored them, if laid out for the instruction set in use;
        stored there (and returned) inside ``_kernel.packing()`` with the
        collection mutable. Nothing else creates the collection, so
        ``init`` and training never carry a copy that could go stale.
        """
        collection = _kernel.PACKED_COLLECTION
        if self.has_variable(collection, name):
            packed = self.get_variable(collection, name)
            expected = _kernel.packed_shape(weights[0].shape[0], self.units)
            return packed if packed.shape == expected else None
        if _kernel.packing_requested() and self.is_mutable_collection(collection):
            packed = _kernel.pack_forward(*weights)
            self.put_variable(collection, name, packed)
            return packed
        return None

    def _uses_kernel(self, dtype: Any) -> bool:
        """Whether this call runs the native kernel (see ``implementation``)."""
        if self.implementation in ("scan", "cudnn") or _kernel.scan_forced():
            return False
        backend = jax.default_backend()
        standard = is_standard(self.activation, self.recurrent_activation)
        fits = jnp.dtype(dtype) == jnp.float32 and backend == "cpu" and standard
        if self.implementation == "kernel":
            if not _kernel.available():
                raise RuntimeError(
                    "implementation='kernel': the native CPU kernel is not built "
                    f"({_kernel.info()['error']}); use 'auto' or 'scan'"
                )
            if not standard:
                raise ValueError(
                    "implementation='kernel': the kernel runs the tanh and sigmoid "
                    f"activations; this model has activation={self.activation!r}, "
                    f"recurrent_activation={self.recurrent_activation!r} (use 'auto' or 'scan')"
                )
            if not fits:
                raise ValueError(
                    "implementation='kernel': the kernel runs float32 on CPU; this call "
                    f"computes in {jnp.dtype(dtype).name} on {backend} (use 'auto' or 'scan')"
                )
            return True
        if fits and not _kernel.available():
            _kernel.warn_unavailable()
            return False
        return fits

    def _uses_cudnn(self, dtype: Any, masked: bool, recurrent_dropout: bool, time: int) -> bool:
        """Whether this call runs cuDNN's fused LSTM (see ``implementation``):
        decided in Python from the platform and the call, never by tracing.
        Only when asked for: ``"auto"`` keeps the scan on GPUs until the path
        has been checked on one (cuDNN's call also has no ``vmap`` rule)."""
        if self.implementation != "cudnn" or _kernel.scan_forced():
            return False
        reasons = {
            "it runs float32 only": jnp.dtype(dtype) != jnp.float32,
            f"it runs on {_cudnn.PLATFORMS} ({jax.default_backend()} here)": (
                not _cudnn.platform_supported()
            ),
            "it takes seq_lengths, not a mask": masked,
            "it draws its own dropout masks (recurrent_dropout in training)": recurrent_dropout,
            "it keeps its own residuals (remat_chunk)": self.remat_chunk is not None,
            "it needs at least one time step": time == 0,
            "it runs the tanh and sigmoid activations only": not is_standard(
                self.activation, self.recurrent_activation
            ),
        }
        refused = [reason for reason, applies in reasons.items() if applies]
        if refused:
            raise ValueError(
                f"implementation='cudnn': this call cannot run on cuDNN: {'; '.join(refused)} "
                "(use 'auto' or 'scan')"
            )
        return True

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
                    jax.random.bernoulli(key, 1.0 - rate, (*batch_bands, size)) / (1.0 - rate)
                    if rate
                    else None
                    for key, rate, size in zip(keys[index], rates, sizes, strict=True)
                )
            )
        return masks


def _valid_steps(lengths, mask, batch, bands, time) -> jax.Array | None:
    """``[time, batch, bands]`` booleans, which steps update the state, from
    checked ``lengths`` (int32 ``[batch, bands]``) or ``mask``; None when every
    step does."""
    if lengths is not None:
        return jnp.arange(time)[:, None, None] < lengths[None]
    if mask is not None:
        return jnp.moveaxis(_validate.check_mask(mask, batch, bands, time), 2, 0)
    return None


def _compute_dtype(inputs_dtype: Any, param_dtype: Any) -> Any:
    """The dtype of the state and the arithmetic: at least float32, float64
    only where JAX enables it (no cast warning with x64 off)."""
    dtype = jnp.promote_types(jnp.promote_types(inputs_dtype, param_dtype), jnp.float32)
    return jax.dtypes.canonicalize_dtype(dtype)
