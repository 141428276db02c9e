"""Saves checkpoints of known values (``helpers.saved_values``) in a loop, for
tests/training/test_checkpoint_faults.py to kill with SIGKILL midway through a
save; resumes after the newest checkpoint there is.

Usage: ``python checkpoint_in_a_loop.py DIRECTORY``; prints ``saving STEP``
before each save.
"""

import sys

from banded_rnn.training import Checkpointer

from helpers import saved_values

with Checkpointer(sys.argv[1], max_to_keep=2) as checkpointer:
    for step in range((checkpointer.latest_step() or 0) + 1, 1000):
        values = saved_values(step)
        print("saving", step, flush=True)
        checkpointer.save(*values)
