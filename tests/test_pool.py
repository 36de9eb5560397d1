"""The local engine's worker processes (``--engine local --workers N``): real
processes over real socket pairs, driven by the engine alone and by ``run``.

Kill tests SIGKILL worker processes at moments from a seeded schedule; the seed
is printed, and ``DIGITSTREAM_KILL_SEED`` replays it.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from digitstream.batch import Batch
from digitstream.codecs.inputs import encode_images
from digitstream.engine.base import EngineOptions
from digitstream.engine.local import LocalEngine
from digitstream.pipeline import Flow, FlowOptions
from digitstream.wire.framing import Payloads, frame_many, split_frames
from helpers import Collector, send_bytes, wait_for
from pool_flows import POISON, STALL, DyingFlow, FaultyFlow, StallingFlow, recast

pytestmark = pytest.mark.timeout(120)

SEED = int(os.environ.get("DIGITSTREAM_KILL_SEED", str(random.SystemRandom().randrange(1 << 30))))
TESTS = str(Path(__file__).parent)
_READY = re.compile(r"worker process (\d+) \(pid (\d+)\) is ready")


@pytest.fixture
def importable_flows(monkeypatch):
    """Worker processes can import tests/pool_flows.py."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", TESTS if not path else f"{TESTS}{os.pathsep}{path}")


def _json_payloads(digits, n: int, start: int = 0) -> list[bytes]:
    rows = np.arange(start, start + n) % len(digits.X)
    return encode_images(digits.X[rows], "json", labels=digits.y[rows],
                         ids=[f"img-{i}" for i in range(start, start + n)])


def _flow(model_dir, input_format="json", output_format="json") -> Flow:
    from digitstream.model.bundle import load_bundle

    return Flow.build(load_bundle(model_dir).pipeline, FlowOptions(input_format, output_format))


def _batches(digits) -> list[Batch]:
    """Batches in each payload layout: places in a read buffer (json), a list, one array."""
    payloads = _json_payloads(digits, 600)
    payloads[7] = b'{"pixels": [1, 2'  # rejected in place
    payloads[300] = b"not json at all"
    data = np.frombuffer(frame_many(payloads), dtype=np.uint8)
    spans = [g for g in split_frames(data, 0, len(data))[0]]
    batches, seq = [], 0
    for group in spans:
        for first in range(0, len(group), 100):
            part = group.slice(first, first + 100)
            batches.append(Batch("camera-1", seq, part))
            seq += len(part)
    listed = Payloads(items=_json_payloads(digits, 50, 600) + [b""])
    batches.append(Batch(2, 0, listed))
    fixed = Payloads.from_list(_json_payloads(digits, 1) * 40)  # one length: the array form
    assert fixed.fixed is not None
    batches.append(Batch(3, 0, fixed))
    return batches


def _engine(flow: Flow, workers: int = 2, deadline: float = 2.0) -> LocalEngine:
    return LocalEngine(flow, None, EngineOptions(flow=FlowOptions("json", "json"),
                                                 workers=workers, batch_deadline=deadline))


async def _ready(engine: LocalEngine, workers: int = 2) -> None:
    deadline = time.monotonic() + 60
    while engine.state()["worker_processes"] < workers:
        assert time.monotonic() < deadline, "worker processes not ready within 60 s"
        await asyncio.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _worker_pids(engine: LocalEngine) -> list[int]:
    assert engine.pool is not None
    return [w.process.pid for w in engine.pool._workers.values()]


