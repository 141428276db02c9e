"""Runs a BandedLSTM on the kernel, then prints the instruction set, the
thread count and the threads of the last call, in a process whose environment
(BANDED_RNN_ISA, BANDED_RNN_THREADS) tests/kernel/test_kernel.py sets.
"""

import jax

import banded_rnn
from banded_rnn import BandedLSTM

x = jax.numpy.ones((4, 9, 5, 3))
model = BandedLSTM(8)
model.apply(model.init(jax.random.key(0), None, x), None, x)
info = banded_rnn.kernel_info()
print(info["isa"], info["threads"], info["last_call_threads"])
