"""The checks a training or evaluation step runs before its jitted call.

Nothing runs: shapes come from ``jax.eval_shape`` of the model, the loss and
the metrics. Each signature of shapes and dtypes is checked once, then
remembered, so a bad call raises ``ValueError`` or ``TypeError`` naming the
argument before anything is donated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax.training.train_state import TrainState
from jax.sharding import Mesh

from .._internal import validate as _validate
from . import _mesh
from ._model_call import call_model, needs_dropout_rng
from ._targets import call_loss, loss_mask, takes_mask


class StepChecks:
    """The checks of one step: its ``loss_fn``, ``targets_per``, ``metrics``
    (``{name: fn}``), ``mesh`` (or None) and whether it trains (``training``:
    a model with dropout then needs an rng)."""

    def __init__(
        self,
        loss_fn: Callable[..., Any],
        targets_per: str,
        metrics: dict[str, Callable[[Any, Any], Any]],
        mesh: Mesh | None,
        *,
        training: bool,
    ) -> None:
        self.loss_fn, self.targets_per, self.metrics = loss_fn, targets_per, metrics
        self.mesh, self.training = mesh, training
        self._checked: set[Any] = set()

    def check(
        self,
        train_state: TrainState,
        state: Any,
        inputs: Any,
        targets: Any,
        rng: Any,
        extras: tuple[Any, Any, Any],
        *,
        abstract: bool,
    ) -> None:
        """Raises for a call the step cannot take; ``extras`` are its
        ``(seq_lengths, mask, ends)``, ``abstract`` allows
        ``jax.ShapeDtypeStruct`` s, ``targets=None`` checks a call without
        targets (``EvalStep.predict``)."""
        if not isinstance(train_state, TrainState):
            raise TypeError(
                "train_state: expected a flax.training.train_state.TrainState; "
                f"received {type(train_state).__name__}"
            )
        leaves, treedef = jax.tree.flatten(
            (train_state.params, state, inputs, targets, rng, extras)
        )
        apply_fn = train_state.apply_fn
        try:
            hash(apply_fn)
        except TypeError:
            apply_fn = id(apply_fn)
        signature = (
            abstract,
            treedef,
            apply_fn,
            tuple((_validate.shape_of(a), getattr(a, "dtype", type(a))) for a in leaves),
        )
        seq_lengths = extras[0]
        if isinstance(seq_lengths, np.ndarray) and np.any(seq_lengths < 0):
            # Host values, checked on every call (device arrays are not read).
            raise ValueError(f"seq_lengths: expected lengths >= 0; received {seq_lengths}")
        if signature in self._checked:
            return
        self._check(train_state, state, inputs, targets, rng, extras, abstract)
        self._checked.add(signature)

    def _check(self, train_state, state, inputs, targets, rng, extras, abstract) -> None:
        inputs = _validate.check_inputs(inputs, nonempty=True, abstract=abstract)
        batch, bands, time, _ = inputs.shape
        if rng is not None:
            _validate.check_rng(rng, batch)
        if self.mesh is not None:
            _mesh.check_divisible(self.mesh, batch, bands)
        valid_steps = self._check_valid_steps(*extras, batch, bands, time)
        apply_fn, params = train_state.apply_fn, train_state.params
        # Shape errors (a state that does not match the batch, wrong features)
        # come from the model itself, traced abstractly.
        try:
            final_state, outputs = jax.eval_shape(
                lambda p, s, x, v: call_model(apply_fn, p, s, x, valid_steps=v),
                params, state, inputs, valid_steps,
            )  # fmt: skip
        except TypeError as error:
            for name in valid_steps:
                if "unexpected keyword argument" in str(error) and name in str(error):
                    raise TypeError(
                        f"{name}: the model's apply_fn does not take {name}= ({error}); give "
                        "the model's __call__ that keyword (BandedLSTM takes seq_lengths "
                        "and mask) to train on padded sequences"
                    ) from error
            raise
        if self.training and rng is None and needs_dropout_rng(apply_fn, params, inputs):
            raise ValueError(
                "rng: the model has dropout on (it needs a 'dropout' rng in training) "
                "but rng is None; pass jax.random.key(...), one key per batch entry "
                f"[batch] = ({batch},), or build the model without dropout"
            )
        if state is not None and jax.tree.structure(state) != jax.tree.structure(final_state):
            raise ValueError(
                "state: expected the structure of the model's final state, "
                f"{jax.tree.structure(final_state)}; received {jax.tree.structure(state)}"
            )
        self._check_outputs(outputs, batch, bands, time)
        if targets is None:
            return
        self._check_targets(outputs, targets, batch, bands, time)
        mask = jax.eval_shape(
            lambda v, e: loss_mask(self.targets_per, v, e, batch, bands, time),
            valid_steps, extras[2],
        )  # fmt: skip
        if mask is not None and not takes_mask(self.loss_fn):
            given = "ends" if self.targets_per == "sequence" else next(iter(valid_steps))
            raise TypeError(
                f"loss_fn: the batch has {given}, so the loss must skip the targets that do "
                "not count: expected loss_fn(outputs, targets, mask), mask "
                f"{'[batch]' if self.targets_per == 'sequence' else '[batch, bands, time]'} "
                "bools; wrap a per-element loss in banded_rnn.training.masked_mean(...)"
            )
        for name, fn in [("loss_fn", self.loss_fn), *self.metrics.items()]:
            self._check_reduction(name, fn, outputs, targets, mask, scalar=fn is self.loss_fn)

    def _check_valid_steps(self, seq_lengths, mask, ends, batch, bands, time) -> dict:
        """The model's keyword arguments for ``seq_lengths`` or ``mask``, checked."""
        if seq_lengths is not None and mask is not None:
            raise ValueError("seq_lengths, mask: give one or the other, not both")
        if ends is not None:
            if self.targets_per != "sequence":
                raise ValueError(
                    "ends: marks the windows where a sequence's one target counts; it "
                    "needs targets_per='sequence' (this step has targets_per='step': pass "
                    "seq_lengths or mask to leave steps out)"
                )
            if _validate.shape_of(ends) != (batch,) or _validate.dtype_of(ends) != np.bool_:
                raise ValueError(
                    f"ends: expected bools [batch] = ({batch},); received "
                    f"{_validate.shape_of(ends)} {_validate.dtype_of(ends)}"
                )
        if seq_lengths is not None:
            # Shapes and dtype only: values are checked on every call (check()),
            # and a global array of several processes has none to read here.
            shape, dtype = _validate.shape_of(seq_lengths), _validate.dtype_of(seq_lengths)
            if shape not in ((batch,), (batch, bands)):
                raise ValueError(
                    f"seq_lengths: expected shape [batch] = ({batch},) or [batch, bands] = "
                    f"({batch}, {bands}); received {shape}"
                )
            if not np.issubdtype(dtype, np.integer):
                raise TypeError(f"seq_lengths: expected an integer dtype; received {dtype}")
            return {"seq_lengths": seq_lengths}
        if mask is not None:
            _validate.check_mask_shape(_validate.shape_of(mask), batch, bands, time)
            if _validate.dtype_of(mask) != np.bool_:
                raise TypeError(f"mask: expected a bool dtype; received {_validate.dtype_of(mask)}")
            return {"mask": mask}
        return {}

    def _check_outputs(self, outputs, batch, bands, time) -> None:
        shape = _validate.shape_of(outputs)
        if self.targets_per == "step" and shape[:3] != (batch, bands, time):
            raise ValueError(
                "outputs: with targets per step, expected the model's outputs "
                f"[batch, bands, time, ...] = ({batch}, {bands}, {time}, ...); received "
                f"{shape}. For one target per sequence (a classifier's logits), build the "
                "step with targets_per='sequence'"
            )
        if self.targets_per == "sequence" and shape[:1] != (batch,):
            raise ValueError(
                f"outputs: expected the model's outputs [batch, ...] = ({batch}, ...); "
                f"received {shape}"
            )

    def _check_targets(self, outputs, targets, batch, bands, time) -> None:
        out_shape, target_shape = tuple(outputs.shape), _validate.shape_of(targets)
        if self.targets_per == "sequence":
            lead, expected = (batch,), f"[batch, ...] = ({batch}, ...)"
        else:
            lead = (batch, bands, time)
            expected = f"[batch, bands, time, ...] = {lead}"
        if target_shape[: len(lead)] != lead or (
            len(target_shape) == len(out_shape) and target_shape != out_shape
        ):
            raise ValueError(
                f"targets: expected shape {expected}, the outputs' shape {out_shape} when of "
                f"their rank; received {target_shape}"
            )

    @staticmethod
    def _check_reduction(name, fn, outputs, targets, mask, *, scalar) -> None:
        """Raises unless ``fn`` (the loss, or a metric) takes these outputs and
        targets and returns a scalar (the loss) or per-target values."""
        try:
            value = jax.eval_shape(
                lambda o, t, m: call_loss(fn, o, t, m) if scalar else fn(o, t),
                outputs, targets, mask,
            )  # fmt: skip
        except Exception as error:
            raise ValueError(
                f"{name}: failed on the model's outputs {outputs.shape} {outputs.dtype} and the "
                f"targets {_validate.shape_of(targets)} {_validate.dtype_of(targets)}: {error}"
            ) from error
        shape = getattr(value, "shape", None)
        if scalar and shape != ():
            raise ValueError(f"{name}: expected a scalar loss; received {shape or value!r}")
        lead = None if mask is None else tuple(mask.shape)
        if not scalar and (shape is None or (lead is not None and shape[: len(lead)] != lead)):
            raise ValueError(
                f"metrics[{name!r}]: expected values per target, of shape {lead or '[batch, ...]'}"
                f" or longer; received {shape}"
            )
