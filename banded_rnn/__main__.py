"""Command line: ``python -m banded_rnn demo``."""

from __future__ import annotations

import argparse

from ._demo import run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m banded_rnn")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo", help="the three-band experiment: whole vs halves, band independence"
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
