"""Endpoints and connector options: what an ``--in`` / ``--out`` value says, checked.

An ``--in`` or ``--out`` value is an :class:`Endpoint`: ``HOST:PORT`` (TCP), or
``scheme://LOCATION?NAME=VALUE&...`` whose scheme names the connector. Each
connector class declares the query parameters it takes as :class:`Option`\\ s;
:func:`resolve_options` parses and checks them, so an unknown name or a bad
value is one line naming the known ones. An option marked ``flag`` is also a
``run`` flag (``--group`` sets ``?group=`` for every connector that takes it); a
value in the URL wins over the flag.

:class:`Declared` is what every source and sink class is: it says its delivery
guarantee and its options, and cannot be built without the first.
"""

from __future__ import annotations

import urllib.parse
from abc import ABC
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from digitstream.addresses import Address
from digitstream.errors import UserError

#: the scheme of an endpoint written without one
DEFAULT_SCHEME = "tcp"


@dataclass(frozen=True)
class Endpoint:
    """An ``--in`` or ``--out`` value: the connector's scheme, what follows ``scheme://`` up
    to the query, and the query's parameters (name -> text, in the order written)."""

    scheme: str
    location: str
    query: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(
        cls, value: str | Endpoint | Address, schemes: Mapping[str, object] | None = None
    ) -> Endpoint:
        """``HOST:PORT`` (or an :class:`Address`) or ``scheme://...``; UserError naming the
        known schemes (of ``schemes``, if given) for another, or for a parameter given
        twice."""
        if isinstance(value, Endpoint):
            return value
        text = str(value).strip()
        scheme, sep, rest = text.partition("://")
        if not sep:
            scheme, rest = DEFAULT_SCHEME, text
        scheme = scheme.lower()
        if schemes is not None and scheme not in schemes:
            raise UserError(
                f"unknown scheme {scheme!r} in {mask(text)!r}; known: "
                f"{', '.join(f'{s}://' for s in schemes)} (or HOST:PORT for tcp)"
            )
        location, _, query_text = rest.partition("?")
        pairs = urllib.parse.parse_qsl(query_text, keep_blank_values=True)
        query: dict[str, str] = {}
        for name, text_value in pairs:
            if name in query:
                raise UserError(f"{name!r} is given twice in {mask(text)}")
            query[name] = text_value
        return cls(scheme, location, query)

    @property
    def url(self) -> str:
        """The endpoint as written (the password in clear: not for logs)."""
        query = urllib.parse.urlencode(dict(self.query))
        return f"{self.scheme}://{self.location}" + (f"?{query}" if query else "")

    def __str__(self) -> str:
        """What logs and error messages show: a password in the URL is masked."""
        if self.scheme == DEFAULT_SCHEME and not self.query:
            return self.location
        return mask(self.url)


