"""One process of a multi-process training run (``jax.distributed`` over 127.0.0.1),
started by tests/test_multihost.py; also the single-process reference it is
compared with (``run``, imported).

Usage: ``python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DIRECTORY NUM_STEPS
DEVICES BANDS [padded]``: ``DEVICES`` CPU devices per process, the mesh's bands axis
``BANDS``; ``padded``: sequences whose lengths are no multiple of the chunk, so
that every batch carries ``seq_lengths`` across the processes, and a masked loss.
Process 0 writes what the run gave, gathered to the host, to ``DIRECTORY/result.npz``.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from banded_rnn import BandedLSTM
from banded_rnn.training import (
    Checkpointer,
    ChunkStream,
    fit,
    gather_to_host,
    make_mesh,
    make_train_step,
    masked_mean,
)

BATCH, BANDS, FEATURES, UNITS, CHUNK = 4, 2, 3, 5, 4
LENGTHS = [8, 12, 4, 8, 16, 8, 12, 8]  # evaluated too: 4 of length 8 split over the mesh
PADDED_LENGTHS = [8, 11, 3, 8, 14, 7, 12, 5]
MODEL = BandedLSTM(UNITS, dropout=0.2, recurrent_dropout=0.2)


def data(lengths):
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((BANDS, t, FEATURES)).astype(np.float32) for t in lengths]
    targets = [rng.standard_normal((BANDS, t, UNITS)).astype(np.float32) for t in lengths]
    return inputs, targets


def loss(outputs, targets):
    return jnp.mean((outputs - targets) ** 2)


def run(num_steps, directory=None, mesh=None, padded=False, **stream_kwargs):
    """``fit`` on the shared data; returns the history and the final parameters
    and carried state, gathered to the host."""
    inputs, targets = data(PADDED_LENGTHS if padded else LENGTHS)
    loss_fn = masked_mean(lambda outputs, targets: (outputs - targets) ** 2) if padded else loss
    params = MODEL.init(jax.random.key(0), None, inputs[0][None])["params"]
    train_state = TrainState.create(apply_fn=MODEL.apply, params=params, tx=optax.adam(1e-2))
    stream = ChunkStream(inputs, targets, batch_size=BATCH, chunk_length=CHUNK, seed=1,
                         **stream_kwargs)  # fmt: skip
    kwargs = dict(num_steps=num_steps, rng=jax.random.key(2), progress=False,
                  eval_data=(inputs, targets), eval_every=3)  # fmt: skip
    if directory is None:
        result = fit(make_train_step(loss_fn, mesh=mesh), train_state, stream, **kwargs)
    else:
        with Checkpointer(directory) as checkpointer:
            result = fit(make_train_step(loss_fn, mesh=mesh), train_state, stream,
                         checkpointer=checkpointer, checkpoint_every=2, **kwargs)  # fmt: skip
    params, state = gather_to_host((result.train_state.params, result.state))
    return result.history, params, state


def main() -> None:
    process_id, num_processes, port, directory, num_steps, devices, bands = sys.argv[1:8]
    padded = sys.argv[8:] == ["padded"]
    jax.config.update("jax_num_cpu_devices", int(devices))
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=int(num_processes), process_id=int(process_id)
    )
    mesh = make_mesh(bands=int(bands))
    history, params, state = run(int(num_steps), directory, mesh=mesh, padded=padded)
    if jax.process_index() == 0:
        leaves = jax.tree.leaves((params, state))
        np.savez(f"{directory}/result.npz", *leaves, **history)
    print("done", flush=True)


if __name__ == "__main__":
    main()
