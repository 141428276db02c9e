"""Many live streams at once: frame latency against the number of clients.

``python -m benchmarks.serving_load`` runs N simulated clients, each sending
one ``subband-stream`` frame (257 bands, 32 features; 2 layers of 384 units)
every 16 ms at its own phase for a fixed duration, on 127.0.0.1 only, and
reports the p50 and p99 latency from a frame's due time to its outputs, for:

* ``batcher``: one ``banded_rnn.serving.SequenceBatcher``, in process;
* ``batcher-1``: the same with ticks of one frame (``batch_sizes=[1]``);
* ``websocket``: the same batcher behind ``banded_rnn.serving.Server``, each
  client a ``Client`` connection (in this process: its threads share the CPU);
* ``stream``: one ``banded_rnn.Stream`` per client, each client a thread;
* ``torch``: one ``torch.nn.LSTM`` loop per client (each its own ``(h, c)``),
  each client a thread, torch limited to 2 threads in all.

``--config seed-stream`` runs the small model (3 bands of 64 units), where a
frame's arithmetic is a few microseconds and each call's dispatch is most of
its cost; ``subband-stream`` (the default) is compute-bound: one frame is
already 257 rows of 1,184 x 1,536 multiply-adds per layer.

A mode's sweep stops after two points in a row miss real time (p99 above the
frame's 16 ms). The report (``benchmarks/results/serving-load-<config>.md``)
names the CPU and the load average when the run started and ended; the plot
goes to ``docs/_static/serving-load-<config>.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import pathlib
import time

import numpy as np

from . import _load_report
from ._configs import CONFIGS, FRAME_SECONDS, Config
from ._load_clients import (
    WAIT_S,
    Schedule,
    blocking_clients,
    submitting_clients,
    websocket_clients,
)
from ._report import cpu_identity, machine, write_report
from ._weights import load_torch, random_data, random_weights, to_ours

MODES = ("batcher", "batcher-1", "websocket", "stream", "torch")
DEFAULT_CLIENTS = {"subband-stream": "1,2,3,4,5,6,8", "seed-stream": "1,8,16,32,64,96,128"}
TIMED_TICKS = 30
"""Calls timed for each point of ``tick_costs``."""
WARM_FRAMES = 10
"""Each client's first frames, left out of the percentiles (the warm start)."""
ROOT = pathlib.Path(__file__).resolve().parent.parent


class Mode:
    """One way of serving, built once for the most clients and run for any
    fewer. Frames are one sequence's ``[bands, 1, features]``."""

    def __init__(self, name: str, config: Config, clients: int) -> None:
        from banded_rnn import BandedLSTM, Stream
        from banded_rnn.serving import SequenceBatcher, Server

        self.name, self._close = name, []
        weights = random_weights(config)
        model = BandedLSTM(config.units, num_layers=config.layers)
        if name in ("batcher", "batcher-1", "websocket"):
            self.batcher = SequenceBatcher(
                model,
                to_ours(weights),
                clients,
                config.bands,
                max_idle=None,
                batch_sizes=[1] if name == "batcher-1" else None,
            )
            self.batcher.warmup()
            self._close.append(self.batcher.close)
            if name == "websocket":
                self.server = Server(self.batcher).start()
                self._close.insert(0, self.server.close)
        elif name == "stream":
            self.streams = [
                Stream(model, to_ours(weights), 1, config.bands, max_chunk=1)
                for _ in range(clients)
            ]
            for stream in self.streams:
                stream.warmup()
        else:
            import torch

            torch.set_num_threads(2)
            self.lstm = torch.nn.LSTM(
                config.features, config.units, num_layers=config.layers, batch_first=True
            )
            load_torch(self.lstm, weights)
            self._zeros = lambda: (torch.zeros(config.layers, config.bands, config.units),) * 2

    def run(self, frames: np.ndarray, schedule: Schedule, kept: list | None = None) -> list:
        """Latencies per client of ``schedule``; client 0's outputs appended to ``kept``."""
        clients = len(schedule.phases)
        if self.name == "websocket":
            return websocket_clients(self.server.url, frames, schedule, kept)
        if self.name in ("batcher", "batcher-1"):
            names = [f"client{c}" for c in range(clients)]
            for name in names:
                self.batcher.start(name)

            def submit(c: int, frame: np.ndarray):
                future = self.batcher.submit(names[c], frame)
                if kept is not None and c == 0:
                    future.add_done_callback(lambda f: kept.append(f.result()))
                return future

            try:
                return submitting_clients(submit, frames, schedule)
            finally:
                for name in names:
                    self.batcher.end(name)
        return blocking_clients([self._call(c, kept) for c in range(clients)], frames, schedule)

    def _call(self, c: int, kept: list | None):
        """Client ``c``'s blocking call: its own Stream, or its own torch state."""
        keep = kept.append if kept is not None and c == 0 else lambda outputs: None
        if self.name == "stream":
            stream = self.streams[c]
            stream.reset()
            return lambda frame: keep(stream(frame[None])[0])
        import torch

        state = [self._zeros()]

        def call(frame: np.ndarray) -> None:
            with torch.inference_mode():
                outputs, state[0] = self.lstm(torch.from_numpy(frame), state[0])
            keep(outputs.numpy())

        return call

    def close(self) -> None:
        for close in self._close:
            close()