def mask(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part, if any, as ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    head, at, hosts = authority.rpartition("@")
    user, colon, _ = head.partition(":")
    if not (at and colon):
        return url
    return f"{scheme}://{user}:***@{hosts}{slash}{tail}"


@dataclass(frozen=True)
class Location:
    """What ``[USER[:PASSWORD]@]HOST:PORT/NAME`` says; the password is never shown."""

    host: str
    port: int
    name: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def of(cls, endpoint: Endpoint, what: str = "NAME") -> Location:
        """The location of ``endpoint``; UserError, in one line with the password masked,
        if it is malformed (``what`` names the last part in the message)."""
        shown = str(endpoint)
        parts = urllib.parse.urlsplit(f"{endpoint.scheme}://{endpoint.location}")
        try:
            port = parts.port
        except ValueError:
            raise UserError(f"the port of {shown} is not a number in 0..65535") from None
        if not parts.hostname or port is None:
            raise UserError(f"expected {endpoint.scheme}://HOST:PORT/{what}, got {shown}")
        name = urllib.parse.unquote(parts.path.lstrip("/"))
        if not name:
            raise UserError(
                f"no {what.lower()} named in {shown}: expected {endpoint.scheme}://HOST:PORT/{what}"
            )
        return cls(
            parts.hostname,
            port,
            name,
            urllib.parse.unquote(parts.username) if parts.username else None,
            urllib.parse.unquote(parts.password) if parts.password is not None else None,
        )

    def shown(self, scheme: str, password: str | None = None, query: str = "") -> str:
        """The URL for logs and the metrics UI: a password (this one, or ``password``) as
        ``***``."""
        user = self.user or ""
        auth = f"{user}:***@" if (password or self.password) else (f"{user}@" if user else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{auth}{host}:{self.port}/{self.name}{query}"


@dataclass(frozen=True)
class ServerURL:
    """A broker's endpoint, parsed: its server, the stream (or topic) named, the credentials
    and the TLS files (a CA bundle to trust instead of the system's, a client certificate
    and key). The password is never in ``str()`` or ``repr()``."""

    host: str
    port: int
    stream: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    #: the schemes of the plain and the TLS form
    schemes: ClassVar[tuple[str, str]] = ("", "")

    @classmethod
    def located(cls, where: Location, tls: bool, options: Mapping[str, Any], **more: Any):
        """The URL of a parsed location, with the TLS files of ``options``."""
        return cls(
            host=where.host,
            port=where.port,
            stream=where.name,
            username=where.user,
            password=where.password,
            tls=tls,
            ca=options["ca"],
            cert=options["cert"],
            key=options["key"],
            **more,
        )

    @property
    def server(self) -> str:
        """The server as written: two endpoints are one server when equal."""
        return f"{self.host}:{self.port}"

    def masked(self, query: str = "") -> str:
        """The URL for logs and the metrics UI: the password, if any, as ``***``."""
        where = Location(self.host, self.port, self.stream, self.username, self.password)
        return where.shown(self.schemes[self.tls], query=query)

    def __str__(self) -> str:
        return self.masked()


# ---------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Option:
    """A query parameter a connector takes: ``parse`` turns its text into the value (and
    raises ValueError saying what it expects); ``flag``: also the ``run`` flag ``--NAME``."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    flag: bool = False
    #: what the value looks like, in help (NUMBER, NAME, FILE)
    metavar: str = "VALUE"


def integer(low: int, high: int) -> Callable[[str], int]:
    """A parser of whole numbers from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise ValueError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"expected a number from {low} to {high}, got {value}")
        return value

    return parse


def number(low: float, high: float) -> Callable[[str], float]:
    """A parser of numbers from ``low`` to ``high``."""

    def parse(text: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"expected a number from {low:g} to {high:g}, got {value:g}")
        return value

    return parse


def text(value: str) -> str:
    """A parser of non-empty text."""
    value = str(value)
    if not value:
        raise ValueError("expected a non-empty value")
    return value


def boolean(value: str | bool) -> bool:
    """A parser of yes/no: 1, true, yes, on / 0, false, no, off."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on", ""):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected 1 or 0 (true or false), got {value!r}")


def resolve_options(
    declared: tuple[Option, ...],
    endpoint: Endpoint,
    flags: Mapping[str, Any] | None = None,
    client_settings: bool = False,
) -> dict[str, Any]:
    """The value of each declared option: from the endpoint's query if there, else from
    ``flags`` (the ``run`` flags, parsed), else its default. UserError, in one line, for a
    query parameter not declared or a value its parser refuses. With ``client_settings``,
    a parameter whose name has a dot (``session.timeout.ms``) is a setting of the client
    library, passed on as it is: the values under ``settings``."""
    by_name = {option.name: option for option in declared}
    shown = str(endpoint)
    settings = {
        name: value for name, value in endpoint.query.items() if client_settings and "." in name
    }
    for name in endpoint.query:
        if name not in by_name and name not in settings:
            known = ", ".join(sorted(by_name)) or "none"
            raise UserError(f"unknown option {name!r} in {shown}; known: {known}")
    values: dict[str, Any] = {}
    flags = flags or {}
    for option in declared:
        if option.name in endpoint.query:
            try:
                values[option.name] = option.parse(endpoint.query[option.name])
            except ValueError as exc:
                raise UserError(f"option {option.name} in {shown}: {exc}") from None
        else:
            values[option.name] = flags.get(option.name, option.default)
    if client_settings:
        values["settings"] = settings
    return values


#: a broker source's consumer group (also ``run --group``): every broker takes it
GROUP = Option(
    "group",
    text,
    "digitstream",
    "With a broker's --in (redis://, nats://, kafka://): the consumer group to read as "
    "(created if missing); the run processes of one group share the input.",
    flag=True,
    metavar="NAME",
)


class Declared(ABC):
    """A source or sink class: ``guarantee`` says in one line what a crash of each process
    costs (a class without it cannot be built), ``options`` the query parameters it takes."""

    #: what a crash costs, in one line
    guarantee: ClassVar[str]
    #: the URL query parameters it takes (and the ``run`` flags that set them)
    options: ClassVar[tuple[Option, ...]] = ()
    #: parameters with a dot in their name are the client library's own settings
    client_settings: ClassVar[bool] = False

    def __new__(cls, *args: Any, **kwargs: Any):
        if not isinstance(getattr(cls, "guarantee", None), str):
            raise TypeError(
                f"{cls.__name__} cannot be built: it does not say its delivery guarantee "
                "(a class attribute `guarantee`, one line)"
            )
        return super().__new__(cls)
