"""Command line: ``python -m interop demo``, the problem in Keras, then the fix in Keras and JAX."""

from __future__ import annotations

import argparse

from banded_rnn._internal import run_demo

from ._demo import run_keras_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m interop")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo",
        help="the three-band experiment: a shared stateful keras.layers.LSTM (whole and "
        "halves differ), then BandedLSTMLayer in Keras and BandedLSTM in JAX (identical)",
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_keras_demo()  # the problem, then the fix in Keras
        run_demo()  # the fix in JAX
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
