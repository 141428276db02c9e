"""The benchmark harness on tiny shapes: parity is checked, disagreement is caught.

No timing is asserted: only that rows agreeing with ours are timed, that a
row whose weights differ is refused before timing, and that the report is written.
"""

from __future__ import annotations

import dataclasses
import mmap
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks import _baselines, _ours, run
from benchmarks._configs import CONFIGS, Config
from benchmarks._harness import OURS, OURS_SHARDED, Impl, Row, benchmark, time_interleaved
from benchmarks._weights import random_data, random_weights

from helpers import run_script

pytest.importorskip("torch")
pytest.importorskip("keras")

TINY = {  # name, batch, bands, time, features, units, layers, mode, frames
    "inference": Config("tiny", 2, 3, 5, 4, 6, 2, "inference"),
    "stream": Config("tiny-stream", 2, 2, 1, 3, 5, 2, "stream", frames=4),
    "train": Config("tiny-train", 2, 2, 4, 3, 5, 1, "train"),
}


@pytest.fixture(autouse=True)
def _allow_rank_promotion():
    # Keras's JAX backend broadcasts implicitly inside keras.layers.LSTM.
    with jax.numpy_rank_promotion("allow"):
        yield


def _impls(config: Config, ours_weights=None):
    """Ours and every baseline with the same weights, plus torch with perturbed
    weights as the row ``torch-perturbed``."""
    weights = random_weights(config, seed=3)
    inputs, targets = random_data(config, seed=4)
    impls = [_ours.build(config, ours_weights or weights, inputs, targets)]
    for build in _baselines.BUILDERS.values():
        impls.append(build(config, weights, inputs, targets))
    wrong = _baselines.build_torch(config, weights.perturbed(1e-2), inputs, targets)
    return [*impls, dataclasses.replace(wrong, name="torch-perturbed")]


@pytest.mark.parametrize("mode", sorted(TINY))
def test_rows_that_agree_are_timed_and_a_disagreeing_row_is_not(mode):
    config = TINY[mode]
    result = benchmark(config, _impls(config), repeats=2, warmup=1)
    assert [row.name for row in result.rows] == [OURS, "torch", "keras", "flax", "torch-perturbed"]
    for row in result.rows[:4]:
        assert row.error is None, row.error
        assert len(row.times) == 2 and all(t > 0 for t in row.times)
    for row in result.rows[1:]:
        assert row.parity is not None
    wrong = result.row("torch-perturbed")
    assert wrong.error.startswith("PARITY FAILED") and not wrong.times
    if mode == "stream":
        assert result.row(OURS).recompiles == 0


def test_ours_disagreeing_with_every_baseline_aborts_the_configuration():
    config = TINY["inference"]
    wrong = random_weights(config, seed=3).perturbed(1e-2)
    impls = _impls(config, ours_weights=wrong)[:-1]
    # Ours on several devices agrees with ours, but is no independent check of it.
    impls.insert(1, dataclasses.replace(impls[0], name=OURS_SHARDED))
    result = benchmark(config, impls, repeats=1, warmup=0)
    assert result.row(OURS).error.startswith("PARITY FAILED")
    assert not any(row.times for row in result.rows)


def _touch_fresh_memory(size: int = 1 << 24) -> None:
    # An anonymous mapping is fresh from the kernel: every page written faults once.
    with mmap.mmap(-1, size) as memory:
        np.frombuffer(memory, np.uint8)[:: mmap.PAGESIZE] = 1


def test_page_faults_are_counted_per_unit():
    pytest.importorskip("resource")  # counted on Unix only
    impls = [
        Impl("idle", outputs=dict, run=lambda: None, uses_jax=False),
        Impl("toucher", outputs=dict, run=_touch_fresh_memory, uses_jax=False),
        Impl("toucher-x4", outputs=dict, run=_touch_fresh_memory, per_run=4, uses_jax=False),
    ]
    rows = [Row(impl.name) for impl in impls]
    time_interleaved(impls, rows, repeats=3, warmup=1)
    idle, toucher, per_four = (row.median_faults for row in rows)
    # 16 MiB written page by page: 4096 faults with 4 KiB pages, at least 8 with 2 MiB ones.
    assert toucher >= 8 and idle < toucher
    assert per_four == pytest.approx(toucher / 4, rel=0.5)


def test_flops_follow_the_benchmark_definition():
    # 8 * units * (in + units) per row, step and layer; x3 for a training step.
    assert CONFIGS["seed"].flops() == 8 * 64 * (4 + 64) * 8 * 3 * 1000
    assert CONFIGS["subband-stream"].flops() == 257 * (8 * 384 * (32 + 384) + 8 * 384 * (384 + 384))
    assert CONFIGS["train"].flops() == 3 * 8 * 128 * (32 + 128) * 8 * 16 * 256


def test_main_writes_the_report(monkeypatch, tmp_path):
    seed = dataclasses.replace(TINY["inference"], name="seed")
    monkeypatch.setattr(run, "CONFIGS", {"seed": seed})
    monkeypatch.setattr(run, "SGEMM_SIZE", 64)
    out = tmp_path / "RESULTS.md"
    argv = ["--quick", "--repeats", "2", "--baselines", "torch", "flax", "--no-memory"]
    argv += ["--cpu-devices", "1"]  # no rows over several devices
    argv += ["--out", str(out)]
    assert run.main(argv) == 0
    report = out.read_text()
    for label in ("ours", "(a) torch", "(c) Flax", "(d) floor"):
        assert f"| `seed` | {label} |" in report
    assert "PARITY FAILED" not in report
    assert "| page faults |" in report


def test_cpu_devices_below_one_are_refused(capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--cpu-devices", "0"])
    assert "--cpu-devices: expected at least 1; received 0" in capsys.readouterr().err


def test_compiled_memory_drops_with_remat():
    config = TINY["train"]
    weights = random_weights(config)
    whole = _ours.train_memory(config, weights, 200, None)
    remat = _ours.train_memory(config, weights, 200, 10)
    assert remat["temp"] < whole["temp"]
    assert np.all([v >= 0 for v in whole.values()])


def test_sharded_rows_run_on_two_cpu_devices_and_are_checked():
    """In a fresh process with two CPU devices (the setting must precede JAX's
    start), ours with the batch split over them agrees with ours on one."""
    done = run_script(Path(__file__).parent / "scripts" / "sharded_rows.py")
    assert done.stdout.splitlines()[0].startswith("seed ")
    assert done.stdout.splitlines()[1].startswith("train ")
