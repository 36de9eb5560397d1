"""The acknowledged wire (``--acked``): messages, and the file the acked listener keeps.

Every message is one frame (4-byte big-endian length, then the payload) whose
payload is a type byte, the stream's name (2-byte big-endian length, UTF-8), then
a body that depends on the type. The same messages run on both hops, sender ->
``run`` and ``run`` -> listener:

======  ==========  ===================================================================
type    direction   body
======  ==========  ===================================================================
``H``   downstream  HELLO: JSON ``{"version": 1, "fingerprint": "..."}``
``R``   upstream    RESUME: 8-byte sequence number the stream stands at
``D``   downstream  DATA: 8-byte sequence number of its first frame, 4-byte frame count,
                    then that many frames (input frames to ``run``, result frames from it)
``A``   upstream    ACK: 8-byte sequence number; every frame before it is safely stored
``X``   upstream    REFUSED: UTF-8 reason; the connection closes after it
======  ==========  ===================================================================

The acked listener's file is the magic frame :data:`FILE_MAGIC` followed by the
HELLO and DATA messages it stored, framed exactly as they came (a DATA message
cut to the frames the file did not have yet), so one parser reads both.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from digitstream.wire.framing import HEADER, HEADER_SIZE

VERSION = 1
HELLO, RESUME, DATA, ACK, REFUSED = b"H", b"R", b"D", b"A", b"X"
_NAME = struct.Struct(">cH")
_SEQ = struct.Struct(">Q")
_DATA = struct.Struct(">QI")
#: the longest stream name, in UTF-8 bytes
MAX_NAME = 255
#: the first frame of an acked listener's file; no result payload starts with a NUL byte
FILE_MAGIC = b"\x00digitstream acked results v1\n"
#: a DATA message's bytes beyond its frames, at most (outer header, type, name, seq, count)
DATA_OVERHEAD = HEADER_SIZE + _NAME.size + MAX_NAME + _DATA.size


class ProtocolError(ValueError):
    """A message that breaks the acked protocol."""


@dataclass
class Message:
    """One decoded message; ``body`` is a view of the bytes after the name."""

    kind: bytes
    stream: str
    body: memoryview

    @property
    def seq(self) -> int:
        """RESUME's and ACK's sequence number, DATA's first one."""
        return _SEQ.unpack_from(self.body, 0)[0]

    @property
    def count(self) -> int:
        """DATA's number of frames."""
        return _DATA.unpack_from(self.body, 0)[1]

    @property
    def frames(self) -> memoryview:
        """DATA's frames, back to back."""
        return self.body[_DATA.size :]

    def hello(self) -> dict:
        try:
            fields = json.loads(bytes(self.body))
        except ValueError:
            raise ProtocolError(f"stream {self.stream!r}: HELLO is not JSON") from None
        if not isinstance(fields, dict) or fields.get("version") != VERSION:
            raise ProtocolError(
                f"stream {self.stream!r}: protocol version {fields.get('version')!r} "
                f"in HELLO, this side speaks {VERSION}"
            )
        return fields

    @property
    def reason(self) -> str:
        return bytes(self.body).decode("utf-8", "replace")


def _head(kind: bytes, stream: str, body_size: int) -> bytes:
    name = stream.encode("utf-8")
    if len(name) > MAX_NAME:
        raise ValueError(f"stream name {stream!r} is longer than {MAX_NAME} bytes")
    return HEADER.pack(_NAME.size + len(name) + body_size) + _NAME.pack(kind, len(name)) + name


def hello(stream: str, fingerprint: str) -> bytes:
    body = json.dumps({"version": VERSION, "fingerprint": fingerprint}).encode()
    return _head(HELLO, stream, len(body)) + body


def resume(stream: str, seq: int) -> bytes:
    return _head(RESUME, stream, _SEQ.size) + _SEQ.pack(seq)


def ack(stream: str, seq: int) -> bytes:
    return _head(ACK, stream, _SEQ.size) + _SEQ.pack(seq)


def refused(stream: str, reason: str) -> bytes:
    body = reason.encode("utf-8")
    return _head(REFUSED, stream, len(body)) + body


def data_head(stream: str, first_seq: int, count: int, frames_size: int) -> bytes:
    """A DATA message up to its frames; the frames (``frames_size`` bytes) follow it."""
    return _head(DATA, stream, _DATA.size + frames_size) + _DATA.pack(first_seq, count)


