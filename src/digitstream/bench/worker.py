"""The benchmark's sender and listener, each a process of its own.

``python -m digitstream.bench.worker send|listen DIR`` starts one; the runner
keeps one of each for a whole benchmark and drives it with one JSON object per
line on its stdin, and reads one JSON object per line from its stdout.
Timelines are written as ``.npy`` files into DIR.

Sender requests::

    {"cmd": "send", "to": "127.0.0.1:PORT", "format": "u8", "messages": N,
     "rate": null | MSGS_PER_S, "timeline": false}
    -> {"start_ns": ..., "end_ns": ..., "messages": N, "bytes": ..., "timeline": PATH | null}
       or {"error": "..."}

Listener requests::

    {"cmd": "expect", "messages": N, "timeout": SECONDS, "timeline": false}
    -> {"armed": FRAMES_SO_FAR}      at once, then when N more frames are in:
    -> {"ok": true, "frames": N, "first_ns": ..., "last_ns": ..., "timeline": PATH | null}
    {"cmd": "cancel"}                ends a pending expect with ok false

``{"cmd": "quit"}`` ends either. The listener first prints ``{"port": PORT}``.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from pathlib import Path
from typing import overload

import numpy as np

from digitstream.addresses import Address, parse_address
from digitstream.errors import UserError
from digitstream.tools.listener import Listener
from digitstream.tools.sender import Plan, build_frames, send_frames


class JsonLines:
    """One JSON object per line over a pair of file descriptors.

    Reads go straight to the descriptor (no buffered reader that could hold a
    line where ``select`` cannot see it), so a read can have a deadline.
    """

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._buf = b""

    def write(self, obj: dict) -> None:
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(self.write_fd, data) :]

    @overload
    def read(self, timeout: None = None) -> dict: ...
    @overload
    def read(self, timeout: float | None) -> dict | None: ...
    def read(self, timeout: float | None = None) -> dict | None:
        """The next object; None if none came within ``timeout``. EOFError at end of stream."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.read_fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(self.read_fd, 1 << 16)
            if not chunk:
                raise EOFError("the other side closed the channel")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)


def _save_timeline(directory: Path, name: str, pairs) -> str:
    path = directory / f"{name}-{time.monotonic_ns()}.npy"
    np.save(path, np.asarray(pairs, dtype=np.int64).reshape(-1, 2))
    return str(path)


# -------------------------------------------------------------------- sender
def exact_plan(framed, messages: int):
    """A plan of exactly ``messages`` frames: the data set over and over, then a part of it."""
    whole, rest = divmod(messages, len(framed))
    parts = []
    if whole:
        parts.append((framed, whole))
    if rest:
        parts.append((framed.slice(0, rest), 1))
    return Plan(tuple(parts))


def serve_sender(channel: JsonLines, directory: Path) -> None:
    frames = {}
    while True:
        request = channel.read()
        if request["cmd"] == "quit":
            return
        fmt = request["format"]
        if fmt not in frames:
            frames[fmt] = build_frames("digits", fmt)
        plan = exact_plan(frames[fmt], int(request["messages"]))
        start_ns = time.perf_counter_ns()
        try:
            stats = send_frames(
                parse_address(request["to"]),
                [plan],
                rate=request.get("rate"),
                record_times=bool(request.get("timeline")),
            )
        except UserError as exc:
            channel.write({"error": str(exc)})
            continue
        end_ns = time.perf_counter_ns()
        timeline = (
            _save_timeline(directory, "sent", stats.timelines[0])
            if stats.timelines is not None
            else None
        )
        channel.write(
            {
                "start_ns": start_ns,
                "end_ns": end_ns,
                "messages": stats.messages,
                "bytes": stats.bytes,
                "timeline": timeline,
            }
        )


# ------------------------------------------------------------------ listener
def serve_listener(channel: JsonLines, directory: Path) -> None:
    listener = Listener(Address("127.0.0.1", 0), record_times=True).start()
    channel.write({"port": listener.port})
    try:
        while True:
            request = channel.read()
            if request["cmd"] == "quit":
                return
            if request["cmd"] == "expect":
                _expect(listener, channel, directory, request)
    finally:
        listener.stop()


def _expect(listener, channel: JsonLines, directory: Path, request: dict) -> None:
    mark = listener.frames
    first_entry = len(listener.timeline)
    channel.write({"armed": mark})
    target = mark + int(request["messages"])
    deadline = time.monotonic() + float(request.get("timeout", 600))
    ok = False
    while time.monotonic() < deadline:
        if listener.wait(target, timeout=0.05):
            ok = listener.frames >= target
            break
        pending = channel.read(timeout=0)
        if pending is not None and pending.get("cmd") == "cancel":
            break
    entries = np.asarray(listener.timeline[first_entry:], dtype=np.int64).reshape(-1, 2)
    entries[:, 1] -= mark
    reply = {
        "ok": ok,
        "frames": listener.frames - mark,
        "first_ns": None,
        "last_ns": None,
        "timeline": None,
    }
    if len(entries):
        reply["first_ns"] = int(entries[0, 0])
        done = np.searchsorted(entries[:, 1], target - mark, side="left")
        reply["last_ns"] = int(entries[min(done, len(entries) - 1), 0])
    if request.get("timeline"):
        reply["timeline"] = _save_timeline(directory, "received", entries)
    channel.write(reply)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("send", "listen"):
        print("usage: python -m digitstream.bench.worker send|listen DIR", file=sys.stderr)
        return 2
    role, directory = argv[0], Path(argv[1])
    # replies go on the real stdout; anything else that prints must not corrupt them
    out_fd = os.dup(1)
    os.dup2(2, 1)
    channel = JsonLines(0, out_fd)
    try:
        (serve_sender if role == "send" else serve_listener)(channel, directory)
    except EOFError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
