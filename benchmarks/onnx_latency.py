"""Per-frame latency of the ONNX export in ONNX Runtime, beside ours and torch.

    python -m benchmarks.onnx_latency [--repeats 20] [--out benchmarks/results/onnx-latency.md]

For ``seed-stream`` and ``subband-stream`` (benchmarks/_configs.py), one
frame per call with the state carried, in one process:

* ours: ``Stream(max_chunk=1)``, a NumPy frame in, NumPy outputs out;
* ONNX: ``export_onnx`` of the same model and weights, run by
  ``onnxruntime.InferenceSession`` with ``intra_op_num_threads=2``, the state
  fed back from each call's outputs;
* torch: ``torch.nn.LSTM`` with the bands folded into the batch, 2 threads,
  under ``torch.inference_mode``.

Before anything is timed, each streams the same frames from a zero state and
its outputs must agree with ours (max abs diff <= 1e-5). Then each timed run
streams ``frames`` frames (the configuration's), the three round-robin, for
``--repeats`` rounds; the table gives the median per frame.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import pathlib
import tempfile
import time
from collections.abc import Callable

import numpy as np

from banded_rnn import BandedLSTM, Stream, export_onnx

from ._configs import CONFIGS, Config
from ._report import machine, write_report
from ._weights import Weights, load_torch, random_data, random_weights, to_ours

CONFIG_NAMES = ("seed-stream", "subband-stream")
THREADS = 2
TOLERANCE = 1e-5
PARITY_FRAMES = 20
OUT = pathlib.Path(__file__).parent / "results" / "onnx-latency.md"

Streamer = Callable[[list[np.ndarray]], np.ndarray]
"""Streams frames ``[batch, bands, 1, features]`` one per call, the state
carried from the previous call; returns the outputs joined along time."""


def ours(config: Config, weights: Weights) -> tuple[Streamer, Callable[[], None]]:
    """``Stream`` over ``BandedLSTM``; and a reset to a zero state."""
    model = BandedLSTM(config.units, config.layers)
    stream = Stream(model, to_ours(weights), config.batch, config.bands, max_chunk=1)
    stream.warmup()

    def run(frames):
        return np.concatenate([stream(frame) for frame in frames], axis=2)

    return run, stream.reset


def onnx(
    config: Config, weights: Weights, directory: pathlib.Path
) -> tuple[Streamer, Callable[[], None]]:
    """The exported model in ONNX Runtime; the state is a dict of arrays kept here."""
    import onnxruntime

    model = BandedLSTM(config.units, config.layers)
    path = directory / f"{config.name}.onnx"
    export_onnx(model, to_ours(weights), path, num_bands=config.bands)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()[1:]]
    shape = (config.batch, config.bands, config.units)
    state = {}

    def reset():
        state.update({name: np.zeros(shape, np.float32) for name in names})

    def run(frames):
        outputs = []
        for frame in frames:
            y, *final = session.run(None, {"chunk": frame, **state})
            state.update(zip(names, final, strict=True))
            outputs.append(y)
        return np.concatenate(outputs, axis=2)

    reset()
    return run, reset


def torch(config: Config, weights: Weights) -> tuple[Streamer, Callable[[], None]]:
    """``torch.nn.LSTM``, the bands folded into the batch."""
    import torch

    torch.set_num_threads(THREADS)
    lstm = torch.nn.LSTM(config.features, config.units, num_layers=config.layers, batch_first=True)
    load_torch(lstm, weights)
    rows = config.rows
    zeros = (torch.zeros(config.layers, rows, config.units),) * 2
    state = [zeros]

    def reset():
        state[0] = zeros

    def run(frames):
        outputs = []
        with torch.inference_mode():
            for frame in frames:
                x = torch.from_numpy(frame).reshape(rows, 1, config.features)
                y, state[0] = lstm(x, state[0])
                outputs.append(y.numpy().reshape(config.batch, config.bands, 1, config.units))
        return np.concatenate(outputs, axis=2)

    return run, reset


def measure(config: Config, repeats: int, directory: pathlib.Path) -> dict[str, dict]:
    """Each implementation's max abs difference from ours and median seconds per frame."""
    weights = random_weights(config)
    inputs, _ = random_data(config)
    frames = [np.ascontiguousarray(inputs[:, :, t : t + 1]) for t in range(config.frames)]
    impls = {
        "ours": ours(config, weights),
        "onnx": onnx(config, weights, directory),
        "torch": torch(config, weights),
    }
    parity = frames[:PARITY_FRAMES]
    expected = impls["ours"][0](parity)
    results = {}
    for name, (run, reset) in impls.items():
        reset()
        diff = float(np.abs(run(parity) - expected).max()) if name != "ours" else 0.0
        if diff > TOLERANCE:
            raise AssertionError(
                f"{config.name}: {name} differs from ours by {diff:.2e} > {TOLERANCE}; not timed"
            )
        reset()
        run(frames[:2])  # warm
        results[name] = {"diff": diff, "times": []}
    for _ in range(repeats):
        for name, (run, _) in impls.items():
            start = time.perf_counter()
            run(frames)
            results[name]["times"].append((time.perf_counter() - start) / len(frames))
    for result in results.values():
        result["median"] = float(np.median(result["times"]))
    return results


def _seconds(value: float) -> str:
    return f"{value * 1e3:.2f} ms" if value >= 1e-3 else f"{value * 1e6:.1f} µs"


def report(measured: dict[str, dict[str, dict]], repeats: int, load: tuple[str, str]) -> str:
    info = machine()
    versions = ", ".join(
        f"{package} {importlib.metadata.version(package)}"
        for package in ("jax", "onnx", "onnxruntime", "torch", "numpy")
    )
    lines = [
        "# Per-frame latency: ours, the ONNX export in ONNX Runtime, torch",
        "",
        "`python -m benchmarks.onnx_latency`: one process, one frame per call with the state "
        f"carried, the median over {repeats} interleaved runs of each configuration's frames. "
        f"ours: `Stream(max_chunk=1)`, NumPy in and out (the native kernel); ONNX: "
        f"`export_onnx` run by ONNX Runtime with `intra_op_num_threads={THREADS}`; torch: "
        f"`torch.nn.LSTM`, bands folded into the batch, {THREADS} threads. Before timing, each "
        f"streamed {PARITY_FRAMES} frames from zeros and was checked against ours "
        f"(max abs diff <= {TOLERANCE:g}).",
        "",
        f"Machine: {info['cpu']}; {info['date']}.",
        f"Load average (1, 5, 15 min) before: {load[0]}; after: {load[1]}.",
        f"Versions: {versions}.",
        "",
        "| config | ours (`Stream`) | ONNX Runtime | torch | ONNX vs ours, max abs diff "
        "| torch vs ours, max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for name, results in measured.items():
        cells = [_seconds(results[impl]["median"]) for impl in ("ours", "onnx", "torch")]
        diffs = [f"{results[impl]['diff']:.1e}" for impl in ("onnx", "torch")]
        lines.append(f"| `{name}` | " + " | ".join(cells + diffs) + " |")
    return "\n".join(lines) + "\n"


def _load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.onnx_latency")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    args = parser.parse_args(argv)
    before = _load()
    with tempfile.TemporaryDirectory() as directory:
        measured = {
            name: measure(CONFIGS[name], args.repeats, pathlib.Path(directory))
            for name in CONFIG_NAMES
        }
    text = report(measured, args.repeats, (before, _load()))
    write_report(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
