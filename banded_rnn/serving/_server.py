"""``Server``: a ``SequenceBatcher`` served over WebSocket (the ``websockets`` package)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from concurrent.futures import Future
from functools import partial
from typing import Any

from .._internal import validate as _validate
from . import _protocol
from ._batcher import SequenceBatcher


@dataclasses.dataclass(frozen=True)
class _Key:
    """A sequence's key in the batcher: its connection and the client's id,
    shown as the client's id in the batcher's messages."""

    connection: int
    sequence_id: str

    def __repr__(self) -> str:
        return repr(self.sequence_id)


CLOSE_TIMEOUT = 2.0
"""Seconds a closing connection may take to say goodbye before it is cut."""


class _Peer:
    """One connection's messages to send, in order, from a bounded queue: a
    client that reads too slowly is cut off (its socket aborted: a close
    handshake would wait for the client to read), never waited for."""

    def __init__(self, connection: Any, limit: int) -> None:
        self.connection = connection
        self.queue: asyncio.Queue = asyncio.Queue(limit)
        self.dropped = False

    def put(self, message: str | bytes) -> None:
        if self.dropped:
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped = True
            self.connection.transport.abort()

    async def close(self) -> None:
        """Closes the connection, cutting it if the client does not answer in time."""
        try:
            await asyncio.wait_for(self.connection.close(1001, "server stopping"), CLOSE_TIMEOUT)
        except (TimeoutError, OSError):
            self.connection.transport.abort()

    async def send_all(self) -> None:
        while True:
            await self.connection.send(await self.queue.get())


class Server:
    """Serves a :class:`SequenceBatcher` over WebSocket, from an event loop in
    a thread of its own (the message format: docs/guides/serving.md).

    On connecting, a client receives ``{"type": "ready", ...}`` with the
    frame and output shapes; it then sends ``{"type": "start", "id": ...}``,
    binary frames and ``{"type": "end", "id": ...}``, and receives each
    frame's outputs, in the order of its frames, or ``{"type": "error",
    ...}`` for a refused one (sent when refused, so it may come before the
    outputs of earlier frames). Ids belong to their connection: two clients
    may both use ``"a"``. A malformed or refused message gets an error message
    and the connection stays usable; a client that disconnects has its
    sequences ended and their frames not yet run dropped; a client that lets
    more than ``send_queue`` messages wait is cut off, so a slow reader never
    holds back the others. The server does not close the batcher.

    The model comes from ``module:function``, as ``python -m banded_rnn serve`` loads it:

    >>> import numpy as np
    >>> from banded_rnn.serving import Client, SequenceBatcher, load_model
    >>> model, variables = load_model("banded_rnn.serving._model_file:_example")  # 3 bands
    >>> with SequenceBatcher(model, variables, num_slots=2, num_bands=3) as batcher:
    ...     with Server(batcher) as server, Client(server.url) as client:  # on 127.0.0.1
    ...         client.start("a")
    ...         client("a", np.ones(client.frame_shape, np.float32)).shape
    (3, 1, 8)

    Args:
      batcher: the batcher to serve.
      host: the address to listen on; the loopback interface by default.
      port: the port; 0 picks a free one (read ``server.port`` once started).
      send_queue: the most messages that may wait to be sent to one client.
    """

    def __init__(
        self,
        batcher: SequenceBatcher,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        send_queue: int = 256,
    ) -> None:
        if not isinstance(batcher, SequenceBatcher):
            raise TypeError(
                f"batcher: expected a SequenceBatcher; received {type(batcher).__name__}"
            )
        self.batcher, self.host = batcher, host
        self._requested_port = _validate.positive_int(port, "port", minimum=0)
        self.send_queue = _validate.positive_int(send_queue, "send_queue")
        self.port: int | None = None
        self._thread: threading.Thread | None = None
        self._ready: Future = Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._connections = 0
        self._peers: set[_Peer] = set()

    @property
    def url(self) -> str:
        """``ws://host:port`` of the running server."""
        if self.port is None:
            raise RuntimeError("url: the server is not started; call start() first")
        return f"ws://{self.host}:{self.port}"

    def start(self) -> Server:
        """Starts listening; returns once the port is bound (or raises ``OSError``)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._serve, name="banded_rnn Server", daemon=True
            )
            self._thread.start()
        self.port = self._ready.result()
        return self

    def wait(self) -> None:
        """Blocks until the server stops (signals are handled meanwhile)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.2)

    def close(self) -> None:
        """Closes every connection (ending their sequences) and stops the server."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop closed meanwhile
                pass
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _serve(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # e.g. the port is taken
            if not self._ready.done():
                self._ready.set_exception(error)
            else:
                raise

    async def _main(self) -> None:
        from websockets.asyncio.server import serve

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        size = self.batcher.frame_shape
        frame_bytes = size[0] * size[1] * size[2] * _protocol.WIRE_DTYPE.itemsize
        limit = 4 * (frame_bytes + _protocol.HEADER.size + _protocol.MAX_ID_BYTES) + 65536
        async with serve(
            self._handle, self.host, self._requested_port, compression=None, max_size=limit
        ) as server:
            self._ready.set_result(server.sockets[0].getsockname()[1])
            await self._stop.wait()
            server.close(close_connections=False)  # accept no more
            await asyncio.gather(*(peer.close() for peer in list(self._peers)))

    async def _handle(self, connection: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        self._connections += 1
        number, live = self._connections, set()
        peer = _Peer(connection, self.send_queue)
        self._peers.add(peer)
        sender = asyncio.create_task(peer.send_all())
        batcher = self.batcher
        peer.put(
            _protocol.text(
                "ready",
                bands=batcher.num_bands,
                frame_length=batcher.frame_length,
                features=batcher.features,
                output_shape=list(batcher.output_shape),
                slots=batcher.num_slots,
                dtype="float32",
            )
        )
        try:
            async for message in connection:
                if isinstance(message, str):
                    self._on_text(peer, number, live, message)
                else:
                    self._on_frame(peer, number, live, message)
        except ConnectionClosed:
            pass
        finally:
            self._peers.discard(peer)
            for sequence_id in live:
                try:
                    batcher.end(_Key(number, sequence_id), drop_queued=True)
                except (ValueError, RuntimeError):  # freed after max_idle, or closed
                    pass
            sender.cancel()

    def _on_text(self, peer: _Peer, number: int, live: set[str], message: str) -> None:
        sequence_id = None
        try:
            kind, sequence_id = _protocol.decode_text(message)
            if kind == "start":
                self.batcher.start(_Key(number, sequence_id))
                live.add(sequence_id)
            else:
                live.discard(sequence_id)
                self.batcher.end(_Key(number, sequence_id))
            peer.put(_protocol.text({"start": "started", "end": "ended"}[kind], id=sequence_id))
        except (ValueError, TypeError, RuntimeError) as error:
            peer.put(_protocol.error_text(sequence_id, None, error))

    def _on_frame(self, peer: _Peer, number: int, live: set[str], message: bytes) -> None:
        try:
            sequence_id, frame_number, frame = _protocol.decode_array(
                message, self.batcher.frame_shape
            )
        except _protocol.MessageError as error:
            peer.put(_protocol.error_text(error.sequence_id, error.number, error))
            return
        if peer.dropped:  # cut off: nothing more runs for it
            return
        future = self.batcher.submit(_Key(number, sequence_id), frame)
        future.add_done_callback(partial(self._deliver, peer, sequence_id, frame_number))

    def _deliver(self, peer: _Peer, sequence_id: str, number: int, future: Future) -> None:
        """Sends a frame's outputs or error (called in the batcher's thread)."""
        if future.cancelled():
            return
        error = future.exception()
        if error is None:
            message = _protocol.encode_array(sequence_id, number, future.result())
        else:
            message = _protocol.error_text(sequence_id, number, error)
        try:
            self._loop.call_soon_threadsafe(peer.put, message)
        except RuntimeError:  # the server has stopped
            pass
