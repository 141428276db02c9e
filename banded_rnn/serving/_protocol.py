"""The server's message format (docs/guides/serving.md, "Messages").

Text messages are JSON objects with a ``"type"``. Binary messages carry one
frame of one sequence, or its outputs::

    uint32 LE   frame number (the client's; echoed back with the outputs)
    uint16 LE   n, the byte length of the sequence id
    n bytes     the sequence id, UTF-8
    the rest    float32 LE values in C order: the frame [bands, time,
                features], or the outputs [bands, time, ...]
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from ._sequences import BatcherFullError

HEADER = struct.Struct("<IH")
MAX_ID_BYTES = 256
WIRE_DTYPE = np.dtype("<f4")

ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "TypeError": TypeError,
    "RuntimeError": RuntimeError,
    "BatcherFullError": BatcherFullError,
}
"""The error kinds an error message names, as the client raises them."""


def check_id(sequence_id: Any) -> str:
    """``sequence_id`` if it is a string of 1 to ``MAX_ID_BYTES`` UTF-8 bytes, or ``ValueError``."""
    if not isinstance(sequence_id, str) or not 1 <= len(sequence_id.encode()) <= MAX_ID_BYTES:
        raise ValueError(
            f"id: expected a string of 1 to {MAX_ID_BYTES} UTF-8 bytes; received {sequence_id!r}"
        )
    return sequence_id


def encode_array(sequence_id: str, number: int, array: np.ndarray) -> bytes:
    """A binary message: the header, then ``array`` as float32 little-endian."""
    name = sequence_id.encode()
    values = np.ascontiguousarray(array, WIRE_DTYPE)
    return HEADER.pack(number, len(name)) + name + values.tobytes()


def decode_array(message: bytes, shape: tuple[int, ...]) -> tuple[str, int, np.ndarray]:
    """``(sequence_id, number, array of shape)`` from a binary message, or
    ``ValueError`` naming what is wrong (the id and number when they were read)."""
    if len(message) < HEADER.size:
        raise MessageError(
            None, None, f"binary message: expected a {HEADER.size}-byte header (uint32 frame "
            f"number, uint16 id length); received {len(message)} bytes"
        )  # fmt: skip
    number, length = HEADER.unpack_from(message)
    start = HEADER.size + length
    if len(message) < start:
        raise MessageError(
            None, number, f"binary message: the header gives an id of {length} bytes; received "
            f"{len(message) - HEADER.size} bytes after the header"
        )  # fmt: skip
    try:
        sequence_id = check_id(bytes(message[HEADER.size : start]).decode())
    except (UnicodeDecodeError, ValueError):
        raise MessageError(
            None, number, f"binary message: expected an id of 1 to {MAX_ID_BYTES} UTF-8 bytes "
            f"after the header; received {length} bytes that are not one"
        ) from None  # fmt: skip
    expected = int(np.prod(shape)) * WIRE_DTYPE.itemsize
    if len(message) - start != expected:
        raise MessageError(
            sequence_id, number, f"frame: expected shape [bands, time, features] = {shape}, "
            f"{expected} bytes of float32 LE; received {len(message) - start} bytes"
        )  # fmt: skip
    return sequence_id, number, np.frombuffer(message, WIRE_DTYPE, offset=start).reshape(shape)


def decode_text(message: str) -> tuple[str, str]:
    """``(type, id)`` of a ``start`` or ``end`` message, or ``MessageError``."""
    try:
        fields = json.loads(message)
    except ValueError:
        fields = None
    if not isinstance(fields, dict) or fields.get("type") not in ("start", "end"):
        raise MessageError(
            None, None, 'text message: expected a JSON object {"type": "start" or "end", "id": '
            f"...}}; received {message[:200]!r}"
        )  # fmt: skip
    sequence_id = fields.get("id")
    try:
        return fields["type"], check_id(sequence_id)
    except ValueError as error:
        raise MessageError(None, None, f"{fields['type']} message: {error}") from None


def text(kind: str, **fields: Any) -> str:
    """A JSON text message of type ``kind``."""
    return json.dumps({"type": kind, **fields})


def error_text(sequence_id: str | None, number: int | None, error: BaseException) -> str:
    """The error message for ``error``, naming its kind if the client knows it."""
    kind = type(error).__name__ if type(error).__name__ in ERRORS else "RuntimeError"
    if isinstance(error, MessageError):
        kind = "ValueError"
    return text("error", id=sequence_id, frame=number, error=kind, message=str(error))


class MessageError(ValueError):
    """A message the server cannot read, with the id and frame number read from it."""

    def __init__(self, sequence_id: str | None, number: int | None, message: str) -> None:
        super().__init__(message)
        self.sequence_id, self.number = sequence_id, number