# ------------------------------------------------------------ the engine alone
def test_worker_processes_answer_as_the_flow_does_and_stop_with_the_engine(model_dir, digits):
    flow = _flow(model_dir)
    batches = _batches(digits)

    async def main():
        engine = _engine(flow)
        await engine.start()
        try:
            await _ready(engine)
            pids = _worker_pids(engine)
            capacity = engine.capacity
            futures = [await engine.submit(batch) for batch in batches]  # more than capacity
            results = [await future for future in futures]
            return results, engine.state(), pids, capacity
        finally:
            await engine.close()

    results, state, pids, capacity = asyncio.run(main())
    assert capacity == 4 and len(batches) > capacity
    assert state == {"worker_processes": 2, "in_process_batches": 0, "restarts": 0,
                     "late_kills": 0}
    for batch, result in zip(batches, results):
        local = flow.process(batch)
        assert (result.stream, result.first_seq, result.count) == (batch.stream,
                                                                  batch.first_seq, len(batch))
        assert result.output == local.output
        assert result.rejected == local.rejected
        assert (result.labelled, result.correct, result.confusion) == (
            local.labelled, local.correct, local.confusion)
        assert [name for name, _ in result.stage_seconds] == [n for n, _ in local.stage_seconds]
    assert sum(r.rejected.total() for r in results) == 3
    assert not any(_alive(pid) for pid in pids), "worker processes left after close"


def test_batches_are_answered_here_until_a_worker_is_ready(model_dir, digits):
    flow = _flow(model_dir)
    batch = _batches(digits)[0]

    async def main():
        engine = _engine(flow)
        await engine.start()
        try:
            first = await (await engine.submit(batch))  # right after start: no worker yet
            return first, engine.state()
        finally:
            await engine.close()

    first, state = asyncio.run(main())
    assert first.output == flow.process(batch).output
    assert state["in_process_batches"] == 1


def test_a_frame_that_kills_its_workers_is_answered_with_an_error_the_rest_classified(
        model_dir, digits, importable_flows):
    flow = recast(_flow(model_dir), DyingFlow)
    good = _batches(digits)[:3]
    poison = Batch("camera-1", 10_000, Payloads(items=[*_json_payloads(digits, 5), POISON,
                                                       *_json_payloads(digits, 2, 5)]))
    after = Batch("camera-1", 20_000, good[1].payloads)

    async def main():
        engine = _engine(flow)
        await engine.start()
        try:
            await _ready(engine)
            futures = [await engine.submit(b) for b in (good[0], poison, good[1], good[2])]
            results = [await future for future in futures]
            await _ready(engine)  # both started again
            here = engine.state()["in_process_batches"]
            later = await (await engine.submit(after))
            return results, here, later, engine.state()
        finally:
            await engine.close()

    results, here, later, state = asyncio.run(main())
    # the poison frame alone is answered with the error, at its place; the others classified
    answered = [t for _, t in _frames(results[1].output)]
    alone = [t for _, t in _frames(flow.process(poison).output)]
    assert len(answered) == len(poison)
    assert answered[:5] == alone[:5] and answered[6:] == alone[6:]
    assert b"engine failed: two worker processes were lost on this message" in answered[5]
    assert (results[1].first_seq, results[1].count) == (10_000, len(poison))
    assert results[1].rejected == {"engine": 1}
    for batch, result in zip((good[0], good[1], good[2]), (results[0], results[2], results[3])):
        assert result.output == flow.process(batch).output
    # halving: 8 frames lost twice, then 4, 2 and 1 once each
    assert state["restarts"] == 5, state
    # never tried in this process (it would have ended it), and the workers serve again
    assert later.output == flow.process(after).output
    assert state["in_process_batches"] == here


def test_a_worker_stuck_on_a_batch_is_killed_at_the_deadline_and_the_stream_goes_on(
        model_dir, digits, importable_flows):
    flow = recast(_flow(model_dir), StallingFlow)
    good = _batches(digits)[:3]
    stuck = Batch("camera-1", 10_000, Payloads(items=[*_json_payloads(digits, 3), STALL]))

    async def main():
        engine = _engine(flow, deadline=0.5)
        await engine.start()
        try:
            await _ready(engine)
            started = time.monotonic()
            futures = [await engine.submit(b) for b in (good[0], stuck, good[1], good[2])]
            results = [await future for future in futures]
            took = time.monotonic() - started
            await _ready(engine)
            return results, took, engine.state()
        finally:
            await engine.close()

    results, took, state = asyncio.run(main())
    answered = [t for _, t in _frames(results[1].output)]
    alone = [t for _, t in _frames(flow.process(stuck).output)]
    assert answered[:3] == alone[:3]
    assert b"engine failed: two worker processes were lost on this message" in answered[3]
    for batch, result in zip((good[0], good[1], good[2]), (results[0], results[2], results[3])):
        assert result.output == flow.process(batch).output
    # 4 frames past the deadline twice, then 2 and 1 once each: four deadlines, not an hour
    assert state["late_kills"] == 4 and state["restarts"] == 4, state
    assert 2.0 <= took < 40, took


