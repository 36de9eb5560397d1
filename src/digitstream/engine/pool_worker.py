"""One worker process of the local engine's pool (:mod:`digitstream.engine.pool`).

Started by the pool as ``python -m digitstream.engine.pool_worker FD``, where FD is
this process's end of a socket pair. It serves the messages of
:mod:`digitstream.engine.pool` until the pool closes its end (or dies, which
closes it too), then exits.
"""

from __future__ import annotations

import pickle
import signal
import sys
from multiprocessing.connection import Connection

import numpy as np
from threadpoolctl import threadpool_limits

from digitstream.batch import Batch
from digitstream.engine.pool import BATCH, FLOW, READY, payloads_of
from digitstream.memory import keep_batch_memory
from digitstream.pipeline import Flow

#: flows kept by generation: a batch submitted before a swap may still be on its way
KEPT_FLOWS = 4


def serve(conn: Connection) -> None:
    flows: dict[int, Flow] = {}
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the pool closed its end, or its process is gone
        kind, body = message[:1], message[1:]
        if kind == FLOW:
            generation, flow = pickle.loads(body)
            flows[generation] = flow
            for old in sorted(flows)[:-KEPT_FLOWS]:
                del flows[old]
            conn.send_bytes(READY + pickle.dumps(generation))
            continue
        if kind != BATCH:
            raise SystemExit(f"unknown message {kind!r} from the pool")
        generation, job, stream, first_seq, layout = pickle.loads(body)
        blob = conn.recv_bytes()
        flow = flows.get(generation)
        if flow is None:
            answer: tuple = (job, None, f"model generation {generation} is not loaded here")
        else:
            try:
                payloads = payloads_of(layout, np.frombuffer(blob, dtype=np.uint8))
                answer = (job, flow.process(Batch(stream, first_seq, payloads)), "")
            except Exception as exc:  # Flow.process answers every frame; this is a bug
                answer = (job, None, f"{type(exc).__name__}: {exc}")
        conn.send_bytes(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))


def main() -> None:
    # Ctrl-C in a terminal reaches the whole process group: the pool stops this process
    # itself, once the application has answered what it received
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_batch_memory()

    threadpool_limits(1)
    serve(Connection(int(sys.argv[1])))


if __name__ == "__main__":
    main()