def percentiles(latencies: list[list[float]], skip: int) -> tuple[float, float, float, int]:
    """p50, p99 and the maximum over every client's frames after its first
    ``skip`` (the warm start), and how many frames that is."""
    values = np.concatenate([np.asarray(c[skip:]) for c in latencies if len(c) > skip])
    return (*np.percentile(values, [50, 99]), values.max(), len(values))  # type: ignore[return-value]


def cpu_line() -> str:
    """``AMD EPYC (AuthenticAMD family 26 model 2), 2 cores``, from /proc/cpuinfo."""
    identity = cpu_identity()
    name = identity["model name"]
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next(line for line in cpuinfo if line.startswith("model name"))
            name = name.partition(":")[2].strip()
    except (OSError, StopIteration):
        pass
    family = f" ({identity.get('vendor_id', '')} family {identity.get('cpu family', '?')} model "
    return f"{name}{family}{identity.get('model', '?')}), {os.cpu_count()} cores"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def sweep(mode: Mode, frames: np.ndarray, counts: list[int], duration: float) -> list[dict]:
    """Latency percentiles for each client count, until two in a row miss real time."""
    points, missed = [], 0
    for clients in counts:
        latencies = mode.run(frames, Schedule(clients, duration, FRAME_SECONDS, seed=clients))
        p50, p99, worst, count = percentiles(latencies, skip=WARM_FRAMES)
        held = bool(p99 < FRAME_SECONDS)
        points.append(dict(mode=mode.name, clients=clients, p50=p50, p99=p99, max=worst,
                           frames=count, held=held))  # fmt: skip
        print(f"{mode.name:9s} {clients:2d} clients: p50 {p50 * 1e3:7.2f} ms, p99 "
              f"{p99 * 1e3:7.2f} ms: {'real time' if held else 'missed'}", flush=True)  # fmt: skip
        missed = 0 if held else missed + 1
        if missed == 2:
            break
    return points


def parity(modes: dict[str, Mode], frames: np.ndarray) -> dict[str, float]:
    """Each mode's largest difference from the first on one sequence's frames."""
    outputs = {}
    for name, mode in modes.items():
        kept: list = []
        mode.run(frames, Schedule(1, len(frames) * FRAME_SECONDS, FRAME_SECONDS, 0), kept)
        outputs[name] = np.stack(kept) if kept else None
    base = next(out for out in outputs.values() if out is not None)
    return {n: float(np.abs(out - base).max()) for n, out in outputs.items() if out is not None}


