"""Command line: ``python -m interop demo``, the experiment in JAX and in Keras."""

from __future__ import annotations

import argparse

from banded_rnn._demo import run_demo

from ._demo import run_keras_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m interop")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo",
        help="the three-band experiment in JAX, then in Keras: a shared stateful "
        "keras.layers.LSTM (the halves differ) beside BandedLSTMLayer (identical)",
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo()
        print()
        run_keras_demo()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
