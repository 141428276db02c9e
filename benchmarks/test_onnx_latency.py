"""``python -m benchmarks.onnx_latency`` checks parity before timing and writes its table."""

import dataclasses

import pytest

from benchmarks import onnx_latency
from benchmarks._configs import CONFIGS

pytest.importorskip("onnxruntime")


def test_main_checks_parity_and_writes_the_table(monkeypatch, tmp_path):
    tiny = dataclasses.replace(CONFIGS["seed-stream"], units=8, frames=3)
    monkeypatch.setattr(onnx_latency, "CONFIGS", {"seed-stream": tiny})
    monkeypatch.setattr(onnx_latency, "CONFIG_NAMES", ("seed-stream",))
    monkeypatch.setattr(onnx_latency, "PARITY_FRAMES", 3)
    out = tmp_path / "onnx-latency.md"
    assert onnx_latency.main(["--repeats", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Machine: " in text and "Load average" in text
    row = next(line for line in text.splitlines() if line.startswith("| `seed-stream` |"))
    assert len(row.split("|")) == 8  # name, three medians, two differences


def test_an_implementation_that_disagrees_is_not_timed(monkeypatch, tmp_path):
    tiny = dataclasses.replace(CONFIGS["seed-stream"], units=8, frames=3)
    monkeypatch.setattr(onnx_latency, "PARITY_FRAMES", 3)
    real = onnx_latency.torch

    def off_by_one(config, weights):
        run, reset = real(config, weights)
        return (lambda frames: run(frames) + 1.0), reset

    monkeypatch.setattr(onnx_latency, "torch", off_by_one)
    with pytest.raises(AssertionError, match="torch differs from ours"):
        onnx_latency.measure(tiny, 2, tmp_path)
