"""Serve a model with ``python -m banded_rnn serve`` and stream to it from a
few clients, all on 127.0.0.1; stops by itself (about 10 s).

    python examples/serve_and_stream.py

The server runs in a process of its own, started from the command line with
this file's ``make_model`` and a variables file. Three clients, each in a
thread with its own connection, stream 100 frames of 16 ms each (one frame
every 16 ms, as live audio would come) and print their latency. One client's
outputs are then checked against the same frames streamed alone through a
local ``Stream``, and the server is stopped with SIGTERM.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np

from banded_rnn import BandedLSTM, Stream
from banded_rnn.serving import Client, save_variables

BANDS, FEATURES, UNITS, SLOTS = 16, 8, 32, 4
FRAMES, PERIOD = 100, 0.016


def make_model():
    """The served model: the server calls it as ``serve_and_stream:make_model``."""
    model = BandedLSTM(UNITS, num_layers=2)
    return model, model.init(jax.random.key(0), None, np.zeros((1, BANDS, 1, FEATURES), np.float32))


def client(url: str, name: str, frames: np.ndarray, results: dict) -> None:
    """Streams ``frames`` live: one every 16 ms, each sent when due; records
    the outputs and each frame's latency (due time to outputs back)."""
    with Client(url) as connection:
        connection.start(name)
        outputs, latencies, start = [], [], time.perf_counter()
        for t, frame in enumerate(frames):
            due = start + t * PERIOD
            time.sleep(max(due - time.perf_counter(), 0.0))
            outputs.append(connection(name, frame))
            latencies.append(time.perf_counter() - due)
        connection.end(name)
    results[name] = (np.stack(outputs), np.array(latencies))


def main() -> None:
    model, variables = make_model()
    # Trained weights would come from a file: here the initial ones, changed a little.
    variables = jax.tree.map(lambda p: np.asarray(p) * 1.1, variables)
    with tempfile.TemporaryDirectory() as directory:
        weights = pathlib.Path(directory) / "variables.npz"
        save_variables(weights, variables)
        command = [sys.executable, "-m", "banded_rnn", "serve", "serve_and_stream:make_model"]
        command += ["--variables", str(weights), "--bands", str(BANDS), "--slots", str(SLOTS)]
        command += ["--port", "0"]  # a free port
        here = str(pathlib.Path(__file__).resolve().parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]),
        }
        server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
        try:
            line = (
                server.stdout.readline()
            )  # "banded_rnn: serving ... on ws://127.0.0.1:PORT (...)"
            print(line.strip())
            url = line.split(" on ")[1].split()[0]
            rng = np.random.default_rng(0)
            frames = {
                f"mic{n}": rng.standard_normal((FRAMES, BANDS, 1, FEATURES)).astype(np.float32)
                for n in range(3)
            }
            results: dict = {}
            threads = [
                threading.Thread(target=client, args=(url, name, frames[name], results))
                for name in frames
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        finally:
            server.send_signal(signal.SIGTERM)  # the server ends every sequence and exits
            try:
                server.wait(30)
            finally:
                server.kill()  # nothing left behind, even if it did not stop in time
    for name, (_, latencies) in sorted(results.items()):
        p50, p99 = np.percentile(latencies[5:], [50, 99]) * 1e3
        print(f"{name}: {len(latencies)} frames, latency p50 {p50:.2f} ms, p99 {p99:.2f} ms")

    # The served outputs equal the same frames streamed alone, here.
    stream = Stream(model, variables, batch_size=1, num_bands=BANDS, max_chunk=1)
    alone = np.stack([stream(frame[None])[0] for frame in frames["mic0"]])
    print("largest difference from streaming mic0 alone:", np.abs(results["mic0"][0] - alone).max())
    print("server exit code:", server.returncode)


if __name__ == "__main__":
    main()
