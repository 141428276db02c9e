"""Converts PyTorch LSTM weights held in NumPy arrays to BandedLSTM variables
and back (tests/interop/test_interop_convert.py): torch must never be imported.
"""

import sys

import numpy as np

import interop

rng = np.random.default_rng(0)
state_dict = {
    "weight_ih_l0": rng.standard_normal((8, 3)),
    "weight_hh_l0": rng.standard_normal((8, 2)),
    "bias_ih_l0": np.ones(8),
    "bias_hh_l0": np.ones(8),
}
variables = interop.from_torch_lstm(state_dict)
interop.from_torch_lstm(interop.to_torch_lstm(variables, tensors=False))
assert "torch" not in sys.modules, "torch was imported"
