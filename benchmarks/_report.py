"""The markdown report: machine, versions, the summary, the detail and memory tables."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re

from ._configs import MEMORY_TIME, Config
from ._harness import OURS, OURS_SCAN, OURS_SHARDED, OURS_STEP, Result, Row

BASELINES = ("torch", "keras", "flax")
LABELS = {
    OURS: "ours",
    OURS_SCAN: "ours, XLA scan",
    OURS_SHARDED: "ours, batch over the CPU devices",
    OURS_STEP: "ours, stream_step",
    "torch": "(a) torch",
    "keras": "(b) Keras-JAX",
    "flax": "(c) Flax",
    "floor": "(d) floor",
}
TORCH_SPEEDUP = {
    "seed": 2.0,
    "train": 1.5,
    "subband-offline": 1.15,
    "subband-stream": 1.25,
    "seed-stream": 3.0,
}
"""Speed-up over torch each configuration must reach on every CPU (issue 30's targets)."""
FLOOR_FRACTION = {"subband-offline": 0.6, "subband-stream": 0.6}
"""Fraction of the floor (d) a configuration must reach."""
STREAM_BEFORE_KERNEL = {"seed-stream": 60.5e-6}
"""Per-frame time before the native kernel (full run of 2026-12-02 04:02 UTC):
this configuration must be no slower."""
SETTINGS = ("XLA_FLAGS", "GLIBC_TUNABLES", "BANDED_RNN_ISA", "BANDED_RNN_CACHES")
"""Environment variables that change what is measured, shown when set: XLA's
options, glibc malloc's (which decide how much memory each call takes
fresh from the kernel; benchmarks/NOTES.md, entry 11), and the kernel's
instruction set and cache sizes when forced."""
_MACHINE_KEYS = ("date", "cpu", "slug", "kernel", "caches", "devices")


def cpu_identity() -> dict[str, str]:
    """The CPU's model name, vendor, family and model (``/proc/cpuinfo``; a
    virtual machine may show only a generic name, and the family and model
    then tell the generation: AMD family 25 is Zen 3 or 4, 26 Zen 5)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "vendor_id", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip():
                    break  # the first processor's block is enough
    except OSError:
        pass
    fields.setdefault("model name", platform.processor() or "unknown")
    return {"model name": fields.pop("model name"), **fields}


def cpu_slug(identity: dict[str, str], isa: str) -> str:
    """A file name for this CPU and instruction-set path, e.g.
    ``amd-epyc-family26-model2-avx512``: results are kept per CPU and path."""
    name = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*", "", identity["model name"].lower())
    parts = [name]
    if "cpu family" in identity:
        parts.append(f"family{identity['cpu family']}-model{identity.get('model', '')}")
    parts.append(isa)
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts)).strip("-")


def kernel_path() -> dict[str, str]:
    """The native kernel's instruction set, register tile and the cache sizes
    its blocking plans with (``python -m banded_rnn info``)."""
    from banded_rnn import kernel_info

    details = kernel_info()
    if details["kernel"] != "built":
        return {"kernel": f"not built ({details['error']})", "isa": "scan"}
    caches = ", ".join(f"{key} {value >> 10} KiB" for key, value in details["caches"].items())
    forced = details["caches"] != details["caches_detected"]
    # A run with cache sizes set (BANDED_RNN_CACHES) simulates another CPU's
    # blocking: kept in a file of its own, named for the sizes.
    sizes = "-".join(f"{key}-{value >> 10}k" for key, value in details["caches"].items())
    return {
        "kernel": f"{details['isa']}, {details['tile']} tile",
        "isa": details["isa"] + (f"-caches-{sizes}" if forced else ""),
        "caches": caches + (" (set, not the CPU's)" if forced else ""),
    }


def machine() -> dict[str, str]:
    """CPU model, core count, the kernel's path, Python and library versions, and the date."""
    identity = cpu_identity()
    cpu = identity["model name"]
    if "cpu family" in identity:
        cpu += f" ({identity.get('vendor_id', '')} family {identity['cpu family']} model "
        cpu += f"{identity.get('model', '')})"
    path = kernel_path()
    info = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "slug": cpu_slug(identity, path["isa"]),
        "kernel": path["kernel"],
        "python": platform.python_version(),
    }
    if "caches" in path:
        info["caches"] = path["caches"]
    for package in ("jax", "jaxlib", "flax", "keras", "optax", "torch", "numpy"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = "not installed"
    for name in SETTINGS:
        if os.environ.get(name):
            info[name] = os.environ[name]
    return info


def seconds(value: float | None) -> str:
    """``1.23 ms``-style, three significant digits."""
    if value is None:
        return "–"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def _per(config: Config) -> str:
    return {"inference": "call", "stream": "frame", "train": "step"}[config.mode]


def _count(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def floor_seconds(config: Config, rate: float) -> float:
    """The floor (d): the configuration's FLOPs at the machine's SGEMM rate."""
    return config.flops() / rate


def speedups(result: Result, ours_name: str = OURS) -> dict[str, float | None]:
    """``baseline median / ours median`` for every baseline that was timed."""
    ours = result.row(ours_name)
    out = {}
    for name in BASELINES:
        row = result.row(name)
        ok = ours is not None and ours.ok and row is not None and row.ok
        out[name] = row.median / ours.median if ok else None
    return out


def targets(result: Result, rate: float, ours_name: str = OURS) -> list[str]:
    """The goals this configuration misses (empty: all met): faster than every
    baseline; :data:`TORCH_SPEEDUP` times torch and :data:`FLOOR_FRACTION` of
    the floor where set; no slower than :data:`STREAM_BEFORE_KERNEL`; no
    recompiles when streaming. The configurations are those of
    ``benchmarks/_configs.py``."""
    config, ours, rate = result.config, result.row(ours_name), result.rate or rate
    if ours is None or not ours.ok:
        return ["not measured"]
    misses = []
    ratios = speedups(result, ours_name)
    for name, ratio in ratios.items():
        if ratio is not None and ratio <= 1.0:
            misses.append(f"slower than {name}")
    torch, speedup = ratios.get("torch"), TORCH_SPEEDUP.get(config.name)
    if speedup is not None and torch is not None and torch < speedup:
        misses.append(f"< {speedup}x torch")
    fraction = FLOOR_FRACTION.get(config.name)
    if fraction is not None and floor_seconds(config, rate) / ours.median < fraction:
        misses.append(f"< {fraction} of floor")
    before = STREAM_BEFORE_KERNEL.get(config.name)
    if before is not None and ours.median > before:
        misses.append(f"slower than before the kernel ({seconds(before)})")
    if config.mode == "stream" and ours.recompiles:
        misses.append(f"{ours.recompiles} recompiles")
    return misses


def _median_cell(config: Config, row: Row) -> str:
    cell = f"{seconds(row.median)} / {_per(config)}"
    if config.realtime_frame:
        cell += f" (RTF {row.median / config.realtime_frame:.2f})"
    return cell


def summary_table(results: list[Result], rate: float) -> list[str]:
    lines = [
        "| config | ours (median) | vs (a) torch | vs (b) Keras-JAX | vs (c) Flax "
        "| floor / ours | goals missed |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for name in (OURS, OURS_STEP, OURS_SCAN, OURS_SHARDED):
            ours = result.row(name)
            if name != OURS and ours is None:
                continue
            lines.append(_summary_line(result, name, rate))
    return lines


def _summary_line(result: Result, ours_name: str, rate: float) -> str:
    ours = result.row(ours_name)
    ratios = speedups(result, ours_name)
    if ours is None or not ours.ok:
        median, floor = (ours.error if ours else "not run"), "–"
    else:
        median = _median_cell(result.config, ours)
        floor = f"{floor_seconds(result.config, result.rate or rate) / ours.median:.2f}"
    misses = targets(result, rate, ours_name)
    config = f"`{result.config.name}`"
    if ours_name != OURS:
        config += ", " + LABELS[ours_name].removeprefix("ours, ")
    return (
        f"| {config} | {median} | {_ratio(ratios['torch'])} "
        f"| {_ratio(ratios['keras'])} | {_ratio(ratios['flax'])} | {floor} "
        f"| {'; '.join(misses) if misses else 'none'} |"
    )


def detail_table(results: list[Result], default_rate: float) -> list[str]:
    lines = [
        "| config | implementation | median | p90 | page faults | this / ours | GFLOP/s "
        "| of floor | compile | compiles after warm-up | diff vs ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        config, rate = result.config, result.rate or default_rate
        flops = config.flops()
        ours = result.row(OURS)
        for row in result.rows:
            label = LABELS.get(row.name, row.name)
            if not row.ok:
                error = (row.error or "not timed").replace("|", "/")
                error = error if len(error) < 160 else error[:157] + "..."
                lines.append(
                    f"| `{config.name}` | {label} | **{error}** | – | – | – | – | – | – | – | – |"
                )
                continue
            ratio = row.median / ours.median if ours is not None and ours.ok else None
            of_floor = floor_seconds(config, rate) / row.median
            parity = row.parity or "–"
            lines.append(
                f"| `{config.name}` | {label} | {_median_cell(config, row)} | {seconds(row.p90)} "
                f"| {_count(row.median_faults)} | {_ratio(ratio)} | {flops / row.median / 1e9:.1f} "
                f"| {of_floor:.2f} | {seconds(row.compile_seconds)} "
                f"| {'–' if row.recompiles is None else row.recompiles} | {parity} |"
            )
        floor = floor_seconds(config, rate)
        ratio = floor / ours.median if ours is not None and ours.ok else None
        lines.append(
            f"| `{config.name}` | {LABELS['floor']} | {seconds(floor)} / {_per(config)} | – | – "
            f"| {_ratio(ratio)} | {rate / 1e9:.1f} | 1.00 | – | – | – |"
        )
    return lines


def memory_table(memory: dict[str, dict[str, int]]) -> list[str]:
    mib = 2.0**20
    lines = [
        f"| `train` step at {MEMORY_TIME:,} time steps | temporaries | arguments | outputs "
        "| of which aliased (donated) | peak (temporaries + arguments + outputs) |",
        "|---|---|---|---|---|---|",
    ]
    for label, sizes in memory.items():
        if "error" in sizes:
            lines.append(f"| {label} | **{sizes['error']}** | – | – | – | – |")
            continue
        lines.append(
            f"| {label} | {sizes['temp'] / mib:,.1f} MiB | {sizes['argument'] / mib:,.1f} MiB "
            f"| {sizes['output'] / mib:,.1f} MiB | {sizes['alias'] / mib:,.1f} MiB "
            f"| {sizes['peak'] / mib:,.1f} MiB |"
        )
    return lines


def render(
    results: list[Result],
    rates: dict[str, float],
    memory: dict[str, dict[str, int]],
    *,
    quick: bool,
    repeats: int | str,
    elapsed: float,
    info: dict[str, str],
    sgemm_size: int,
    blocking: dict[str, str] | None = None,
) -> str:
    """The whole report as markdown."""
    rate = max(rates.values())
    mode = "`--quick`" if quick else "full"
    lines = [
        "# Benchmark results",
        "",
        f"Run: {mode}, {repeats} interleaved repeats per row, {elapsed:.0f} s in all, "
        f"{info['date']}.",
        f"Machine: {info['cpu']}"
        + (f"; JAX runs {info['devices']}." if "devices" in info else "."),
        f"Native kernel: {info['kernel']}"
        + (f"; caches planned with: {info['caches']}." if "caches" in info else "."),
        "Versions: "
        + ", ".join(f"{k} {v}" for k, v in info.items() if k not in (*_MACHINE_KEYS, *SETTINGS))
        + ".",
    ]
    lines += [f"{name}: `{info[name]}`." for name in SETTINGS if name in info]
    lines += [
        f"Large SGEMM ({sgemm_size} x {sgemm_size} float32) at the start of the run: "
        + ", ".join(f"{name} {value / 1e9:.1f} GFLOP/s" for name, value in rates.items())
        + ". The floor (d) of each configuration uses the larger of the two rates "
        "timed in that configuration's own rounds (its row shows the rate).",
        "",
        "Ratios are baseline time / our time in this run (above 1: ours is faster); "
        "floor / ours is the fraction of the machine's SGEMM rate that we reach.",
        "",
        *summary_table(results, rate),
        "",
        "## Every row",
        "",
        "Median and p90 over the repeats; streaming rows are per frame (RTF: time per "
        "frame / 16 ms). Page faults: the process's minor page faults per call, step or "
        "frame (median), i.e. memory taken fresh from the kernel and touched for the first "
        "time; each cost 1-2 µs on the development VM (benchmarks/NOTES.md, entry 11). Compile: "
        "lowering and compiling the jitted function ahead of time. Compiles after warm-up: "
        "XLA compilations counted during the timed runs.",
        "",
        *detail_table(results, rate),
        "",
    ]
    if memory:
        lines += [
            "## Memory of a training step",
            "",
            "Ours, from `jax.jit(step).lower(...).compile().memory_analysis()` "
            "(the `train` configuration with time stretched; parameters and "
            "optimiser state are donated, so arguments and outputs share buffers).",
            "",
            *memory_table(memory),
            "",
        ]
    notes = {}
    for result in results:
        for row in result.rows:
            if row.note:
                notes.setdefault(LABELS.get(row.name, row.name), []).append(
                    f"`{result.config.name}`: {row.note}"
                )
    if blocking:
        lines += [
            "## Blocking of the native kernel",
            "",
            "Rows per L2 block of each layer's forward (one thread's rows; 'all' = "
            "unblocked), as planned from the cache sizes above "
            "(`banded_rnn._backends._native.row_block`).",
            "",
            *(f"* `{name}`: {plan}" for name, plan in blocking.items()),
            "",
        ]
    lines += ["## What runs", ""]
    for label, items in notes.items():
        lines.append(f"* {label}: " + "; ".join(items))
    lines.append("")
    return "\n".join(lines)


def write_report(path: os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` (UTF-8) atomically, making its folder: an
    interrupted run leaves the last report whole."""
    from banded_rnn._internal import write_atomically

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, lambda file: file.write(text.encode("utf-8")))
