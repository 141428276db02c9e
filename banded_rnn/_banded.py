"""``BandedLSTM``: one shared LSTM scanned over time and run over every band."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from . import _cudnn, _kernel, _validate
from ._cell import LayerWeights, lstm_gates
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

    @nn.compact
    def __call__(self, features: int) -> LayerWeights:
        gates = 4 * self.units
        kernel = self.param("kernel", self.kernel_init, (features, gates), self.param_dtype)
        recurrent_kernel = self.param(
            "recurrent_kernel", self.recurrent_kernel_init, (self.units, gates), self.param_dtype
        )
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


def _time_step(
    project: Callable[[jax.Array, jax.Array], jax.Array],
    recurrent_mask: jax.Array | None,
    carry: tuple[jax.Array, jax.Array],
    xs: tuple[jax.Array, jax.Array | None],
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """One time step for every (sequence, band) at once: ``[batch, bands, ...]``."""
    hidden, cell = carry
    inputs, valid = xs
    dropped = hidden if recurrent_mask is None else hidden * recurrent_mask
    preactivations = checkpoint_name(project(inputs, dropped), "preactivations")
    new_hidden, new_cell = lstm_gates(preactivations, cell)
    if valid is None:
        return (new_hidden, new_cell), new_hidden
    valid = valid[..., None]
    new_hidden = jnp.where(valid, new_hidden, hidden)
    new_cell = jnp.where(valid, new_cell, cell)
    return (new_hidden, new_cell), jnp.where(valid, new_hidden, jnp.zeros_like(new_hidden))


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


def _scan_layer(weights, recurrent_mask, carry, xs, *, unroll):
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
        partial(_time_step, project, recurrent_mask),
        policy=jax.checkpoint_policies.save_only_these_names("preactivations"),
        prevent_cse=False,  # the scan already keeps XLA from merging steps
    )
    return jax.lax.scan(step, carry, xs, unroll=unroll)


def _run_layer(weights, recurrent_mask, carry, xs, *, unroll, remat_chunk, kernel, packed=None):
    """One layer over ``xs``: on the native CPU kernel if ``kernel`` (reading
    ``packed`` weights if given), else ``_scan_layer``; optionally
    rematerialised in chunks of ``remat_chunk`` steps.

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
    layer = (
        partial(_kernel.run_layer, packed=packed) if kernel else partial(_scan_layer, unroll=unroll)
    )
    if remat_chunk is None or xs[0].shape[0] <= remat_chunk:
        return layer(weights, recurrent_mask, carry, xs)
    run_chunk = jax.checkpoint(partial(layer, weights, recurrent_mask))
    return scan_chunks(run_chunk, carry, xs, remat_chunk, axis=0)


IMPLEMENTATIONS = ("auto", "kernel", "cudnn", "scan")
"""``BandedLSTM.implementation``'s values."""


