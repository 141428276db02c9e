"""A stream restarted from its state file in a new process, fed the rest of
its inputs (tests/streaming/test_stream.py and test_stream_models.py): it must
continue as the stream that saved the state would have.

Usage: ``python continue_stream.py MODEL DATA STATE_FILE OUTPUT``: MODEL,
``lstm`` or ``subband_mask`` (below), with ``helpers.init_model``'s variables;
DATA (.npz), the ``inputs`` [batch, bands, time, features] and the ``lengths``
of the chunks to feed them in. Saves the outputs, joined along time, to
OUTPUT (.npy).
"""

import sys

import numpy as np

from banded_rnn import BandedLSTM, Stream

from helpers import SubbandMask, init_model, run_chunks

MODELS = {"lstm": BandedLSTM(5, num_layers=2), "subband_mask": SubbandMask(hidden=7, units=5)}

name, data, state_file, output = sys.argv[1:]
model, data = MODELS[name], np.load(data)
inputs = data["inputs"]
batch, bands, _, features = inputs.shape
stream = Stream(model, init_model(model, inputs), batch, bands, max_chunk=8, features=features)
stream.load(state_file)
np.save(output, run_chunks(stream, inputs, data["lengths"]))
