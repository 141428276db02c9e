"""Saves a stream's state after every step, over and over, for the test of
state files that survive a SIGKILL during a save (tests/streaming/test_stream_faults.py).

Usage: ``python save_state_in_a_loop.py INPUTS STATE_FILE``: INPUTS, a pickle
of ``(units, variables, chunk)``, gives a ``BandedLSTM(units)`` with
``variables``, fed ``chunk`` at every step; after each step its state is saved
to STATE_FILE, replacing the last. Prints ``ready`` once the first is saved.
"""

import pickle
import sys

from banded_rnn import BandedLSTM, Stream

with open(sys.argv[1], "rb") as file:
    units, variables, chunk = pickle.load(file)
stream = Stream(BandedLSTM(units), variables, *chunk.shape[:2])
for steps in range(1, 200):  # states after 1, 2, 3, ... steps
    stream(chunk)
    stream.save(sys.argv[2])
    if steps == 1:
        print("ready", flush=True)
