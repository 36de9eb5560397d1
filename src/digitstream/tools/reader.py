"""The reader: result frames from a file, printed one per line.

Reads what ``digitstream listen -o FILE`` stores and what
``nc -l 127.0.0.1 7002 > FILE`` stored (the same bytes). The file is streamed
in large pieces and each piece's frames are turned into lines in one go, so a
file of a billion bytes prints at the speed of the terminal or pipe.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import numpy as np

from digitstream.errors import UserError
from digitstream.wire import acked
from digitstream.wire.framing import HEADER, HEADER_SIZE, FrameSplitter, FrameTooLarge, Payloads

CHUNK_SIZE = 1 << 20
#: results are a few bytes; a longer length header means the bytes are not result frames
MAX_RESULT_FRAME = 64 << 20


class TruncatedFrame(ValueError):
    """The input ended inside a frame."""

    def __init__(self, offset: int, have: int, need: int | None):
        expected = f"of the {need:,} it announces" if need is not None else "of its 4-byte header"
        super().__init__(
            f"the last frame, at byte {offset:,}, is cut short: {have:,} bytes {expected}"
        )
        self.offset = offset


class NotResultFrames(ValueError):
    """A length header no result frame can have: the input is not (or no longer) result frames."""

    def __init__(self, offset: int, length: int):
        super().__init__(
            f"the frame header at byte {offset:,} announces {length:,} bytes: "
            f"not a file of result frames from here on"
        )
        self.offset = offset


def iter_results(f: BinaryIO, chunk_size: int = CHUNK_SIZE) -> Iterator[Payloads]:
    """Every complete frame payload of a seekable binary file, in groups.

    After the last complete frame, raises :class:`TruncatedFrame` if the file
    ends inside a frame, or :class:`NotResultFrames` at a header longer than
    :data:`MAX_RESULT_FRAME`.
    """
    splitter = FrameSplitter(max_frame=MAX_RESULT_FRAME)
    consumed = 0  # bytes of the complete frames yielded so far
    while chunk := f.read(chunk_size):
        try:
            groups = splitter.feed(chunk)
        except FrameTooLarge:
            # the frames of this piece before the bad header are still good: walk them one by one
            end = f.tell()
            f.seek(consumed)
            yield from _frames_before_bad_header(f.read(end - consumed), consumed)
            raise AssertionError(  # pragma: no cover
                "unreachable: the bad header was not found again"
            ) from None
        for group in groups:
            consumed += group.nbytes
        yield from groups
    if splitter.pending:
        f.seek(consumed)
        head = f.read(HEADER_SIZE)
        need = HEADER.unpack(head)[0] if len(head) == HEADER_SIZE else None
        raise TruncatedFrame(
            consumed, splitter.pending - HEADER_SIZE if need is not None else splitter.pending, need
        )


def _frames_before_bad_header(data: bytes, offset: int) -> Iterator[Payloads]:
    pos = 0
    items: list[bytes] = []
    while pos + HEADER_SIZE <= len(data):
        (length,) = HEADER.unpack_from(data, pos)
        if length > MAX_RESULT_FRAME:
            if items:
                yield Payloads(items=items)
            raise NotResultFrames(offset + pos, length)
        items.append(data[pos + HEADER_SIZE : pos + HEADER_SIZE + length])
        pos += HEADER_SIZE + length


def write_lines(groups: Iterable[Payloads], out: BinaryIO) -> int:
    """Write each payload as one UTF-8 line (bad bytes replaced); return how many."""
    count = 0
    for group in groups:
        if group.fixed is not None:
            rows = group.fixed
            lines = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.uint8)
            lines[:, :-1] = rows
            lines[:, -1] = ord("\n")
            block = lines.tobytes()
        else:
            block = b"\n".join(group.to_list()) + b"\n"
        try:
            block.decode("utf-8")
        except UnicodeDecodeError:
            # each line ends in an ASCII newline, so a bad sequence never spans two results
            block = block.decode("utf-8", "replace").encode("utf-8")
        out.write(block)
        count += len(group)
    return count


def main(file: str, stream: str | None = None) -> int:
    """``digitstream read FILE``: returns the exit status."""
    out = sys.stdout.buffer
    try:
        with open(file, "rb") as f:
            if acked.is_acked_file(f):
                for frames in acked.iter_file(f, stream):
                    write_lines(FrameSplitter(MAX_RESULT_FRAME).feed(frames), out)
                out.flush()
                return 0
            if stream is not None:
                raise UserError(f"{file} is not a file of `listen --acked`: it has no streams")
            try:
                write_lines(iter_results(f), out)
            except (TruncatedFrame, NotResultFrames) as exc:
                out.flush()
                print(f"warning: {file}: {exc}", file=sys.stderr)
                return 1
        out.flush()
    except BrokenPipeError:
        # the reader of our output (e.g. `head`) has gone: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        raise UserError(f"cannot read {file}: {exc.strerror or exc}") from None
    return 0