def test_a_worker_that_cannot_answer_leaves_the_batch_to_this_process(
        model_dir, digits, importable_flows):
    flow = recast(_flow(model_dir), FaultyFlow)
    batches = _batches(digits)[:4]

    async def main():
        engine = _engine(flow)
        await engine.start()
        try:
            await _ready(engine)
            results = [await (await engine.submit(b)) for b in batches]
            return results, engine.state()
        finally:
            await engine.close()

    results, state = asyncio.run(main())
    for batch, result in zip(batches, results):
        assert result.output == flow.process(batch).output
    assert state == {"worker_processes": 2, "in_process_batches": 4, "restarts": 0,
                     "late_kills": 0}


def test_a_swap_changes_the_flow_between_two_batches(model_dir, digits):
    text, json_out = _flow(model_dir, output_format="text"), _flow(model_dir)
    batches = _batches(digits)[:6]

    async def main():
        engine = _engine(text)
        await engine.start()
        try:
            await _ready(engine)
            futures = [await engine.submit(b) for b in batches[:3]]
            await engine.set_flow(json_out, None)
            futures += [await engine.submit(b) for b in batches[3:]]
            return [await future for future in futures], engine.state()
        finally:
            await engine.close()

    results, state = asyncio.run(main())
    for i, (batch, result) in enumerate(zip(batches, results)):
        assert result.output == (text if i < 3 else json_out).process(batch).output, i
    assert state["in_process_batches"] == 0


def _frames(data: bytes):
    pos = 0
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        yield pos, data[pos + 4:pos + 4 + n]
        pos += 4 + n


# ------------------------------------------------------------ run
def _run_pids(app) -> dict[int, int]:
    """Worker index -> pid of its latest process that said it is ready."""
    return {int(i): int(pid) for i, pid in _READY.findall(app.log())}


def _reference(start_app, payload: bytes, expected: int) -> list[str]:
    sink = Collector()
    try:
        app = start_app(sink.port, "--input-format", "json", "--output-format", "json")
        send_bytes(app.in_port, payload)
        texts = sink.wait_count(expected, timeout=60)
        app.stop()
        return texts
    finally:
        sink.close()


def test_run_with_worker_processes_answers_as_without(start_app, digits):
    payloads = _json_payloads(digits, 5000)
    payloads[10], payloads[4000] = b"{broken", b'{"pixels": "no"}'
    payload = frame_many(payloads)
    reference = _reference(start_app, payload, len(payloads))
    sink = Collector()
    try:
        app = start_app(sink.port, "--input-format", "json", "--output-format", "json",
                        "--workers", "2", "--max-batch", "256")
        wait_for(lambda: app.stats()["cluster"]["worker_processes"] == 2, 60,
                 what="two worker processes")
        send_bytes(app.in_port, payload)
        texts = sink.wait_count(len(payloads), timeout=60)
        stats = app.stats()
        assert texts == reference
        assert stats["accuracy"]["labelled"] == len(payloads) - 2
        assert stats["cluster"]["in_process_batches"] == 0
        pids = list(_run_pids(app).values())
        assert len(pids) == 2 and all(map(_alive, pids))
        app.signal(signal.SIGTERM)
        assert app.wait(30) == 0
        wait_for(lambda: not any(map(_alive, pids)), 10, what="the worker processes to exit")
        assert sink.count() == len(payloads)
    finally:
        sink.close()


