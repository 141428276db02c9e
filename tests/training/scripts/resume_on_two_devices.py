"""One process of two CPU devices trains on its mesh, is interrupted, and
resumes from its checkpoints (tests/training/test_multihost.py); the result,
gathered to the host, goes to ``DIRECTORY/result.npz``.

Usage: ``python resume_on_two_devices.py DIRECTORY NUM_STEPS``.
"""

import sys

import jax
import numpy as np

from banded_rnn.training import make_mesh

from helpers import multihost_run

directory, num_steps = sys.argv[1], int(sys.argv[2])
jax.config.update("jax_num_cpu_devices", 2)
multihost_run(6, directory, mesh=make_mesh())  # interrupted here, say
history, params, state = multihost_run(num_steps, directory, mesh=make_mesh())
np.savez(f"{directory}/result.npz", *jax.tree.leaves((params, state)), **history)
