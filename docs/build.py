"""Builds the documentation site into docs/_build/html, with warnings as errors;
``--serve`` then serves it on http://127.0.0.1:8000 (``--port`` to change).

    python docs/build.py --serve
"""

from __future__ import annotations

import argparse
import functools
import http.server
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def build(output: Path) -> None:
    """Every page and notebook, executed; broken references, notebook errors and
    any other warning fail the build. Into an existing ``output``, only what
    changed since is rebuilt (and reported)."""
    command = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-n", "-q"]
    subprocess.run([*command, str(DOCS), str(output)], check=True)


def serve(directory: Path, port: int) -> None:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        print(f"serving {directory} on http://127.0.0.1:{server.server_address[1]}/", flush=True)
        server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="serve the site after building it")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--output", type=Path, default=DOCS / "_build" / "html")
    args = parser.parse_args()
    build(args.output)
    if args.serve:
        serve(args.output, args.port)


if __name__ == "__main__":
    main()
