"""Runs every benchmark configuration against the baselines and writes the table.

    python -m benchmarks.run [--quick] [--only CONFIG ...] [--out benchmarks/RESULTS.md]

The report names the CPU, the native kernel's instruction set, register tile
and cache sizes, and goes to ``--out`` and to ``benchmarks/results/<cpu>.md``.

Per configuration: identical weights go into ours and every baseline, outputs
(or, for training, the loss and the gradients) are checked to agree with ours
to 1e-5 before anything is timed, then every row is timed round-robin in this
one process. The exit status is 1 if any row failed its parity check.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")  # before anything imports keras

from banded_rnn import kernel_info  # noqa: E402
from banded_rnn._internal import kernel_row_block  # noqa: E402

from . import _baselines, _ours  # noqa: E402
from ._configs import CONFIGS, MEMORY_REMAT_CHUNK, MEMORY_TIME, Config  # noqa: E402
from ._harness import (  # noqa: E402
    OURS_SCAN,
    OURS_SHARDED,
    OURS_STEP,
    Impl,
    Result,
    Row,
    benchmark,
    sgemm_impls,
    sgemm_rates,
)
from ._report import machine, render, write_report  # noqa: E402
from ._weights import random_data, random_weights  # noqa: E402

RESULTS_DIR = Path(__file__).parent / "results"
"""One report per CPU and kernel path, the latest run of each: every CPU the
project has run on stays measured."""
SGEMM_SIZE = 2048
FULL_REPEATS = 20
FULL_WARMUP = 2
QUICK_WARMUP = 0
"""Untimed rounds before the timed ones. The parity check has already run every
function once on the timed shapes, so ``--quick`` skips the extra round."""
QUICK_REPEATS = {"subband-offline": 3, "train": 5}
"""Repeats per configuration in ``--quick`` mode (others: ``QUICK_DEFAULT``)."""
QUICK_DEFAULT = 7
CPU_DEVICES = 2
"""CPU devices the process asks JAX for: ours also runs the small-matmul
configurations with the batch split over them. Everything else, the baselines
included, runs on the first device, as it would in a one-device process."""


def use_cpu_devices(count: int) -> int:
    """Asks JAX for ``count`` CPU devices (possible only before JAX has run
    anything); returns how many this process has."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as error:  # the backend is already up (e.g. under pytest)
        print(f"CPU devices: left as they are ({error})", file=sys.stderr)
    return len(jax.devices())


def device_label(devices: int) -> str:
    """What the rows ran on: ``"2 CPU devices"``, or the accelerator's kind."""
    import jax

    if jax.default_backend() == "cpu":
        return f"{devices} CPU device{'s' if devices > 1 else ''}"
    first = jax.devices()[0]
    return f"{len(jax.devices())} x {first.device_kind} ({first.platform})"


def build_impls(
    config: Config, baselines: list[str], seed: int = 0, sharded: bool = False
) -> tuple[list[Impl], list[Row]]:
    """Ours, ours on the XLA scan, ours over the CPU devices (if ``sharded``)
    and the named baselines for ``config``, all with the same weights and
    inputs; a row that cannot be built becomes a failed row."""
    weights = random_weights(config, seed)
    inputs, targets = random_data(config, seed + 1)
    impls = [_ours.build(config, weights, inputs, targets)]
    builders = {OURS_STEP: _ours.build_step, OURS_SCAN: _ours.build_scan}
    if sharded:
        builders[OURS_SHARDED] = _ours.build_sharded
    builders.update((name, _baselines.BUILDERS[name]) for name in baselines)
    failed = []
    for name, builder in builders.items():
        try:
            impl = builder(config, weights, inputs, targets)
        except Exception as error:
            message = f"error: {type(error).__name__}: {error}"
            print(f"{config.name}/{name}: could not be built: {message}", file=sys.stderr)
            failed.append(Row(name, error=message))
        else:
            if impl is not None:
                impls.append(impl)
    return impls, failed


def run_config(
    config: Config, baselines: list[str], repeats: int, warmup: int, sharded: bool = False
) -> Result:
    """Builds and times ``config``; the large SGEMM runs in the same rounds, so
    the floor comes from the same moments as the rows it is compared with."""
    impls, failed = build_impls(config, baselines, sharded=sharded)
    impls += sgemm_impls(SGEMM_SIZE)
    result = benchmark(config, impls, repeats=repeats, warmup=warmup)
    result.rows.extend(failed)
    return result