def data(stream: str, first_seq: int, count: int, frames) -> bytes:
    return data_head(stream, first_seq, count, len(frames)) + frames


def parse(payload) -> Message:
    """The message in a frame's ``payload`` (any bytes-like object); ProtocolError if malformed."""
    view = memoryview(payload).cast("B")
    if len(view) < _NAME.size:
        raise ProtocolError(f"a message of {len(view)} bytes is shorter than its header")
    kind, size = _NAME.unpack_from(view, 0)
    start = _NAME.size + size
    if start > len(view):
        raise ProtocolError("a message's stream name runs past its end")
    try:
        stream = bytes(view[_NAME.size : start]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("a stream name is not UTF-8") from None
    body = view[start:]
    need = {RESUME: _SEQ.size, ACK: _SEQ.size, DATA: _DATA.size}.get(kind, 0)
    if kind not in (HELLO, RESUME, DATA, ACK, REFUSED):
        raise ProtocolError(f"unknown message type {kind!r}")
    if len(body) < need:
        raise ProtocolError(f"a {kind.decode()} message of stream {stream!r} is cut short")
    return Message(kind, stream, body)


def frame_offsets(frames, count: int) -> list[int]:
    """Where each of ``count`` frames of a DATA message begins, and its end; ProtocolError
    unless the frames fill ``frames`` exactly."""
    offsets = [0]
    pos = 0
    for _ in range(count):
        if pos + HEADER_SIZE > len(frames):
            break
        pos += HEADER_SIZE + HEADER.unpack_from(frames, pos)[0]
        offsets.append(pos)
    if len(offsets) != count + 1 or pos != len(frames):
        raise ProtocolError(f"a DATA message announces {count} frames that do not fill it")
    return offsets


class AckedFile:
    """What an acked listener's file holds, read from its records: each stream's
    fingerprint and the sequence number it stands at, and where the last whole record
    ends (``end``; a torn record after it is cut off by whoever continues the file)."""

    def __init__(self) -> None:
        self.fingerprints: dict[str, str] = {}
        self.positions: dict[str, int] = {}
        self.end = 0
        self.torn = 0  # bytes after the last whole record

    @classmethod
    def scan(cls, f: BinaryIO) -> AckedFile:
        """Read the record headers of ``f`` (seekable) from its start; ValueError if it
        is not an acked file."""
        state = cls()
        f.seek(0, 2)
        size = f.tell()
        f.seek(0)
        head = f.read(HEADER_SIZE + len(FILE_MAGIC))
        if head != HEADER.pack(len(FILE_MAGIC)) + FILE_MAGIC:
            raise ValueError("not a file of `digitstream listen --acked`")
        pos = len(head)
        while pos + HEADER_SIZE <= size:
            f.seek(pos)
            prefix = f.read(HEADER_SIZE + _NAME.size + MAX_NAME + _DATA.size)
            (length,) = HEADER.unpack_from(prefix, 0)
            if pos + HEADER_SIZE + length > size:
                break
            if prefix[HEADER_SIZE : HEADER_SIZE + 1] == HELLO:
                f.seek(pos + HEADER_SIZE)
                record = f.read(length)
            else:  # a DATA record's header is all that is needed
                record = prefix[HEADER_SIZE : HEADER_SIZE + length]
            state.add(parse(record))
            pos += HEADER_SIZE + length
        state.end = pos
        state.torn = size - pos
        return state

    def add(self, message: Message) -> None:
        if message.kind == HELLO:
            self.fingerprints[message.stream] = message.hello()["fingerprint"]
            self.positions.setdefault(message.stream, 0)
        elif message.kind == DATA:
            self.positions[message.stream] = message.seq + message.count


def iter_file(f: BinaryIO, stream: str | None = None) -> Iterator[bytes]:
    """The result frames (headers included) of an acked file, in file order; only those of
    ``stream`` if given. Stops at a torn last record."""
    f.seek(HEADER_SIZE + len(FILE_MAGIC))
    while True:
        head = f.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE:
            return
        (length,) = HEADER.unpack(head)
        payload = f.read(length)
        if len(payload) < length:
            return
        message = parse(payload)
        if message.kind == DATA and (stream is None or message.stream == stream):
            yield bytes(message.frames)


def is_acked_file(f: BinaryIO) -> bool:
    start = f.tell()
    head = f.read(HEADER_SIZE + len(FILE_MAGIC))
    f.seek(start)
    return head == HEADER.pack(len(FILE_MAGIC)) + FILE_MAGIC
