"""What runs on a Dask worker: the model plugin, the flows built from it, the task.

Everything here is sent to the workers by reference (module and name), so a
worker needs digitstream installed, nothing else of the run.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from digitstream.batch import Batch, BatchResult, StreamId
from digitstream.engine.dask.logs import log
from digitstream.engine.dask.packing import unpack
from digitstream.model.bundle import Bundle, load_bundle
from digitstream.pipeline import Flow, FlowOptions

try:
    from distributed import WorkerPlugin
except ImportError:  # pragma: no cover - the engine is unusable, start() says so
    WorkerPlugin = object  # type: ignore[misc,assignment]


@dataclass(frozen=True)
class FlowSpec:
    """What a worker needs to build the run's :class:`Flow` from a loaded model."""

    content_hash: str
    input_format: str
    output_format: str
    compile_model: bool
    drift: bool = True
    predictions: bool = False

    @classmethod
    def of(cls, content_hash: str, options: FlowOptions) -> FlowSpec:
        """The spec of the run's flow ``options`` serving the model ``content_hash``."""
        return cls(
            content_hash,
            options.input_format,
            options.output_format,
            options.compile_model,
            options.drift,
            options.predictions,
        )

    def serving(self, content_hash: str) -> FlowSpec:
        """The same flow, serving another model."""
        return replace(self, content_hash=content_hash)

    def options(self, worker: str) -> FlowOptions:
        return FlowOptions(
            self.input_format,
            self.output_format,
            self.compile_model,
            worker=worker,
            drift=self.drift,
            predictions=self.predictions,
        )


class _WorkerState:
    """Models and flows of this process, shared by the worker's threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bundles: dict[str, Bundle] = {}  # content hash -> loaded Bundle
        self.users: Counter = Counter()  # content hash -> plugins (runs) using it
        self.flows: dict[FlowSpec, Flow] = {}
        self.loads: Counter = Counter()  # content hash -> times loaded from bytes


_STATE = _WorkerState()


def model_loads() -> dict[str, int]:
    """How many times this process loaded each model (by content hash).

    Run it on every worker with ``client.run(model_loads)``.
    """
    with _STATE.lock:
        return dict(_STATE.loads)


def worker_label(name, address: str) -> str:
    """A worker's name in results and metrics: the name it was given, else its address."""
    if isinstance(name, str) and name and name != address and not name.isdigit():
        return name
    return address


def _hex(content_hash: str) -> str:
    return content_hash.rpartition(":")[2]


class ModelPlugin(WorkerPlugin):
    """Carries a model bundle's files to every worker and loads them there, once."""

    def __init__(self, name: str, content_hash: str, files: dict[str, bytes], entry: str):
        self.name = name
        self.content_hash = content_hash
        self.files = files  # file name -> bytes
        self.entry = entry  # "" for a bundle directory, else the file to load
        self.loaded = False

    def setup(self, worker) -> None:
        with _STATE.lock:
            if self.content_hash not in _STATE.bundles:
                _STATE.bundles[self.content_hash] = self._load(Path(worker.local_directory))
                _STATE.loads[self.content_hash] += 1
            _STATE.users[self.content_hash] += 1
            self.loaded = True

    def teardown(self, worker) -> None:
        # Dask tears down a plugin whose setup failed too: that one holds no model, and
        # must not release one that another plugin (a model swapped back in) holds
        if not self.loaded:
            return
        with _STATE.lock:
            _STATE.users[self.content_hash] -= 1
            if _STATE.users[self.content_hash] <= 0:
                del _STATE.users[self.content_hash]
                _STATE.bundles.pop(self.content_hash, None)
                for spec in [s for s in _STATE.flows if s.content_hash == self.content_hash]:
                    del _STATE.flows[spec]

    def _load(self, local_directory: Path) -> Bundle:
        directory = local_directory / "digitstream-models" / _hex(self.content_hash)[:32]
        directory.mkdir(parents=True, exist_ok=True)
        for file_name, data in self.files.items():
            target = directory / Path(file_name).name  # names only: nothing escapes the directory
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        bundle = load_bundle(str(directory / self.entry) if self.entry else str(directory))
        if bundle.content_hash != self.content_hash:
            raise ValueError(
                f"the model loaded on this worker has content hash "
                f"{bundle.content_hash}, the application's has {self.content_hash}"
            )
        log.info("model %s loaded on this worker", _hex(self.content_hash)[:12])
        return bundle


def _worker_flow(spec: FlowSpec) -> Flow:
    flow = _STATE.flows.get(spec)
    if flow is not None:
        return flow
    # optional dependency: distributed (the dask extra)
    from distributed import get_worker

    worker = get_worker()
    with _STATE.lock:
        flow = _STATE.flows.get(spec)
        if flow is None:
            bundle = _STATE.bundles.get(spec.content_hash)
            if bundle is None:
                # the plugin's setup failed or has not run here: say so, the task is retried
                raise RuntimeError(
                    f"model {_hex(spec.content_hash)[:12]} is not loaded on worker "
                    f"{worker.address} (see that worker's log)"
                )
            label = worker_label(worker.name, worker.address)
            flow = Flow.build(bundle.pipeline, spec.options(label), bundle.profile)
            _STATE.flows[spec] = flow
    return flow


def dask_setup(worker) -> None:
    """Preload of the local cluster's worker processes (``--workers``): ignore SIGINT.

    Ctrl-C in a terminal reaches the whole process group, these workers too;
    ``run`` then answers what it received, which needs them, and stops them itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def classify(spec: FlowSpec, stream: StreamId, first_seq: int, packed) -> BatchResult:
    """The task: one batch through the run's flow on this worker."""
    flow = _worker_flow(spec)
    return flow.process(Batch(stream, first_seq, unpack(packed)))
