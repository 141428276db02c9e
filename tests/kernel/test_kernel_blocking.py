"""The native kernel's cache-aware blocking: the plan for given cache sizes,
results that do not depend on it (nor on the thread count), and the cache
sizes read from the CPU or forced through BANDED_RNN_CACHES."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from banded_rnn._backends import _native, _native_layer

from reference import lstm_reference

pytestmark = pytest.mark.skipif(
    not _native.available() or jax.default_backend() != "cpu",
    reason="the native kernel runs on the CPU backend",
)

KIB = 1 << 10


@pytest.fixture
def settings():
    """Restores the instruction set, threads and cache sizes after a test."""
    default = _native.info()["isa"]
    yield
    _native.set_isa(default)
    _native.set_threads(0)
    _native.set_cache_sizes(None)


def _plan(isa, l2, features, units, rows):
    _native.set_isa(isa)
    _native.set_cache_sizes({"l1d": 32 * KIB, "l2": l2, "l3": 32 * KIB * KIB})
    return _native.row_block(features, units, rows)


# Worked by hand from the rule in csrc/caches.h, for the sub-band layer of 384
# inputs and 384 units (a row reads 768 floats, 3 KiB; with its c and new h,
# 6 KiB) over 257 rows (one frame of 257 bands, split by units):
# * AVX2, 512 KiB L2: the rows (771 KiB) and a unit block's weights (769 k-rows
#   x 4 gates x 8 floats = 96.1 KiB) do not fit; half of L2 less the weights
#   holds 26 rows -> 24 (whole tiles of 6); blocked, 11 row blocks read the
#   weights 11 times (1057 KiB) against twice the rows (1542 KiB): blocks of 24.
# * AVX2, 1 MiB L2: the rows and weights fit (867 KiB): unblocked.
# * AVX-512, 512 KiB L2: a unit block is 192.3 KiB; 24 rows (the least) would
#   read the weights 11 times (2115 KiB) against the rows once (771 KiB): unblocked.
# * Any CPU whose L2 is not known (0): unblocked.
# And the first layer (32 inputs + 384 units, 1.6 KiB read a row, 4.6 KiB with
# the state; weights 417 x 4 x 8 floats = 52.1 KiB a block), AVX2, 512 KiB L2:
# 417.6 KiB + 52.1 KiB fit: unblocked; over 2056 rows (8 streams of 257 bands):
# (256 - 52.1) KiB / 4.6 KiB = 44 rows -> 42; 49 blocks (2554 KiB) against
# 2 x 3341 KiB: blocks of 42.
PLANS = [
    ("avx2", 512 * KIB, 384, 384, 257, 24),
    ("avx2", 1024 * KIB, 384, 384, 257, 257),
    ("avx512", 512 * KIB, 384, 384, 257, 257),
    ("avx2", 0, 384, 384, 257, 257),
    ("avx2", 512 * KIB, 32, 384, 257, 257),
    ("avx2", 512 * KIB, 32, 384, 2056, 42),
]


@pytest.mark.parametrize("isa, l2, features, units, rows, expected", PLANS)
def test_the_row_blocks_planned_for_given_cache_sizes(
    settings, isa, l2, features, units, rows, expected
):
    if isa not in _native.isas():
        pytest.skip(f"this CPU cannot run {isa}")
    assert _plan(isa, l2, features, units, rows) == expected


def _layer(time, rows, features, units, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((time, rows, features)).astype(np.float32)
    kernel = (rng.standard_normal((features, 4 * units)) / np.sqrt(features)).astype(np.float32)
    recurrent = (1.5 * rng.standard_normal((units, 4 * units)) / np.sqrt(units)).astype(np.float32)
    bias = (0.5 * rng.standard_normal(4 * units)).astype(np.float32)
    h0 = (0.5 * rng.standard_normal((rows, units))).astype(np.float32)
    c0 = (0.5 * rng.standard_normal((rows, units))).astype(np.float32)
    valid = rng.random((time, rows)) < 0.9
    return x, kernel, recurrent, bias, h0, c0, valid


def _run(arrays):
    """Outputs, final c and every gradient of one layer on the kernel."""
    x, kernel, recurrent, bias, h0, c0, valid = (jnp.asarray(a) for a in arrays)

    def loss(x, kernel, recurrent, bias):
        hs, c = _native_layer.recurrence(x, kernel, recurrent, bias, h0, c0, valid, None, None)
        return jnp.sum(jnp.sin(hs)) + jnp.sum(c * c), (hs, c)

    grads, (hs, c) = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, kernel, recurrent, bias)
    return [np.asarray(a) for a in (hs, c, *grads)]


@pytest.mark.parametrize("time", [1, 3])
def test_results_are_the_same_bits_whatever_the_blocking_and_threads(settings, time):
    """1200 rows of 20 inputs and 40 units. With a 112 KiB L2, every
    instruction set's plan blocks one thread's 1200 rows (a frame's rows, or
    a longer call's on one thread), with a shorter last block: the outputs,
    final c and gradients are the bits of the unblocked call, on 1, 2 and 3
    threads. The float64 loop checks the values."""
    rows, features, units = 1200, 20, 40
    arrays = _layer(time, rows, features, units)
    small_l2 = {"l1d": 32 * KIB, "l2": 112 * KIB, "l3": 0}
    for isa in _native.isas():
        _native.set_isa(isa)
        _native.set_cache_sizes({"l1d": 0, "l2": 0, "l3": 0})  # L2 not known: unblocked
        _native.set_threads(1)
        assert _native.row_block(features, units, rows) == rows
        expected = _run(arrays)
        _native.set_cache_sizes(small_l2)
        block = _native.row_block(features, units, rows)
        assert block < rows and rows % block, (isa, block)
        for threads in (1, 2, 3):
            _native.set_threads(threads)
            for got, want in zip(_run(arrays), expected, strict=True):
                np.testing.assert_array_equal(got, want, err_msg=f"{isa}, {threads} threads")
        x, kernel, recurrent, bias, h0, c0, valid = arrays
        final, outputs = lstm_reference(
            [(kernel, recurrent, bias)],
            np.moveaxis(x, 0, 1)[None],
            [(h0[None], c0[None])],
            mask=valid.T[None],
        )
        steps = valid.T  # [rows, time]: the reference outputs zeros elsewhere
        hs = np.moveaxis(expected[0], 0, 1)
        np.testing.assert_allclose(hs[steps], outputs[0][steps], rtol=0, atol=5e-6, err_msg=isa)
        np.testing.assert_allclose(expected[1], final[0][1][0], rtol=0, atol=5e-6, err_msg=isa)


def _sysfs_caches():
    """cpu0's data and unified caches as Linux describes them, or None."""
    root = pathlib.Path("/sys/devices/system/cpu/cpu0/cache")
    if not root.is_dir():
        return None
    sizes = {}
    for index in sorted(root.glob("index*")):
        if (index / "type").read_text().strip() not in ("Data", "Unified"):
            continue
        text = (index / "size").read_text().strip()
        scale = {"K": KIB, "M": KIB * KIB}.get(text[-1], 1)
        level = {"1": "l1d", "2": "l2", "3": "l3"}[(index / "level").read_text().strip()]
        sizes[level] = int(text.rstrip("KM")) * scale
    return sizes or None


def test_the_cache_sizes_are_those_the_cpu_reports(settings):
    details = _native.info()
    sysfs = _sysfs_caches()
    if sysfs is None:
        pytest.skip("no /sys/devices/system/cpu/cpu0/cache to compare with")
    assert details["caches_detected"] == {**{"l1d": 0, "l2": 0, "l3": 0}, **sysfs}
    assert details["caches"] == details["caches_detected"]


def _info_in_a_process(**env):
    return subprocess.run(
        [sys.executable, "-m", "banded_rnn", "info"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_forced_cache_sizes_are_planned_with_and_printed():
    done = _info_in_a_process(BANDED_RNN_CACHES="l1d=32K,l2=512K", BANDED_RNN_ISA="avx2")
    if "avx2" not in _native.isas():
        pytest.skip("this CPU cannot run avx2")
    assert done.returncode == 0, done.stderr
    assert "caches planned with: L1d 32 KiB, L2 512 KiB" in done.stdout, done.stdout
    assert "set; the CPU reports" in done.stdout or _native.info()["caches_detected"]["l2"] == (
        512 * KIB
    )


@pytest.mark.parametrize("value", ["l2=12X", "l4=1M", "512K"])
def test_a_bad_cache_setting_is_named(value):
    done = _info_in_a_process(BANDED_RNN_CACHES=value)
    assert done.returncode != 0
    assert "BANDED_RNN_CACHES: expected level=size items" in done.stderr, done.stderr