def tick_costs(modes: dict[str, Mode], frames: np.ndarray, counts: list[int]) -> dict:
    """The median time of one call with ``n`` frames ready, for each ``n`` of
    ``counts``: the batcher's tick (every sequence's frame submitted at once,
    timed to the last output) and ``n`` Stream calls one after another. Where
    a tick of ``n`` costs ``n`` single calls, batching gains nothing."""
    costs: dict = {}
    batcher, stream = modes.get("batcher"), modes.get("stream")
    for n in counts:
        if batcher is not None:
            names = [f"cost{c}" for c in range(n)]
            for name in names:
                batcher.batcher.start(name)
            times = []
            for k in range(TIMED_TICKS):
                start = time.perf_counter()
                futures = [batcher.batcher.submit(name, frames[k % len(frames)]) for name in names]
                for future in futures:
                    future.result(WAIT_S)
                times.append(time.perf_counter() - start)
            for name in names:
                batcher.batcher.end(name)
            costs["batcher", n] = float(np.median(times))
        if stream is not None:
            times = []
            for k in range(TIMED_TICKS):
                start = time.perf_counter()
                for c in range(n):
                    stream.streams[c](frames[k % len(frames)][None])
                times.append(time.perf_counter() - start)
            costs["stream", n] = float(np.median(times))
    return costs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving_load", description=__doc__)
    parser.add_argument("--config", default="subband-stream", choices=sorted(CONFIGS))
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, of " + str(MODES)
    )
    parser.add_argument(
        "--clients", help="client counts, ascending (default: by --config, DEFAULT_CLIENTS)"
    )
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per point")
    parser.add_argument("--output", help="default: benchmarks/results/serving-load-<config>.md")
    parser.add_argument("--plot", help="default: docs/_static/serving-load-<config>.png")
    args = parser.parse_args(argv)
    args.clients = args.clients or DEFAULT_CLIENTS.get(args.config, "1,2,4,8")
    args.output = args.output or f"benchmarks/results/serving-load-{args.config}.md"
    args.plot = args.plot or f"docs/_static/serving-load-{args.config}.png"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = CONFIGS[args.config]
    counts = [int(n) for n in args.clients.split(",")]
    names = [m for m in args.modes.split(",") if m]
    unknown = set(names) - set(MODES)
    if unknown:
        raise SystemExit(f"--modes: expected some of {MODES}; received {sorted(unknown)}")
    info = machine()
    began, load_at_start = time.strftime("%Y-%m-%d %H:%M %Z"), load_average()
    frames = random_data(dataclasses.replace(config, frames=16), seed=1)[0]
    frames = np.ascontiguousarray(np.moveaxis(frames[0], 1, 0)[:, :, None])  # [16, bands, 1, f]
    modes = {name: Mode(name, config, max(counts)) for name in names}
    try:
        differences = parity(modes, frames[:3])
        costs = tick_costs(modes, frames, [n for n in counts if n <= 8])
        # As `python -m banded_rnn serve` does after its warmup: what is loaded
        # stays out of full collections, which stop every thread (~0.1 s here).
        gc.collect()
        gc.freeze()
        points = []
        for mode in modes.values():
            points += sweep(mode, frames, counts, args.duration)
    finally:
        for mode in modes.values():
            mode.close()
    header = {
        "Run": f"{began}, {args.duration:g} s per point, `{config.name}` frames ({config.bands} "
        f"bands, {config.features} features, {config.layers} layers of {config.units} units), "
        f"one per client every {FRAME_SECONDS * 1e3:g} ms at a random phase, over 127.0.0.1",
        "CPU": f"{cpu_line()}; native kernel {info['kernel']}",
        "Load average (1, 5, 15 min)": f"{load_at_start} at the start, {load_average()} at the end",
        "Versions": f"python {info['python']}, jax {info['jax']}, torch {info['torch']}",
    }
    plot_path = ROOT / args.plot
    title = f"{config.name}: {cpu_line()}, load {load_at_start.split(',')[0]} at the start"
    _load_report.plot(points, plot_path, title)
    report = _load_report.render(points, header, differences, args.plot, costs)
    write_report(ROOT / args.output, report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
