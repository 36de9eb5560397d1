"""The seed's design, reproduced for the benchmark: one message at a time.

What the Wallaroo example did per message, in the same order and with the same
calls: unpickle the payload, ``pca.transform([x])``, ``logistic.predict(...)``,
``str(...)`` of the prediction, frame it and write it. The model is the one
``digitstream run`` serves (the bundle's pipeline, step by step), so the only
difference measured is the design. One connection is served at a time, as the
seed's single worker with one Pony thread did.

The payloads here are the benchmark's own pickles, trusted input; that is why,
unlike ``digitstream run``, this server may call plain ``pickle.loads``.

``python -m digitstream.bench.baseline --in HOST:PORT --out HOST:PORT --model DIR``
"""

from __future__ import annotations

import argparse
import pickle
import socket
import struct
import sys
import time

from digitstream.addresses import parse_address
from digitstream.model.bundle import load_bundle

HEADER = struct.Struct(">I")


class SeedClassifier:
    """The seed's computations over a fitted pipeline: every step but the last
    transforms a one-image batch, the last predicts."""

    def __init__(self, pipeline):
        *transforms, (_, classifier) = pipeline.steps
        self.transforms = [step for _, step in transforms]
        self.classifier = classifier

    def __call__(self, payload: bytes) -> bytes:
        x = pickle.loads(payload)
        features = [x]
        for step in self.transforms:
            features = step.transform(features)
        prediction = self.classifier.predict(features)
        return str(prediction).encode()


def _read_exact(stream, n: int) -> bytes | None:
    data = stream.read(n)
    return data if len(data) == n else None


def serve_connection(conn: socket.socket, out: socket.socket, classify: SeedClassifier) -> int:
    """Answer every frame of ``conn`` on ``out``, one at a time; the frame count."""
    count = 0
    with conn, conn.makefile("rb") as stream:
        while True:
            header = _read_exact(stream, HEADER.size)
            if header is None:
                return count
            payload = _read_exact(stream, HEADER.unpack(header)[0])
            if payload is None:
                return count
            result = classify(payload)
            out.sendall(HEADER.pack(len(result)) + result)
            count += 1


def connect_with_retry(host: str, port: int, timeout: float = 30.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((host, port), timeout=timeout)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m digitstream.bench.baseline", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--in", dest="in_addr", required=True, type=parse_address)
    parser.add_argument("--out", dest="out_addr", required=True, type=parse_address)
    parser.add_argument("--model", required=True)
    args = parser.parse_args(argv)

    classify = SeedClassifier(load_bundle(args.model).pipeline)
    out = connect_with_retry(args.out_addr.host, args.out_addr.port)
    out.settimeout(None)
    server = socket.create_server((args.in_addr.host, args.in_addr.port), backlog=16)
    with server, out:
        while True:
            conn, _ = server.accept()
            serve_connection(conn, out, classify)


if __name__ == "__main__":
    sys.exit(main())
