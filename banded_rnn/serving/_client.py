"""``Client``: a blocking client of a ``Server``, one connection."""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _protocol


class Client:
    """A connection to a :class:`Server`, blocking: one thread uses it, except
    that one thread may :meth:`send` while another :meth:`receive` s (a live
    source and its consumer). Open one client per thread otherwise.

    The server's ``ready`` message sets ``client.frame_shape`` ``[bands, time,
    features]`` and ``client.output_shape`` ``[bands, time, ...]``. An error
    message from the server is raised as the error it names (``ValueError``,
    ``TypeError``, ``BatcherFullError`` or ``RuntimeError``), its message
    prefixed with the sequence id and frame number.

    >>> import jax, numpy as np
    >>> from banded_rnn import BandedLSTM
    >>> from banded_rnn.serving import SequenceBatcher, Server
    >>> model = BandedLSTM(units=8)
    >>> variables = model.init(jax.random.key(0), None, np.zeros((1, 3, 1, 4), np.float32))
    >>> with SequenceBatcher(model, variables, num_slots=2, num_bands=3) as batcher:
    ...     with Server(batcher) as server, Client(server.url) as client:  # on 127.0.0.1
    ...         client.start("a")
    ...         number = client.send("a", np.ones((3, 1, 4), np.float32))  # frame 0
    ...         sequence_id, number, outputs = client.receive()
    ...         client.end("a")
    >>> sequence_id, number, outputs.shape
    ('a', 0, (3, 1, 8))

    Args:
      url: the server's ``ws://host:port``.
      timeout: seconds to wait for the connection and for each reply of
        :meth:`start`, :meth:`end` and ``client(sequence_id, frame)``.
    """

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        from websockets.sync.client import connect

        self.timeout = timeout
        # Entered as a context manager, as websockets >= 17.1 asks (closed by close()).
        self._connection = connect(
            url, compression=None, max_size=None, proxy=None, open_timeout=timeout
        ).__enter__()
        try:
            ready = json.loads(self._connection.recv(timeout))
        except BaseException:
            self._connection.close()
            raise
        self.num_bands, self.num_slots = ready["bands"], ready["slots"]
        self.frame_shape = (ready["bands"], ready["frame_length"], ready["features"])
        self.output_shape = tuple(ready["output_shape"])
        self._numbers: dict[str, int] = {}
        self._waiting: collections.deque[str | bytes] = collections.deque()

    def start(self, sequence_id: str) -> None:
        """Starts the sequence ``sequence_id`` (a string) on the server, from zeros."""
        self._request("start", sequence_id)
        self._numbers[sequence_id] = 0

    def end(self, sequence_id: str) -> None:
        """Ends ``sequence_id``; the frames sent before still return their outputs."""
        self._request("end", sequence_id)

    def send(self, sequence_id: str, frame: Any) -> int:
        """Sends ``frame [bands, time, features]`` (as float32) without waiting;
        returns its frame number, which its outputs come back with."""
        number = self._numbers.get(_protocol.check_id(sequence_id), 0)
        self._connection.send(_protocol.encode_array(sequence_id, number, np.asarray(frame)))
        self._numbers[sequence_id] = number + 1
        return number

    def receive(self, timeout: float | None = None) -> tuple[str, int, np.ndarray]:
        """The next frame's ``(sequence_id, frame number, outputs)``; raises an
        error message as its error, ``TimeoutError`` after ``timeout`` seconds."""
        message = self._waiting.popleft() if self._waiting else self._connection.recv(timeout)
        return self._read(message)

    def __call__(self, sequence_id: str, frame: Any) -> np.ndarray:
        """Sends ``frame`` and returns its outputs ``[bands, time, ...]``; the
        messages of other sequences received meanwhile wait for :meth:`receive`."""
        number = self.send(sequence_id, frame)

        def mine(fields: dict | None, header: tuple[str, int] | None) -> bool:
            if header is not None:
                return header == (sequence_id, number)
            return fields["type"] == "error" and (fields["id"], fields["frame"]) == (
                sequence_id,
                number,
            )

        return self._read(self._wait_for(mine))[2]

    def close(self) -> None:
        """Closes the connection; the server ends this client's sequences."""
        self._connection.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, kind: str, sequence_id: str) -> None:
        # Checked here: the server's error for a malformed id names no id to match.
        sequence_id = _protocol.check_id(sequence_id)
        self._connection.send(_protocol.text(kind, id=sequence_id))

        def reply(fields: dict | None, header: tuple[str, int] | None) -> bool:
            return fields is not None and fields.get("id") == sequence_id and (
                fields["type"] == "error" and fields.get("frame") is None
                or fields["type"] == {"start": "started", "end": "ended"}[kind]
            )  # fmt: skip

        self._read(self._wait_for(reply))

    def _wait_for(self, match: Callable[[dict | None, tuple | None], bool]) -> str | bytes:
        """The first message (waiting or received) that ``match`` es; the
        others received meanwhile are kept, in order, for :meth:`receive`."""
        for message in self._waiting:
            if match(*_peek(message)):
                self._waiting.remove(message)
                return message
        while True:
            message = self._connection.recv(self.timeout)
            if match(*_peek(message)):
                return message
            self._waiting.append(message)

    def _read(self, message: str | bytes) -> Any:
        """A frame's ``(id, number, outputs)``, or a reply's fields, from
        ``message``; an error message raised."""
        if isinstance(message, bytes):
            return _protocol.decode_array(message, self.output_shape)
        fields = json.loads(message)
        if fields["type"] == "error":
            where = [f"id {fields['id']!r}"] if fields.get("id") is not None else []
            where += [f"frame {fields['frame']}"] if fields.get("frame") is not None else []
            error = _protocol.ERRORS.get(fields["error"], RuntimeError)
            raise error(f"{', '.join(where)}: {fields['message']}" if where else fields["message"])
        return fields  # a reply of start or end


def _peek(message: str | bytes) -> tuple[dict | None, tuple[str, int] | None]:
    """A text message's fields, or a binary message's ``(id, frame number)``."""
    if isinstance(message, str):
        return json.loads(message), None
    number, length = _protocol.HEADER.unpack_from(message)
    end = _protocol.HEADER.size + length
    return None, (message[_protocol.HEADER.size : end].decode(), number)
