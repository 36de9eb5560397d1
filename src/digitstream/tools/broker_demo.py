"""``digitstream demo --kafka URL``: the whole flow through a broker the user names.

1. trains the model if it is missing;
2. publishes the digits to the URL's topic (stream) as labelled json payloads, each
   with its id, through the connector's own publisher (``send``);
3. starts two ``digitstream run`` processes of one consumer group, reading the URL and
   writing ``TOPIC-results`` on the same broker;
4. half-way, kills one of them (SIGKILL) and starts it again with the same command;
5. reads the results back (``listen``, read_committed for Kafka) and prints a summary:
   inputs, results, duplicates and missing (both 0 when the connector keeps its word),
   accuracy against the true labels, and the time it took.

It works for any broker whose connector has a publisher and a result reader: the
registry says which.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from digitstream.codecs.inputs import encode_images
from digitstream.connectors import registry
from digitstream.connectors.kit import Endpoint
from digitstream.datasets import load_dataset
from digitstream.errors import UserError
from digitstream.tools.demo import ensure_model

#: how long the results may take to come, in all
WAIT_SECONDS = 300.0


def _results_url(endpoint: Endpoint) -> Endpoint:
    """``TOPIC-results`` on the same broker, with the same options."""
    location, _, name = endpoint.location.rpartition("/")
    return Endpoint(endpoint.scheme, f"{location}/{name}-results", endpoint.query)


def _run(model: Path, in_url: str, out_url: str, group: str, name: str, log: Path):
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "digitstream.cli",
                "run",
                "--in",
                in_url,
                "--out",
                out_url,
                "--group",
                group,
                "--name",
                name,
                "--input-format",
                "json",
                "--output-format",
                "json",
                "--model",
                str(model),
                "--no-metrics",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def main(url: str, model_path: str = "models", repeat: int = 1) -> int:
    console = Console(stderr=True)
    connector, endpoint = registry.broker(url, "send")
    if connector.publisher is None or connector.result_reader is None:
        raise UserError(f"{endpoint.scheme}:// is not a broker this demo can use")
    model = ensure_model(console, Path(model_path))
    data = load_dataset("digits")
    n = len(data.X) * repeat
    ids = [f"d{i}" for i in range(n)]
    labels = [int(data.y[i % len(data.y)]) for i in range(n)]
    payloads = encode_images(
        data.X[[i % len(data.X) for i in range(n)]], "json", labels=labels, ids=ids
    )
    results_endpoint = _results_url(endpoint)
    group = f"demo-{uuid.uuid4().hex[:8]}"
    logs = Path(tempfile.mkdtemp(prefix="digitstream-demo-"))
    started = time.perf_counter()
    publisher = connector.publisher(endpoint)
    try:
        for start in range(0, n, 10_000):
            stop = min(n, start + 10_000)
            publisher.publish(
                payloads[start:stop],
                [str(label).encode() for label in labels[start:stop]],
                [i.encode() for i in ids[start:stop]],
            )
    finally:
        publisher.close()
    console.print(f"published {n:,} digits to {endpoint}")
    # run's source and the result reader take the URLs without what only a publisher or a
    # sink takes (partitions)
    source_query = {k: v for k, v in endpoint.query.items() if k != "partitions"}
    in_url = Endpoint(endpoint.scheme, endpoint.location, source_query).url
    out_url = results_endpoint.url
    results_endpoint = Endpoint(results_endpoint.scheme, results_endpoint.location, source_query)
    runs = [_run(model, in_url, out_url, group, f"demo-{k}", logs / f"run-{k}.log") for k in (1, 2)]
    found: list[dict] = []
    killed = False
    reader = None
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while len(found) < n and time.monotonic() < deadline:
            if all(run.poll() is not None for run in runs):
                raise UserError(f"the runs exited; their logs are in {logs}")
            if reader is None:
                try:
                    reader = connector.result_reader(results_endpoint)
                except UserError:  # no results yet: the run makes the topic
                    time.sleep(0.5)
                    continue
            found += [json.loads(r) for r in reader.read(10_000, 0.5)]
            if not killed and len(found) >= n // 2:
                runs[1].send_signal(signal.SIGKILL)
                runs[1].wait(timeout=30)
                runs[1] = _run(model, in_url, out_url, group, "demo-2", logs / "run-2.log")
                killed = True
                console.print(
                    f"killed a run (SIGKILL) after {len(found):,} results, and started it again"
                )
        time.sleep(2.0)  # a duplicate would come now, if at all
        if reader is not None:
            found += [json.loads(r) for r in reader.read(10_000, 0.5)]
    finally:
        if reader is not None:
            reader.close()
        for run in runs:
            if run.poll() is None:
                run.send_signal(signal.SIGTERM)
        for run in runs:
            try:
                run.wait(timeout=30)
            except subprocess.TimeoutExpired:
                run.kill()
    seconds = time.perf_counter() - started
    seen = Counter(r.get("id") for r in found)
    truth = dict(zip(ids, labels))
    correct = sum(1 for r in found if truth.get(str(r.get("id"))) == r.get("label"))
    table = Table(
        title=f"demo through {endpoint}", title_justify="left", show_header=False, box=None
    )
    for name, value in (
        ("inputs", f"{n:,}"),
        ("results", f"{len(found):,}"),
        ("duplicates", f"{sum(c - 1 for c in seen.values() if c > 1):,}"),
        ("missing", f"{sum(1 for i in ids if i not in seen):,}"),
        ("accuracy", f"{correct / max(len(found), 1):.4f}"),
        ("time", f"{seconds:.1f} s (two runs of one group, one killed half-way)"),
        ("results in", str(results_endpoint)),
        ("logs", str(logs)),
    ):
        table.add_row(name, value)
    Console().print(table)
    return 0 if len(seen) == n and len(found) == n else 1
