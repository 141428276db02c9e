"""The serving load benchmark on the small streaming configuration, briefly:
every mode runs, agrees with the others and is reported. No timing is asserted."""

from __future__ import annotations

import pytest

from benchmarks import serving_load

pytest.importorskip("torch")
pytest.importorskip("websockets")


def test_every_mode_runs_agrees_and_is_reported(tmp_path):
    report, plot = tmp_path / "serving-load.md", tmp_path / "serving-load.png"
    serving_load.main(
        ["--config", "seed-stream", "--duration", "0.3", "--clients", "1,2"]
        + ["--output", str(report), "--plot", str(plot)]
    )
    text = report.read_text()
    for mode in serving_load.MODES:
        assert f"| {mode} | 1 |" in text and f"| {serving_load._load_report.LABELS[mode]} |" in text
    assert "Load average (1, 5, 15 min): " in text and "CPU: " in text
    differences = text.split("largest difference from the first mode: ")[1].split(".\n")[0]
    assert all(float(d.split()[1]) < 1e-5 for d in differences.split(", ")), differences
    assert plot.stat().st_size > 1000
