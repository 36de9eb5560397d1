"""Connectors: one module per outside system, each a source, a sink or both.

``--in`` and ``--out`` take ``HOST:PORT`` (TCP) or a URL whose scheme names the
connector. A connector's source class implements :class:`~digitstream.sources.Source`
and its sink class :class:`~digitstream.sinks.Sink`; each has a ``from_config``
class method taking what follows the scheme (``HOST:PORT`` for ``tcp://HOST:PORT``),
the run's :class:`~digitstream.config.AppConfig` and, for a source, the metrics
recorder. Adding a connector is its module and a line in each table below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from digitstream.addresses import Address
from digitstream.errors import UserError

#: URL scheme -> "module:class" of its source
SOURCES = {
    "tcp": "digitstream.connectors.tcp:TcpSource",
    "redis": "digitstream.connectors.redis:RedisSource",
    "rediss": "digitstream.connectors.redis:RedisTlsSource",
}
#: URL scheme -> "module:class" of its sink
SINKS = {
    "tcp": "digitstream.connectors.tcp:TcpSink",
    "redis": "digitstream.connectors.redis:RedisSink",
    "rediss": "digitstream.connectors.redis:RedisTlsSink",
}
#: the scheme of an endpoint written without one
DEFAULT_SCHEME = "tcp"
#: ``run --acked``: URL scheme -> "module:class" of its acknowledged source and sink
ACKED_SOURCES = {"tcp": "digitstream.connectors.acked:AckedTcpSource"}
ACKED_SINKS = {"tcp": "digitstream.connectors.acked:AckedTcpSink"}


@dataclass(frozen=True)
class Endpoint:
    """An ``--in`` or ``--out`` value: the connector's scheme and what follows ``scheme://``."""

    scheme: str
    location: str

    def __str__(self) -> str:
        if self.scheme == DEFAULT_SCHEME:
            return self.location
        # what logs and error messages show: a password in the URL is masked
        head, at, tail = self.location.rpartition("@")
        user, colon, _ = head.partition(":")
        location = f"{user}:***@{tail}" if at and colon else self.location
        return f"{self.scheme}://{location}"


def parse_endpoint(value: str | Address | Endpoint, table: dict[str, str] = SOURCES) -> Endpoint:
    """``HOST:PORT`` or ``scheme://...``; UserError naming the known schemes for another."""
    if isinstance(value, Endpoint):
        return value
    if isinstance(value, Address):
        return Endpoint(DEFAULT_SCHEME, str(value))
    text = value.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        return Endpoint(DEFAULT_SCHEME, text)
    scheme = scheme.lower()
    if scheme not in table:
        raise UserError(
            f"unknown scheme {scheme!r} in {text!r}; known: "
            f"{', '.join(f'{s}://' for s in table)} (or HOST:PORT for tcp)"
        )
    return Endpoint(scheme, rest)


def _load(path: str):
    module_name, _, class_name = path.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def _class_for(endpoint: Endpoint, table: dict[str, str], acked_table: dict[str, str], config):
    if not getattr(config, "acked", False):
        return _load(table[endpoint.scheme])
    if endpoint.scheme not in acked_table:
        raise UserError(f"--acked works with {', '.join(acked_table)} endpoints, not {endpoint}")
    return _load(acked_table[endpoint.scheme])


def make_source(value, config, metrics=None):
    endpoint = parse_endpoint(value, SOURCES)
    cls = _class_for(endpoint, SOURCES, ACKED_SOURCES, config)
    return cls.from_config(endpoint.location, config, metrics)


def make_sink(value, config):
    endpoint = parse_endpoint(value, SINKS)
    return _class_for(endpoint, SINKS, ACKED_SINKS, config).from_config(endpoint.location, config)
