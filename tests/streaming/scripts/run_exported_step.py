"""Runs a step serialised by ``export_stream_step`` with only JAX and NumPy
(tests/streaming/test_export.py): nothing of flax, optax or banded_rnn is imported.

Usage: ``python run_exported_step.py STEP DATA OUTPUT``: STEP, the serialised
step; DATA (.npz), the ``inputs``, the ``resets`` before each chunk and the
``chunk`` length. Saves the ``outputs`` joined along time and the final
``state`` to OUTPUT (.npz).
"""

import sys

import jax
import numpy as np

with open(sys.argv[1], "rb") as file:
    exported = jax.export.deserialize(file.read())
data = np.load(sys.argv[2])
inputs, resets, chunk = data["inputs"], data["resets"], int(data["chunk"])
state = tuple(np.zeros(a.shape, a.dtype) for a in exported.in_avals[:-2])
outputs = []
for k in range(len(resets)):
    state, y = exported.call(state, inputs[:, :, k * chunk : (k + 1) * chunk], resets[k])
    outputs.append(np.asarray(y))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("flax", "banded_rnn", "optax"))
assert not loaded, loaded
np.savez(sys.argv[3], outputs=np.concatenate(outputs, axis=2),
         state=np.stack([np.asarray(a) for a in state]))  # fmt: skip
