"""Restores past damaged checkpoints in a process of its own, whose whole
stderr tests/training/test_checkpoint_faults.py reads: it must stay quiet (no
tracebacks of tensorstore callbacks into orbax's closed event loop, no orbax
logs), even a while after the restore.

Usage: ``python restore_damaged_checkpoints.py DIRECTORY``; prints the step
restored, the steps left and the number of warnings.
"""

import gc
import sys
import time
import warnings
from pathlib import Path

from helpers import data_file, restore, root_node, save_steps

directory = Path(sys.argv[1])
save_steps(directory, [1, 2, 3])
root_node(directory / "3").unlink()  # every read fails, of the metadata first
(directory / "3" / "_CHECKPOINT_METADATA").unlink()  # orbax logs a warning
data_file(directory / "2").unlink()  # the reads of the larger arrays fail
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    restored, steps = restore(directory)
print(int(restored.train_state.step), steps, len(caught))
time.sleep(1.0)  # reads still in flight land now
gc.collect()  # and the reading coroutines left unfinished go
