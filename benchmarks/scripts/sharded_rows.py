"""The benchmark's rows of ours split over two CPU devices, on tiny configurations
(benchmarks/test_benchmarks.py): timed when they agree with ours on one device,
refused when their weights differ. Prints each configuration and its row's parity.

JAX fixes its CPU device count before it runs anything, so this runs in a
process of its own.
"""

import dataclasses

import jax

from benchmarks import _baselines, _ours
from benchmarks._configs import Config
from benchmarks._harness import OURS_SHARDED, benchmark
from benchmarks._weights import random_data, random_weights

jax.config.update("jax_num_cpu_devices", 2)
for name, mode in (("seed", "inference"), ("train", "train")):
    config = Config(name, 4, 3, 5, 4, 6, 1, mode)
    weights = random_weights(config, seed=3)
    inputs, targets = random_data(config, seed=4)
    impls = [_ours.build(config, weights, inputs, targets)]
    impls.append(_ours.build_sharded(config, weights, inputs, targets))
    impls.append(_baselines.build_flax(config, weights, inputs, targets))
    wrong = _ours.build_sharded(config, weights.perturbed(1e-2), inputs, targets)
    impls.append(dataclasses.replace(wrong, name="sharded-perturbed"))
    result = benchmark(config, impls, repeats=1, warmup=0)
    row = result.row(OURS_SHARDED)
    assert row.error is None and row.times, row.error
    assert "2 CPU devices" in row.note, row.note
    assert result.row("sharded-perturbed").error.startswith("PARITY FAILED")
    print(name, row.parity)
