"""``python -m banded_rnn serve``: a model served over WebSocket until interrupted."""

from __future__ import annotations

import argparse
import gc
import signal
import sys


def add_serve_command(commands: argparse._SubParsersAction) -> None:
    """Adds ``serve`` and its options to the command line's sub-commands."""
    serve = commands.add_parser(
        "serve",
        help="serve a model's live sequences over WebSocket (banded_rnn.serving)",
        description="Serves a model over WebSocket: each client starts sequences and sends "
        "frames [bands, frame_length, features] of float32; the frames that are ready run as "
        "one batched call (docs/guides/serving.md). Runs until interrupted (Ctrl-C, SIGTERM).",
    )
    serve.add_argument("model", help="module:function, a function returning (model, variables)")
    serve.add_argument(
        "--variables",
        help=".npz of the variables, one array per leaf keyed like params/layer_0/kernel "
        "(banded_rnn.serving.save_variables); replaces the function's",
    )
    serve.add_argument("--bands", type=int, required=True, help="bands of every frame")
    serve.add_argument(
        "--features", type=int, help="features of every frame (read from a BandedLSTM's variables)"
    )
    serve.add_argument("--frame-length", type=int, default=1, help="time steps per frame")
    serve.add_argument("--slots", type=int, default=8, help="sequences live at once")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8765, help="port (0: a free one)")
    serve.add_argument("--max-delay-ms", type=float, default=2.0, help="longest wait for others")
    serve.add_argument(
        "--max-idle", type=float, default=60.0, help="seconds without a frame before a sequence "
        "is ended (0: never)"
    )  # fmt: skip
    serve.add_argument("--check-finite", action="store_true", help="refuse NaN and infinities")


def run_serve(args: argparse.Namespace) -> int:
    """Loads the model, warms the batcher up, serves until SIGINT or SIGTERM."""
    from ._batcher import SequenceBatcher
    from ._model_file import load_model
    from ._server import Server

    model, variables = load_model(args.model, args.variables)
    batcher = SequenceBatcher(
        model,
        variables,
        num_slots=args.slots,
        num_bands=args.bands,
        frame_length=args.frame_length,
        features=args.features,
        max_delay=args.max_delay_ms / 1000,
        max_idle=args.max_idle or None,
        check_finite=args.check_finite,
    )
    with batcher:
        batcher.warmup()
        # Everything loaded so far (JAX, the model, its compiled ticks) lives as
        # long as the server: kept out of the collector's full passes, each of
        # which would otherwise stop every thread for ~0.1 s (NOTES.md).
        gc.collect()
        gc.freeze()
        signal.signal(signal.SIGTERM, _interrupt)
        with Server(batcher, args.host, args.port) as server:
            print(
                f"banded_rnn: serving {args.model} on {server.url} ({batcher.num_slots} slots, "
                f"frames {list(batcher.frame_shape)}, outputs {list(batcher.output_shape)})",
                flush=True,
            )
            try:
                server.wait()
            except KeyboardInterrupt:
                print("banded_rnn: stopping", file=sys.stderr, flush=True)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