def measure_memory(config: Config) -> dict[str, dict[str, int]]:
    weights = random_weights(config)
    memory = {}
    for label, chunk in (
        ("no remat", None),
        (f"`remat_chunk={MEMORY_REMAT_CHUNK}`", MEMORY_REMAT_CHUNK),
    ):
        try:
            memory[label] = _ours.train_memory(config, weights, MEMORY_TIME, chunk)
        except Exception as error:
            memory[label] = {"error": f"{type(error).__name__}: {error}"}
    return memory


def blocking_plans(names: list[str]) -> dict[str, str]:
    """Per configuration, the rows per L2 block the native kernel's forward
    takes in each layer: one frame's rows split the units between threads, a
    longer call's rows are split between them (as many as this machine has
    cores); empty when the kernel is not built."""
    if kernel_info()["kernel"] != "built":
        return {}
    plans = {}
    for name in names:
        config = CONFIGS[name]
        threads = 1 if config.time == 1 else max(1, min(os.cpu_count() or 1, config.rows // 6))
        rows = -(-config.rows // threads)
        layers = []
        for layer in range(config.layers):
            features = config.layer_inputs(layer)
            block = kernel_row_block(features, config.units, rows)
            layers.append(
                f"layer {layer} ({features} + {config.units}): {rows} rows, "
                + ("all" if block >= rows else f"blocks of {block}")
            )
        plans[name] = "; ".join(layers)
    return plans


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats (under two minutes)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(CONFIGS),
        metavar="CONFIG",
        help=f"run only these configurations: {', '.join(CONFIGS)}",
    )
    parser.add_argument(
        "--baselines",
        nargs="+",
        choices=list(_baselines.BUILDERS),
        default=list(_baselines.BUILDERS),
        help="baselines to run (default: all)",
    )
    parser.add_argument("--repeats", type=int, help="timed repeats per row (overrides the mode)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory table")
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=CPU_DEVICES,
        help=f"CPU devices to ask JAX for; above 1, ours also runs with the batch split "
        f"over them (default: {CPU_DEVICES}; 1: no such rows)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "RESULTS.md",
        help="markdown file to write (default: benchmarks/RESULTS.md)",
    )
    parser.add_argument(
        "--keep",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also keep the report as results/<cpu>-<isa>.md beside --out "
        "(benchmarks/results/ by default), one file per CPU and kernel path (default: on)",
    )
    args = parser.parse_args(argv)
    if args.cpu_devices < 1:
        parser.error(f"--cpu-devices: expected at least 1; received {args.cpu_devices}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    devices = use_cpu_devices(args.cpu_devices)
    sharded = args.cpu_devices > 1 and devices > 1
    start = time.perf_counter()
    names = args.only or list(CONFIGS)
    sgemm_repeats = 5 if args.quick else 10
    rates = sgemm_rates(SGEMM_SIZE, repeats=sgemm_repeats)
    print("SGEMM: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items()), flush=True)
    results = []
    for name in names:
        if args.repeats is not None:
            repeats = args.repeats
        elif args.quick:
            repeats = QUICK_REPEATS.get(name, QUICK_DEFAULT)
        else:
            repeats = FULL_REPEATS
        began = time.perf_counter()
        result = run_config(
            CONFIGS[name],
            args.baselines,
            repeats,
            warmup=QUICK_WARMUP if args.quick else FULL_WARMUP,
            sharded=sharded,
        )
        summary = ", ".join(
            f"{row.name} {row.median * 1e3:.3f} ms" if row.ok else f"{row.name} {row.error}"
            for row in result.rows
        )
        print(f"{name} ({time.perf_counter() - began:.0f} s): {summary}", flush=True)
        results.append(result)
    memory = {}
    if not args.no_memory and "train" in names:
        memory = measure_memory(CONFIGS["train"])
    if args.repeats is not None or not args.quick:
        repeats_label = str(args.repeats or FULL_REPEATS)
    else:
        counts = [QUICK_REPEATS.get(name, QUICK_DEFAULT) for name in names]
        repeats_label = f"{min(counts)} to {max(counts)}"
    info = {**machine(), "devices": device_label(devices)}
    report = render(
        results,
        rates,
        memory,
        quick=args.quick,
        repeats=repeats_label,
        elapsed=time.perf_counter() - start,
        info=info,
        sgemm_size=SGEMM_SIZE,
        blocking=blocking_plans(names),
    )
    outputs = [args.out]
    if args.keep:  # beside --out: benchmarks/results/ for the default
        outputs.append(args.out.parent / RESULTS_DIR.name / f"{info['slug']}.md")
    for out in outputs:
        write_report(out, report)
    print(report)
    print("written: " + ", ".join(str(out) for out in outputs), file=sys.stderr)
    failed = [
        f"{r.config.name}/{row.name}"
        for r in results
        for row in r.rows
        if row.error and "PARITY" in row.error
    ]
    if failed:
        print(f"PARITY FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
