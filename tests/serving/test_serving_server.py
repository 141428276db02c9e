"""The WebSocket server on 127.0.0.1, with real client connections: outputs as
streamed alone, every malformed message answered, killed clients' slots freed,
and the command line."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from banded_rnn import BandedLSTM
from banded_rnn.serving import BatcherFullError, Client, SequenceBatcher, Server, save_variables
from banded_rnn.serving._protocol import encode_array

from helpers import ROOT, init_model, random_inputs, script_env
from served_model import (
    BANDS,
    FEATURES,
    KERNEL,
    UNITS,
    alone,
    assert_same,
    frames_of,
    make,
    run_threads,
)

HERE = pathlib.Path(__file__).parent
FRAME = (BANDS, 1, FEATURES)


@pytest.fixture(scope="module")
def server():
    with SequenceBatcher(*make(), 4, BANDS, max_delay=0.001) as batcher:
        batcher.warmup()
        with Server(batcher, send_queue=64) as server:
            yield server


def test_clients_in_threads_get_each_sequence_as_streamed_alone(server):
    # Two connections, both using the id "a": ids belong to their connection.
    sequences = {
        (c, name): frames_of(10 * c + len(name), 7) for c in (0, 1) for name in ("a", "bb")
    }
    results = {}

    def connection(c: int) -> None:
        with Client(server.url) as client:
            assert client.frame_shape == FRAME and client.output_shape == (BANDS, 1, UNITS)
            for name in ("a", "bb"):
                client.start(name)
            numbers = {}
            for t in range(7):  # interleaved: both sequences' frames before any reply
                for name in ("a", "bb"):
                    numbers[name, t] = client.send(name, sequences[c, name][t])
            received = {}
            for _ in range(14):
                name, number, outputs = client.receive(timeout=30)
                received[name, number] = outputs
            assert numbers == {key: key[1] for key in numbers}
            for name in ("a", "bb"):
                results[c, name] = np.stack([received[name, t] for t in range(7)])
                client.end(name)

    run_threads(connection, [0, 1])
    for key, frames in sequences.items():
        assert_same(results[key], alone(frames)[0])
    _wait_for(lambda: server.batcher.sequences == ())


def _error(connection) -> dict:
    fields = json.loads(connection.recv(10))
    assert fields["type"] == "error", fields
    return fields


@pytest.mark.parametrize(
    "message, fields",
    [
        (
            "not json",
            {"id": None, "error": "ValueError", "message": "text message: expected a JSON object"},
        ),  # noqa: E501
        (
            '{"type": "restart", "id": "a"}',
            {"id": None, "message": 'received \'{"type": "restart"'},
        ),  # noqa: E501
        (
            '{"type": "start"}',
            {
                "id": None,
                "message": "start message: id: expected a string of 1 to 256",
            },
        ),  # noqa: E501
        (
            '{"type": "end", "id": "nobody"}',
            {
                "id": "nobody",
                "message": "sequence_id: expected a started sequence; 'nobody' is never started",
            },
        ),  # noqa: E501
        (b"\x01\x02", {"id": None, "frame": None, "message": "expected a 6-byte header"}),
        (
            b"\x07\x00\x00\x00\x05\x00ab",
            {"id": None, "frame": 7, "message": "an id of 5 bytes; received 2 bytes after"},
        ),  # noqa: E501
        (
            b"\x07\x00\x00\x00\x02\x00\xff\xfe",
            {"id": None, "frame": 7, "message": "received 2 bytes that are not one"},
        ),  # noqa: E501
        (
            encode_array("a", 3, np.zeros((BANDS, 1, 5))),
            {
                "id": "a",
                "frame": 3,
                "message": "(4, 1, 6), 96 bytes of float32 LE; received 80 bytes",
            },
        ),  # noqa: E501
        (
            encode_array("ghost", 0, np.zeros(FRAME)),
            {"id": "ghost", "frame": 0, "message": "'ghost' is never started"},
        ),  # noqa: E501
    ],
    ids=[
        "not-json",
        "type",
        "no-id",
        "end-unknown",
        "short",
        "id-cut",
        "id-utf8",
        "size",
        "unknown",
    ],
)
def test_a_malformed_message_gets_an_error_and_the_connection_stays_usable(server, message, fields):
    with connect(server.url, compression=None, proxy=None) as connection:
        ready = json.loads(connection.recv(10))
        assert ready["frame_length"] == 1 and ready["output_shape"] == [BANDS, 1, UNITS]
        connection.send(message)
        error = _error(connection)
        for key, value in fields.items():
            assert value in error[key] if key == "message" else error[key] == value, error
        connection.send(json.dumps({"type": "start", "id": "ok"}))
        assert json.loads(connection.recv(10)) == {"type": "started", "id": "ok"}
        frame = frames_of(3, 1)[0]
        connection.send(encode_array("ok", 0, frame))
        reply = connection.recv(10)
    outputs = np.frombuffer(reply[6 + 2 :], "<f4").reshape(BANDS, 1, UNITS)
    assert_same(outputs, alone(frame[None])[0][0])
    _wait_for(lambda: server.batcher.sequences == ())


def test_client_errors_are_raised_as_the_server_names_them(server):
    with Client(server.url) as client:
        with pytest.raises(ValueError, match=r"id 'x', frame 0: frame: expected shape"):
            client.start("x")
            client("x", np.zeros((BANDS, 2, FEATURES)))
        with pytest.raises(ValueError, match=r"id 'x': sequence_id: 'x' is already started"):
            client.start("x")
        for name in ("y", "z", "v"):
            client.start(name)
        with pytest.raises(BatcherFullError, match=r"id 'w': start\('w'\): every one of the 4"):
            client.start("w")
        with pytest.raises(ValueError, match=r"id: expected a string of 1 to 256 UTF-8 bytes"):
            client.send("", np.zeros(FRAME))
    _wait_for(lambda: server.batcher.sequences == ())


def test_a_killed_client_frees_its_slot(server):
    child = subprocess.Popen(
        [sys.executable, str(HERE / "scripts" / "killed_client.py"), server.url],
        env=script_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)])),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "running"
        assert server.batcher.sequences != ()
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        child.kill()
        child.stdout.close()
    _wait_for(lambda: server.batcher.sequences == ())
    with Client(server.url) as client:  # every slot is free again
        for name in ("p", "q", "r", "s"):
            client.start(name)


def _reading_nothing(port: int):
    """A real connection that reads nothing after its first message: a small
    socket receive buffer, and websockets' own buffer of one message."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return connect(
        f"ws://127.0.0.1:{port}", sock=sock, max_queue=1, open_timeout=10, close_timeout=0.5
    )


