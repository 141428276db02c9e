"""Imports banded_rnn and asks for the kernel's information, in a process
whose environment (BANDED_RNN_ISA, BANDED_RNN_THREADS) tests/kernel/test_kernel.py sets.
"""

import banded_rnn

banded_rnn.kernel_info()
