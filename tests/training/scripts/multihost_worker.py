"""One process of a multi-process training run (``jax.distributed`` over
127.0.0.1), started by multihost_launcher.py for tests/training/test_multihost.py,
which compares the run with ``helpers.multihost_run`` on one process.

Usage: ``python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DIRECTORY NUM_STEPS
DEVICES BANDS [padded]``: ``DEVICES`` CPU devices per process, the mesh's bands axis
``BANDS``; ``padded``: sequences whose lengths are no multiple of the chunk, so
that every batch carries ``seq_lengths`` across the processes, and a masked loss.
Process 0 writes what the run gave, gathered to the host, to ``DIRECTORY/result.npz``.
"""

import sys

import jax
import numpy as np

from banded_rnn.training import make_mesh

from helpers import multihost_run

process_id, num_processes, port, directory, num_steps, devices, bands = sys.argv[1:8]
padded = sys.argv[8:] == ["padded"]
jax.config.update("jax_num_cpu_devices", int(devices))
jax.distributed.initialize(
    f"127.0.0.1:{port}", num_processes=int(num_processes), process_id=int(process_id)
)
mesh = make_mesh(bands=int(bands))
history, params, state = multihost_run(int(num_steps), directory, mesh=mesh, padded=padded)
if jax.process_index() == 0:
    leaves = jax.tree.leaves((params, state))
    np.savez(f"{directory}/result.npz", *leaves, **history)
print("done", flush=True)