def test_a_stopped_worker_process_costs_its_deadline_and_nothing_is_lost(start_app, digits):
    # SIGSTOP: the worker neither answers nor dies; its socket stays open
    total = 30_000
    payloads = _json_payloads(digits, total)
    payload = frame_many(payloads)
    reference = _reference(start_app, payload, total)
    sink = Collector()
    stopped = None
    try:
        app = start_app(sink.port, "--input-format", "json", "--output-format", "json",
                        "--workers", "2", "--max-batch", "512", "--batch-deadline", "1")
        pids = wait_for(lambda: len(_run_pids(app)) == 2 and list(_run_pids(app).values()), 60,
                        what="two worker processes")
        sock = send_bytes(app.in_port, b"", close=False)
        half = len(frame_many(payloads[:total // 2]))
        sock.sendall(payload[:half])
        sink.wait_count(total // 10, timeout=60)
        stopped = pids[0]
        os.kill(stopped, signal.SIGSTOP)
        sock.sendall(payload[half:])
        sock.close()
        texts = sink.wait_count(total, timeout=60)
        assert sink.count() == total, "duplicate results"
        assert texts == reference
        wait_for(lambda: f"(pid {stopped}) did not answer" in app.log(), 10,
                 what="the late worker logged")
        assert not _alive(stopped), "the stopped worker was not killed"
        stats = app.stats()["cluster"]
        assert stats["late_kills"] >= 1, stats
    finally:
        if stopped is not None and _alive(stopped):
            os.kill(stopped, signal.SIGKILL)
        sink.close()


def test_run_killed_its_worker_processes_exit(start_app, digits):
    sink = Collector()
    try:
        app = start_app(sink.port, "--input-format", "json", "--workers", "2")
        pids = wait_for(lambda: len(_run_pids(app)) == 2 and list(_run_pids(app).values()), 60,
                        what="two worker processes")
        app.proc.kill()
        app.wait(10)
        wait_for(lambda: not any(map(_alive, pids)), 10,
                 what="the worker processes to exit after run was killed")
    finally:
        sink.close()


def test_worker_processes_killed_at_random_moments_lose_and_duplicate_nothing(start_app, digits):
    rng = random.Random(SEED)
    print(f"kill schedule seed {SEED} (DIGITSTREAM_KILL_SEED={SEED} replays it)")
    total = 40_000
    payloads = _json_payloads(digits, total)
    payload = frame_many(payloads)
    reference = _reference(start_app, payload, total)
    kills = sorted(rng.uniform(0.2, 2.5) for _ in range(3))
    sink = Collector()
    killed: list[int] = []
    try:
        app = start_app(sink.port, "--input-format", "json", "--output-format", "json",
                        "--workers", "2", "--max-batch", "512")
        wait_for(lambda: len(_run_pids(app)) == 2, 60, what="two worker processes")
        sock = send_bytes(app.in_port, b"", close=False)
        step = 1 << 16
        chunks = [payload[i:i + step] for i in range(0, len(payload), step)]
        pace = 3.0 / len(chunks)  # about three seconds of stream

        def send_paced():
            for chunk in chunks:
                sock.sendall(chunk)
                time.sleep(pace)
            sock.close()

        sender = threading.Thread(target=send_paced, daemon=True)
        start = time.monotonic()
        sender.start()
        for moment in kills:
            time.sleep(max(0.0, start + moment - time.monotonic()))
            alive = [pid for pid in _run_pids(app).values() if _alive(pid) and pid not in killed]
            if alive:
                victim = rng.choice(sorted(alive))
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
        sender.join(30)
        texts = sink.wait_count(total, timeout=60)
        assert killed, f"seed {SEED}: no worker process was killed"
        assert sink.count() == total, f"seed {SEED}: duplicate results"
        assert texts == reference, f"seed {SEED}: results differ from a run without workers"
        wait_for(lambda: f"(pid {killed[-1]}) lost" in app.log(), 10, what="the loss logged")
        # still serving, with its workers started again
        wait_for(lambda: app.stats()["cluster"]["worker_processes"] == 2, 60,
                 what="the worker processes started again")
        send_bytes(app.in_port, frame_many(payloads[:100]))
        assert sink.wait_count(total + 100, timeout=30)[total:] == reference[:100]
    finally:
        sink.close()