def test_a_client_that_reads_nothing_is_cut_off_while_the_others_go_on():
    with SequenceBatcher(*make(), 2, BANDS, max_delay=0.001) as batcher:
        batcher.warmup()
        with Server(batcher, send_queue=8) as server, Client(server.url) as client:
            with _reading_nothing(server.port) as stuck:
                stuck.recv(10)  # ready
                stuck.send(json.dumps({"type": "start", "id": "stuck"}))
                client.start("live")
                frames, outputs, cut = frames_of(60, 40), [], False
                frame = encode_array("stuck", 0, np.zeros(FRAME, np.float32))
                for live in frames:  # the live client's frames, between the stuck one's bursts
                    if not cut:
                        try:
                            for _ in range(200):
                                stuck.send(frame)
                        except (ConnectionClosed, OSError):
                            cut = True
                    outputs.append(client("live", live))
                assert cut, "the connection that reads nothing was never cut off"
                _wait_for(lambda: [key.sequence_id for key in batcher.sequences] == ["live"])
                client.end("live")
    assert_same(np.stack(outputs), alone(frames)[0])


def test_close_cuts_a_connection_that_does_not_answer_its_close():
    with SequenceBatcher(*make(), 2, BANDS, max_delay=0.001) as batcher:
        server = Server(batcher).start()
        with _reading_nothing(server.port) as silent:  # "ready" waits unread
            silent.send(json.dumps({"type": "start", "id": "s"}))
            _wait_for(lambda: batcher.sequences != ())
            closing = threading.Thread(target=server.close)
            closing.start()
            closing.join(8)  # cut after 2 s; websockets alone would wait 10 s for an answer
            assert not closing.is_alive()
            _wait_for(lambda: batcher.sequences == ())


def test_the_serve_command_serves_a_model_and_stops_on_sigterm(tmp_path):
    model = BandedLSTM(UNITS, num_layers=2)
    variables = init_model(model, random_inputs(0, (1, BANDS, 3, FEATURES)), seed=5)
    save_variables(tmp_path / "variables.npz", variables)
    command = [sys.executable, "-m", "banded_rnn", "serve", "served_model:make", "--bands", "4"]
    command += ["--port", "0", "--variables", str(tmp_path / "variables.npz"), "--slots", "2"]
    server = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=script_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(HERE)])),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()
        assert "serving served_model:make on ws://127.0.0.1:" in line, line + server.stderr.read()
        frames = frames_of(7, 4)
        with Client(line.split(" on ")[1].split()[0]) as client:
            client.start("s")
            outputs = np.stack([client("s", frame) for frame in frames])
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        server.kill()
        server.communicate()
    assert_same(outputs, alone(frames, model, variables)[0])


def _wait_for(condition, seconds: float = 20.0) -> None:
    """Polls ``condition`` until it holds (the server ends sequences as connections close)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_example_serves_three_clients_and_stops_by_itself():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "serve_and_stream.py")],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(" frames, latency p50 ") == 3, done.stdout
    assert "server exit code: 0" in done.stdout
    if KERNEL:
        assert "largest difference from streaming mic0 alone: 0.0\n" in done.stdout
