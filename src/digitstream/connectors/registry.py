"""Every connector, by the URL schemes that name it: adding one is its module and a line here.

``--in`` and ``--out`` name a connector by the scheme of their URL (``HOST:PORT`` is
TCP). What is built from an endpoint, and what the command line offers (the
schemes of ``--in`` and ``--out``, the connector flags of ``run``, the brokers of
``send`` and ``listen``), all comes from :data:`CONNECTORS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from digitstream.addresses import Address
from digitstream.config import AppConfig
from digitstream.connectors import acked, kafka, nats, redis
from digitstream.connectors.kit import Connector, Endpoint, Option, resolve_options
from digitstream.errors import UserError
from digitstream.sinks import Sink
from digitstream.sources import Source

CONNECTORS: tuple[Connector, ...] = (
    acked.CONNECTOR,  # tcp:// and HOST:PORT, with the parts of run --acked
    redis.CONNECTOR,
    nats.CONNECTOR,
    kafka.CONNECTOR,
)

BY_SCHEME: dict[str, Connector] = {
    scheme: connector for connector in CONNECTORS for scheme in connector.schemes
}


def schemes(role: str) -> list[str]:
    """The schemes that name a connector with a ``role`` (``source`` or ``sink``)."""
    return [s for s, c in BY_SCHEME.items() if c.part(role) is not None]


def parse(value: str | Endpoint | Address, role: str) -> Endpoint:
    """An ``--in`` (role ``source``) or ``--out`` (``sink``) value; UserError for a scheme
    no connector of that role has."""
    return Endpoint.parse(value, dict.fromkeys(schemes(role)))


def part(endpoint: Endpoint, role: str, acked: bool = False) -> type[Source] | type[Sink]:
    """The class ``endpoint`` names for ``role``; UserError if ``--acked`` asks for one its
    connector does not have."""
    connector = BY_SCHEME[endpoint.scheme]
    cls = connector.part(role, acked)
    if cls is None:
        if acked:
            have = [s for s, c in BY_SCHEME.items() if c.part(role, True) is not None]
            raise UserError(f"--acked works with {', '.join(have)} endpoints, not {endpoint}")
        raise UserError(f"{endpoint.scheme}:// has no {role}")
    return cls


def make_source(value: str | Endpoint | Address, config: AppConfig, metrics=None) -> Source:
    """The source ``value`` names, built with ``config`` (not started)."""
    endpoint = parse(value, "source")
    cls = part(endpoint, "source", config.acked)
    assert issubclass(cls, Source)
    options = resolve_options(cls.options, endpoint, config.connector_options, cls.client_settings)
    return cls.build(endpoint, options, config, metrics)


def make_sink(value: str | Endpoint | Address, config: AppConfig) -> Sink:
    """The sink ``value`` names, built with ``config`` (not started)."""
    endpoint = parse(value, "sink")
    cls = part(endpoint, "sink", config.acked)
    assert issubclass(cls, Sink)
    options = resolve_options(cls.options, endpoint, config.connector_options, cls.client_settings)
    return cls.build(endpoint, options, config)


def check(value: str | Endpoint, role: str) -> Endpoint:
    """``value`` parsed, its options checked and its part built once (no I/O), so that a
    malformed endpoint is a usage error before anything starts."""
    endpoint = parse(value, role)
    config = AppConfig()
    if role == "source":
        make_source(endpoint, config)
    else:
        make_sink(endpoint, config)
    return endpoint


def run_flags() -> dict[str, Option]:
    """The options that are also ``run`` flags, by name, each once (the first declaration
    of a name gives its help), in registry order."""
    flags: dict[str, Option] = {}
    for connector in CONNECTORS:
        for cls in (connector.source, connector.sink, connector.acked_source, connector.acked_sink):
            for option in cls.options if cls is not None else ():
                if not option.flag:
                    continue
                seen = flags.setdefault(option.name, option)
                if seen.default != option.default:
                    raise TypeError(f"the flag --{option.name} has two defaults")
    return flags


def broker(value: str | Endpoint, tool: str) -> tuple[Connector, Endpoint]:
    """The connector and endpoint of ``send --to URL`` (tool ``send``) or ``listen URL``
    (``listen``); UserError if no broker's connector speaks that scheme."""
    brokers = [
        s
        for s, c in BY_SCHEME.items()
        if (c.publisher if tool == "send" else c.result_reader) is not None
    ]
    endpoint = Endpoint.parse(value, dict.fromkeys(["tcp", *brokers]))
    return BY_SCHEME[endpoint.scheme], endpoint


def flag_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The connector flags among ``run``'s parsed parameters (Click's names, with ``_``),
    by option name."""
    names = {name.replace("-", "_"): name for name in run_flags()}
    return {names[key]: value for key, value in values.items() if key in names}
