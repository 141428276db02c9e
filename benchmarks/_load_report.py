"""The report of ``benchmarks.serving_load``: a Markdown table and a plot of
latency against the number of clients."""

from __future__ import annotations

import pathlib

from banded_rnn._internal import write_atomically

from ._configs import FRAME_SECONDS

LABELS = {
    "batcher": "SequenceBatcher (in process)",
    "batcher-1": "SequenceBatcher, one frame per tick (batch_sizes=[1])",
    "websocket": "SequenceBatcher behind the WebSocket server",
    "stream": "one Stream per client",
    "torch": "one torch.nn.LSTM loop per client (2 threads)",
}


def held(points: list[dict], mode: str) -> int:
    """The most clients ``mode`` held in real time (p99 under a frame); 0 if none."""
    return max((p["clients"] for p in points if p["mode"] == mode and p["held"]), default=0)


def render(
    points: list[dict], header: dict, parity: dict[str, float], plot: str, costs: dict
) -> str:
    modes = list(dict.fromkeys(p["mode"] for p in points))
    lines = ["# Serving under load", ""]
    lines += [f"{key}: {value}" for key, value in header.items()]
    counts = sorted({n for _, n in costs})
    if counts:
        lines += ["", "One call with n frames ready, unloaded (median of 30): the batcher's tick "
                  "against n Stream calls in a row; per frame in brackets:", ""]  # fmt: skip
        lines += ["| n | batcher tick | n Stream calls |", "|---|---|---|"]
        for n in counts:
            cells = [
                f"{costs[mode, n] * 1e3:.3f} ms ({costs[mode, n] / n * 1e3:.3f})"
                if (mode, n) in costs else "-"
                for mode in ("batcher", "stream")
            ]  # fmt: skip
            lines.append(f"| {n} | {cells[0]} | {cells[1]} |")
    lines += ["", "Most clients held in real time (p99 latency under the 16 ms frame):", ""]
    lines += ["| mode | clients held |", "|---|---|"]
    lines += [f"| {LABELS[m]} | {held(points, m)} |" for m in modes]
    lines += ["", "Every point (latency from a frame's due time to its outputs):", ""]
    lines += [
        "| mode | clients | p50 | p99 | max | frames | real time |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p['mode']} | {p['clients']} | {p['p50'] * 1e3:.2f} ms | {p['p99'] * 1e3:.2f} ms "
            f"| {p['max'] * 1e3:.1f} ms | {p['frames']} | {'yes' if p['held'] else 'no'} |"
        )
    differences = ", ".join(f"{name} {value:.1e}" for name, value in parity.items())
    lines += ["", f"Outputs of one sequence's first frames, largest difference from the "
              f"first mode: {differences}.", "", f"Plot: `{plot}`.", ""]  # fmt: skip
    return "\n".join(lines)


def plot(points: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    for index, mode in enumerate(dict.fromkeys(p["mode"] for p in points)):
        mine = [p for p in points if p["mode"] == mode]
        clients = [p["clients"] for p in mine]
        color = f"C{index}"
        axis.plot(clients, [p["p99"] * 1e3 for p in mine], "o-", color=color, label=LABELS[mode])
        axis.plot(clients, [p["p50"] * 1e3 for p in mine], ":", color=color)
    axis.axhline(FRAME_SECONDS * 1e3, color="gray", linewidth=1)
    axis.text(1, FRAME_SECONDS * 1e3 * 1.08, "16 ms: one frame", color="gray", fontsize=8)
    axis.set_yscale("log")
    axis.set_xlabel("clients, one frame every 16 ms each")
    axis.set_ylabel("latency, ms (p99 solid, p50 dotted)")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda file: figure.savefig(file, format="png"))
    plt.close(figure)
