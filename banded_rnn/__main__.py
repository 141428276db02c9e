"""Command line: ``python -m banded_rnn demo``, ``python -m banded_rnn info`` and
``python -m banded_rnn serve`` (banded_rnn.serving)."""

from __future__ import annotations

import argparse

from ._backends._native import info
from ._demo import run_demo
from .serving._cli import add_serve_command, run_serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m banded_rnn")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo", help="the three-band experiment: whole vs halves, band independence"
    )
    commands.add_parser(
        "info", help="the path BandedLSTM takes here: native kernel (its ISA), cuDNN or scan"
    )
    add_serve_command(commands)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "demo":
        run_demo()
    elif args.command == "info":
        print(describe(info()))
    return 0


def describe(details: dict) -> str:
    """The path float32 calls on this machine take, and why: one line, and a
    second with the cache sizes the native kernel's blocking plans with."""
    import jax

    from ._backends._cudnn import platform_supported

    if platform_supported():
        device = jax.devices()[0].device_kind
        return (
            f"banded_rnn: XLA scan on {device}; cuDNN's fused LSTM with "
            "implementation='cudnn' (float32, seq_lengths or no mask, not under vmap)"
        )
    if details["kernel"] != "built":
        return f"banded_rnn: XLA scan (native kernel not built: {details['error']})"
    caches, detected = details["caches"], details["caches_detected"]
    source = (
        "as the CPU reports" if caches == detected else f"set; the CPU reports {_sizes(detected)}"
    )
    return (
        f"banded_rnn: native CPU kernel, {details['isa']} "
        f"({details['vector_floats']} floats per vector, {details['tile']} tile; this CPU can "
        f"run {', '.join(details['isas'])}), threads per call: {details['threads']}; "
        f"JAX backend: {jax.default_backend()}\n"
        f"caches planned with: {_sizes(caches)} ({source})"
    )


def _sizes(caches: dict) -> str:
    """``L1d 48 KiB, L2 1 MiB, L3 32 MiB``; ``?`` for a size not known."""

    def size(value: int) -> str:
        if value <= 0:
            return "?"
        unit = "MiB" if value >= 1 << 20 else "KiB"
        return f"{value / (1 << (20 if unit == 'MiB' else 10)):g} {unit}"

    return ", ".join(f"{name} {size(caches[key])}" for name, key in _LEVELS)


_LEVELS = (("L1d", "l1d"), ("L2", "l2"), ("L3", "l3"))


if __name__ == "__main__":
    raise SystemExit(main())
