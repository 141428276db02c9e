"""One of two processes (``jax.distributed`` over 127.0.0.1, one CPU device
each, a mesh over both), for tests/training/test_processes_must_agree.py:

1. the training step given the same global batch on both processes runs, and
   the check that the processes passed the same host values is timed;
2. each process passing only its own rows (the natural mistake) is refused,
   naming ``inputs`` and ``global_batch``, on both processes;
3. checkpoints of arrays split over the processes carry a checksum of the
   global arrays: a changed checksum, and a flipped byte in the newest
   checkpoint's data, are caught, and the step before is restored.

Usage: ``python processes_must_agree.py PROCESS_ID PORT DIRECTORY``. Prints
``agreed``, ``refused``, ``checksum caught`` and ``check: N us`` lines.
"""

import json
import sys
import time
import warnings
from pathlib import Path

import jax

process_id, port, directory = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
jax.config.update("jax_num_cpu_devices", 1)
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax.training.train_state import TrainState  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from banded_rnn import BandedLSTM  # noqa: E402
from banded_rnn.training import Checkpointer, gather_to_host, make_mesh, make_train_step  # noqa: E402
from banded_rnn.training._mesh import check_same_on_every_process  # noqa: E402

from helpers import init_model  # noqa: E402

model = BandedLSTM(4)
rng = np.random.default_rng(0)  # the same draws on both processes
inputs = rng.standard_normal((4, 3, 6, 2)).astype(np.float32)  # [batch, bands, time, features]
targets = rng.standard_normal((4, 3, 6, 4)).astype(np.float32)
params = init_model(model, inputs)["params"]
mesh = make_mesh()
step = make_train_step(lambda outputs, target: jnp.mean((outputs - target) ** 2), mesh=mesh)
created = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
train_state, _ = step.place(created)

# 1. The whole global batch, the same on both: trains.
train_state, state, metrics = step(train_state, None, inputs, targets)
assert np.isfinite(float(gather_to_host(metrics["loss"])))
print("agreed", flush=True)
named = {"inputs": inputs, "targets": targets}
check_same_on_every_process(named)  # compiles the gather once
start = time.perf_counter()
for _ in range(20):
    check_same_on_every_process(named)
print(f"check: {(time.perf_counter() - start) / 20 * 1e6:.0f} us", flush=True)

# 2. Only this process's rows, as NumPy: refused by name.
rows = slice(2 * process_id, 2 * process_id + 2)
try:
    step(train_state, None, inputs[rows], targets[rows])
except ValueError as error:
    message = str(error)
    assert message.startswith("inputs: the processes passed different values"), message
    assert "global_batch(mesh, rows)" in message, message
    print("refused", flush=True)

# 3. Checkpoints of split arrays, checked as the single-process ones.
with Checkpointer(directory) as checkpointer:
    saved = {}
    for saved_step in (1, 2):
        train_state = train_state.replace(step=saved_step)
        checkpointer.save(train_state, state, jax.random.key(3))
        saved[saved_step] = gather_to_host(train_state.params)
        train_state, state, _ = step(train_state, state, inputs, targets)
metadata = directory / "2" / "_CHECKPOINT_METADATA"
custom = json.loads(metadata.read_text())["custom_metadata"]
assert set(custom) == {"sum64"}, custom  # split over the processes: no single-process CRC


def restore_warning():
    with Checkpointer(directory) as checkpointer, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = checkpointer.restore(train_state, state, jax.random.key(3))
    got = gather_to_host(restored.train_state.params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(saved[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(restored.train_state.step) == 1
    return " ".join(str(w.message) for w in caught)


multihost_utils.sync_global_devices("saved")
if process_id == 0:  # a checksum that no longer matches the arrays
    record = json.loads(metadata.read_text())
    record["custom_metadata"]["sum64"] = (custom["sum64"] + 1) % (1 << 64)
    metadata.write_text(json.dumps(record))
multihost_utils.sync_global_devices("changed")
reason = restore_warning()  # restores step 1 on every process; process 0 warns
if process_id == 0:
    assert "the checkpoint of step 2" in reason and "differ from their checksum" in reason, reason
print("checksum caught", flush=True)
