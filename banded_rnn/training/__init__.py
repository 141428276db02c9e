"""Training a banded model: truncated back-propagation through time with threaded state.

``make_train_step`` builds a jitted, buffer-donating optax step that carries the
per-band state from chunk to chunk; ``ChunkStream`` and ``fit`` cut long
sequences into chunks and run the loop (per-entry resets, evaluation, a
progress bar, orbax checkpoints through ``Checkpointer``); ``make_mesh``
splits the batch (and the bands) over devices, and of several processes
(``jax.distributed``): ``global_batch`` joins each process's rows into the
global batch and ``gather_to_host`` brings split arrays back to every host.
"""

from ._checkpoint import Checkpointer as Checkpointer
from ._checkpoint import Restored as Restored
from ._data import Chunk as Chunk
from ._data import ChunkStream as ChunkStream
from ._evaluate import evaluate as evaluate
from ._evaluate import predict as predict
from ._history import FitResult as FitResult
from ._history import NonFiniteError as NonFiniteError
from ._loop import fit as fit
from ._losses import accuracy as accuracy
from ._losses import masked_mean as masked_mean
from ._make import make_eval_step as make_eval_step
from ._make import make_train_step as make_train_step
from ._mesh import gather_to_host as gather_to_host
from ._mesh import global_batch as global_batch
from ._mesh import make_mesh as make_mesh
from ._step import EvalStep as EvalStep
from ._step import TrainStep as TrainStep

__all__ = [
    "Checkpointer",
    "Chunk",
    "ChunkStream",
    "EvalStep",
    "FitResult",
    "NonFiniteError",
    "Restored",
    "TrainStep",
    "accuracy",
    "evaluate",
    "fit",
    "gather_to_host",
    "global_batch",
    "make_eval_step",
    "make_mesh",
    "make_train_step",
    "masked_mean",
    "predict",
]
