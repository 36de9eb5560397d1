"""What ``digitstream run`` is told: every option with its default, in one place.

The command line takes its defaults from :class:`AppConfig`, so they are written
down once. Kept free of heavy imports: ``digitstream --help`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from digitstream.addresses import Address

DEFAULT_IN = "127.0.0.1:8002"
DEFAULT_OUT = "127.0.0.1:7002"
DEFAULT_METRICS = Address("127.0.0.1", 5001)


@dataclass
class AppConfig:
    #: where input comes from: ``HOST:PORT`` or a URL whose scheme names the connector
    in_addr: str | Address = DEFAULT_IN
    #: where results go, the same way
    out_addr: str | Address = DEFAULT_OUT
    metrics_addr: Address | None = DEFAULT_METRICS
    model_path: str = "models"
    input_format: str = "auto"
    output_format: str = "text"
    engine: str = "local"
    workers: int | None = None
    scheduler: str | None = None
    #: seconds a batch may take on the Dask cluster before it is computed here (0: no limit)
    batch_deadline: float = 2.0
    #: TLS to the Dask scheduler: CA file, this client's certificate and key (PEM files)
    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: also the consumer's name in a broker's consumer group: unique per process of a group
    name: str = "worker-1"
    #: the connectors' flags given to ``run`` (``--group``, ``--max-connections``), by option
    #: name; a connector takes those it declares, and a URL's own parameters win over them
    connector_options: dict[str, Any] = field(default_factory=dict)
    #: measured best for 64-pixel images: smaller adds per-batch overhead, larger leaves the cache
    max_batch: int = 8192
    #: seconds a batch may wait to fill (0: never wait)
    max_delay: float = 0.0
    max_frame: int = 1 << 20
    compile_model: bool = True
    #: batches in flight per Dask worker
    in_flight: int = 4
    #: how often the --model path is checked for a new bundle, in seconds (0: only on SIGHUP)
    model_poll: float = 0.5
    #: on a stop signal, keep reading a connection until it is quiet this long ...
    drain_quiet: float = 0.2
    #: ... but no longer than this
    drain_grace: float = 5.0
    #: how long to wait for the listener to take the last results on a stop signal
    flush_timeout: float = 30.0
    #: acknowledged, exactly-once delivery: ``send --acked`` in, ``listen --acked`` out
    acked: bool = False
    #: judge drift against the model's reference profile (digitstream.monitor)
    drift: bool = True
    #: the drift window: at least this many messages ...
    drift_window: int = 20_000
    #: ... none older than this many seconds
    drift_seconds: float = 60.0
    #: where labels that arrive later come from (``HOST:PORT`` or a URL, as ``in_addr``)
    labels: str | Address | None = None
    #: the most predictions awaiting a late label
    label_window: int = 100_000
    #: a second bundle scored on the same batches, off the served path
    shadow: str | None = None


DEFAULTS = AppConfig()


def default(name: str):
    """The default of one :class:`AppConfig` field, for the command line."""
    if name not in {f.name for f in fields(AppConfig)}:
        raise KeyError(name)
    return getattr(DEFAULTS, name)
