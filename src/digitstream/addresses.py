"""``HOST:PORT`` addresses as the command line and the wire code use them."""

from __future__ import annotations

import ipaddress
from typing import NamedTuple


class Address(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6); the port may be 0 (any free port).

    >>> parse_address("127.0.0.1:8002")
    Address(host='127.0.0.1', port=8002)
    """
    text = text.strip()
    if text.startswith("tcp://"):
        text = text[len("tcp://") :]
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"port must be a number, got {port!r} in {text!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port must be 0..65535, got {number} in {text!r}")
    return Address(host, number)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
