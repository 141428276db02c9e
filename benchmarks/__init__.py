"""Benchmarks of ``banded_rnn`` against PyTorch, Keras and Flax (see ``benchmarks/run.py``).

Run ``python -m benchmarks.run`` (``--quick`` for the everyday version); the
table goes to ``benchmarks/RESULTS.md``.
"""
