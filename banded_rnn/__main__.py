"""Command line: ``python -m banded_rnn demo`` and ``python -m banded_rnn info``."""

from __future__ import annotations

import argparse

from ._backends._native import info
from ._demo import run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m banded_rnn")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo", help="the three-band experiment: whole vs halves, band independence"
    )
    commands.add_parser(
        "info", help="the path BandedLSTM takes here: native kernel (its ISA), cuDNN or scan"
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo()
    elif args.command == "info":
        print(describe(info()))
    return 0


def describe(details: dict) -> str:
    """One line: the path float32 calls on this machine take, and why."""
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
    return (
        f"banded_rnn: native CPU kernel, {details['isa']} "
        f"({details['vector_floats']} floats per vector; this CPU can run "
        f"{', '.join(details['isas'])}), threads per call: {details['threads']}; "
        f"JAX backend: {jax.default_backend()}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