class BandedLSTM(nn.Module):
    """A stack of LSTM layers shared by every band, with explicit per-band state.

    Every band of ``inputs [batch, bands, time, features]`` runs through the
    same weights, and every (sequence, band) pair keeps its own state: bands
    never see each other. Per layer and time step, with
    ``z = x_t @ kernel + h @ recurrent_kernel + bias`` split into the gates
    ``i, f, g, o``::

        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(c')

    exactly as ``keras.layers.LSTM`` (sigmoid and tanh activations), with its
    parameter layout per layer: ``kernel [features, 4 * units]``,
    ``recurrent_kernel [units, 4 * units]``, ``bias [4 * units]``, stored under
    ``params/layer_{i}``. Layer ``i + 1`` reads the hidden outputs of layer ``i``.

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
      unroll: time steps per iteration of the scanned loop.
      remat_chunk: if set, rematerialise the recurrence in chunks of this many
        steps: the backward pass stores the state only at chunk boundaries and
        recomputes the rest, trading compute for memory on long sequences.
      kernel_init: the input weights' initialiser; Keras's default, Glorot uniform.
      recurrent_kernel_init: the recurrent weights' initialiser; Keras's
        default, orthogonal.
      param_dtype: dtype of the parameters.
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
        arithmetic, CPU backend, extension built), else the scan. The kernel
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
    unroll: int = 1
    remat_chunk: int | None = None
    kernel_init: Initializer = nn.initializers.glorot_uniform()
    recurrent_kernel_init: Initializer = nn.initializers.orthogonal()
    param_dtype: Any = jnp.float32
    implementation: str = "auto"

    def __post_init__(self) -> None:
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation: expected one of {IMPLEMENTATIONS}; "
                f"received {self.implementation!r}"
            )
        for name in ("units", "num_layers", "unroll"):
            _validate.positive_int(getattr(self, name), name)
        _validate.positive_int(self.remat_chunk, "remat_chunk", optional=True)
        for name in ("dropout", "recurrent_dropout"):
            _validate.rate(getattr(self, name), name)
        super().__post_init__()

    def initial_state(self, batch_size: int, num_bands: int, dtype: Any = jnp.float32) -> State:
        """Zeros for every layer: a tuple of ``num_layers`` LSTMState, each field
        ``[batch_size, num_bands, units]``, every field its own buffer (so the
        state can be donated). Needs no parameters."""
        return zero_state(self.num_layers, (batch_size, num_bands, self.units), dtype)

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
          state: a tuple of ``num_layers`` LSTMState, each field
            ``[batch, bands, units]``; ``None`` starts from zeros.
          inputs: ``[batch, bands, time, features]``, any floating dtype. The
            state and the arithmetic are at least float32.
          seq_lengths: optional integers, ``[batch]`` or ``[batch, bands]``.
            Steps at or past a sequence's length leave its state unchanged and
            output zeros, and what they hold never counts (a NaN there reaches
            neither the outputs nor the gradients); lengths longer than ``time``
            mean every step is valid,
            also past int32 (they are clipped to ``time`` before the cast).
            Under ``jax.jit`` with 64-bit types off, JAX itself casts int64
            arguments to int32 (2**40 becomes 0) before the model sees them:
            pass int32 or uint32 lengths there.
          mask: optional booleans, ``[batch, time]`` or ``[batch, bands, time]``:
            a false step leaves that sequence's state unchanged and outputs
            zeros, wherever it is. Give ``seq_lengths`` or ``mask``, not both.
          deterministic: if False, apply dropout with the ``'dropout'`` rng.

        Returns:
          ``(final_state, outputs)``: the state after each sequence's last
          valid step, and the last layer's hidden outputs
          ``[batch, bands, time, units]``.
        """
        features = _validate.input_features(self.variables)  # None while initialising
        if features is None and not self.is_initializing():
            _validate.check_variables(self, self.variables)  # raises, naming what is missing
        inputs = _validate.check_inputs(inputs, features=features)
        _validate.check_devices(variables=self.variables, state=state, inputs=inputs)
        batch, bands, time, features = inputs.shape
        if state is None:
            state = self.initial_state(batch, bands)
        else:
            state = _validate.check_state(state, self.num_layers, (batch, bands, self.units))
        valid = _valid_steps(seq_lengths, mask, batch, bands, time)
        dropout_masks = self._dropout_masks(deterministic, (batch, bands), features)
        dtype = _compute_dtype(inputs.dtype, self.param_dtype)
        kernel = self._uses_kernel(dtype)
        recurrent_dropout = not deterministic and self.recurrent_dropout > 0
        cudnn = not kernel and self._uses_cudnn(dtype, mask is not None, recurrent_dropout, time)
        lengths = None
        if cudnn and seq_lengths is not None:
            lengths = _validate.check_seq_lengths(seq_lengths, batch, bands, time)
        layer_weights = partial(
            _LayerWeights,
            self.units,
            self.kernel_init,
            self.recurrent_kernel_init,
            self.unit_forget_bias,
            self.param_dtype,
        )
        # Time-major from here on, so that layers chain without transposes
        # (see _run_layer on the [batch, bands] axes).
        layer_inputs = jnp.moveaxis(inputs, 2, 0).astype(dtype)
        if valid is not None:
            # Steps past the lengths never count, whatever they hold: zeroed,
            # a NaN there cannot reach the weights' gradient (0 * NaN).
            layer_inputs = jnp.where(valid[..., None], layer_inputs, jnp.zeros((), dtype))
        final_state = []
        for layer, layer_state in enumerate(state):
            weights = layer_weights(name=f"layer_{layer}")(layer_inputs.shape[-1])
            weights = tuple(w.astype(dtype) for w in weights)
            input_mask, recurrent_mask = dropout_masks[layer]
            if input_mask is not None:
                layer_inputs = layer_inputs * input_mask.astype(dtype)[None]
            carry = tuple(_shard_like(c.astype(dtype), layer_inputs) for c in layer_state)
            if cudnn:
                (hidden, cell), layer_inputs = _cudnn.run_layer(
                    weights, carry, layer_inputs, lengths
                )
                final_state.append(LSTMState(hidden, cell))
                continue
            (hidden, cell), layer_inputs = _run_layer(
                weights,
                None if recurrent_mask is None else recurrent_mask.astype(dtype),
                carry,
                (layer_inputs, valid),
                unroll=self.unroll,
                remat_chunk=self.remat_chunk,
                kernel=kernel,
                packed=self._packed_weights(f"layer_{layer}", weights) if kernel else None,
            )
            final_state.append(LSTMState(hidden, cell))
        return tuple(final_state), jnp.moveaxis(layer_inputs, 0, 2)

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
        fits = jnp.dtype(dtype) == jnp.float32 and backend == "cpu"
        if self.implementation == "kernel":
            if not _kernel.available():
                raise RuntimeError(
                    "implementation='kernel': the native CPU kernel is not built "
                    f"({_kernel.info()['error']}); use 'auto' or 'scan'"
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
        """One ``(input_mask, recurrent_mask)`` per layer, ``[batch, bands, size]``,
        or Nones: the dropout masks, kept for every time step."""
        rates = (self.dropout, self.recurrent_dropout)
        if deterministic or not any(rates):
            return [(None, None)] * self.num_layers
        if not self.has_rng("dropout"):
            raise ValueError(
                "rngs: dropout is on (deterministic=False) but no 'dropout' rng was "
                "given; pass rngs={'dropout': key} to apply"
            )
        keys = jax.random.split(self.make_rng("dropout"), (self.num_layers, 2))
        masks = []
        for layer in range(self.num_layers):
            sizes = (features if layer == 0 else self.units, self.units)
            masks.append(
                tuple(
                    jax.random.bernoulli(key, 1.0 - rate, (*batch_bands, size)) / (1.0 - rate)
                    if rate
                    else None
                    for key, rate, size in zip(keys[layer], rates, sizes, strict=True)
                )
            )
        return masks


def _valid_steps(seq_lengths, mask, batch, bands, time) -> jax.Array | None:
    """``[time, batch, bands]`` booleans, which steps update the state, from
    ``seq_lengths`` or ``mask``; None when every step does."""
    if seq_lengths is not None and mask is not None:
        raise ValueError("seq_lengths, mask: give one or the other, not both")
    if seq_lengths is not None:
        lengths = _validate.check_seq_lengths(seq_lengths, batch, bands, time)
        return jnp.arange(time)[:, None, None] < lengths[None]
    if mask is not None:
        return jnp.moveaxis(_validate.check_mask(mask, batch, bands, time), 2, 0)
    return None


def _compute_dtype(inputs_dtype: Any, param_dtype: Any) -> Any:
    """The dtype of the state and the arithmetic: at least float32, float64
    only where JAX enables it (no cast warning with x64 off)."""
    dtype = jnp.promote_types(jnp.promote_types(inputs_dtype, param_dtype), jnp.float32)
    return jax.dtypes.canonicalize_dtype(dtype)
