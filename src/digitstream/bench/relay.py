"""The ceiling: a relay that forwards frames untouched, with no decoding and no model.

It does what any server on this wire must do at the least: read large chunks,
cut them at frame boundaries (with the same :class:`FrameSplitter` the
application uses) and write the whole frames on to the listener, byte for
byte, one write per read. Whatever rate it reaches is the most loopback,
framing and the sender and listener processes allow on this machine.

``python -m digitstream.bench.relay --in HOST:PORT --out HOST:PORT``
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading

from digitstream.addresses import parse_address
from digitstream.bench.baseline import connect_with_retry
from digitstream.wire.framing import FrameSplitter

READ_SIZE = 1 << 20
MAX_FRAME = 64 << 20


def forward(conn: socket.socket, out: socket.socket, lock: threading.Lock) -> int:
    """Forward every whole frame of ``conn`` to ``out``; the number of frames.

    Writes hold ``lock`` so frames of several connections never interleave
    inside a frame.
    """
    splitter = FrameSplitter(max_frame=MAX_FRAME)
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    held = b""
    frames = 0
    with conn:
        while True:
            n = conn.recv_into(buf)
            if n == 0:
                return frames
            groups = splitter.feed(view[:n])
            if not groups:
                held += view[:n]
                continue
            chunk = held + view[:n] if held else view[:n]
            whole = sum(group.nbytes for group in groups)
            with lock:
                out.sendall(chunk[:whole])
            held = bytes(chunk[whole:])
            frames += sum(map(len, groups))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m digitstream.bench.relay", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--in", dest="in_addr", required=True, type=parse_address)
    parser.add_argument("--out", dest="out_addr", required=True, type=parse_address)
    args = parser.parse_args(argv)

    out = connect_with_retry(args.out_addr.host, args.out_addr.port)
    out.settimeout(None)
    # as the application's sink does: a short paced write must not wait for an ACK
    out.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lock = threading.Lock()
    server = socket.create_server((args.in_addr.host, args.in_addr.port), backlog=16)
    with server, out:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=forward, args=(conn, out, lock), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
