"""The NATS JetStream connector: ``nats://[USER:PASSWORD@]HOST:PORT/NAME`` for ``--in`` and
``--out`` (``tls://`` or ``?tls=1`` for TLS).

NAME is a JetStream stream whose one subject is also NAME; ``send`` and ``run``
create it (file storage) if it is missing.

**Source.** A durable pull consumer named by ``--group`` (``?group=``) on NAME,
created if missing with explicit acknowledgement: every ``run`` of the group
fetches from it, so they share the stream's work. A fetch brings up to
``--max-batch`` messages; their data, the same bytes a TCP frame carries, are the
batch's payloads, and the batch's receipt (:class:`NatsMessages`) holds the
messages. A message is acknowledged only once its result is delivered; one that
is not acknowledged within ``?ack-wait-ms=`` (a ``run`` that died or stalls) is
delivered again, to whichever ``run`` of the group fetches next.

**Sink.** One result message per input, published to NAME: data = the result
payload, header ``in`` = the input's stream sequence (``STREAM:SEQ`` of a TCP
connection for input from elsewhere). The sink waits for the server to store
each result (its publish acknowledgement) before the input is acknowledged.
For input from JetStream, each result carries the message id
``Nats-Msg-Id: STREAM.GROUP.SEQ`` of its input, so a result published again (its
input delivered again after a crash between publish and acknowledgement, or to
a second ``run`` while the first was stopped) is dropped by the server as a
duplicate: exactly once into NAME, within the result stream's duplicate window
(``?duplicate-window-s=``, set when ``run`` creates the stream; 120 s by
default). A result published again after the window has passed is stored twice.

The password is taken from the URL; :func:`~digitstream.connectors.kit.mask`
hides it in logs. A lost connection is retried for ever; at start, a server that
cannot be reached, refuses the credentials or has no JetStream is a
:class:`~digitstream.errors.UserError`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import ssl
from dataclasses import dataclass
from typing import Any

from digitstream.backoff import Backoff
from digitstream.batch import Batch, BatchResult, Receipt
from digitstream.batching import BatchPolicy
from digitstream.config import AppConfig
from digitstream.connectors.kit import (
    GROUP,
    Connector,
    Endpoint,
    GroupSource,
    Location,
    Option,
    ServerURL,
    boolean,
    integer,
    resolve_options,
    text,
)
from digitstream.errors import UserError
from digitstream.sinks import QueuedSink, Sink
from digitstream.sources import Source
from digitstream.wire.framing import Payloads, iter_frames

log = logging.getLogger("digitstream.nats")

#: the longest a fetch waits before looking again (for a drain)
FETCH_SECONDS = 0.5
#: seconds to connect, and for a request to be answered
TIMEOUT = 5.0
#: most results published in one go before their acknowledgements are awaited
PUBLISH_GROUP = 8192
#: what a stream's name may be (JetStream refuses dots, wildcards and spaces)
NAME = re.compile(r"^[A-Za-z0-9_-]{1,255}$")

CLIENT_OPTIONS = (
    Option("tls", boolean, False, "Connect over TLS (as tls://).", metavar="1"),
    Option("ca", text, None, "TLS: a CA bundle to trust instead of the system's.", metavar="FILE"),
    Option("cert", text, None, "TLS: this client's certificate (PEM).", metavar="FILE"),
    Option("key", text, None, "TLS: this client's private key (PEM).", metavar="FILE"),
)
ACK_WAIT = Option(
    "ack-wait-ms",
    integer(100, 86_400_000),
    30_000,
    "A message not acknowledged within this long is delivered again (set when the "
    "consumer is created).",
    metavar="MS",
)
MAX_ACK_PENDING = Option(
    "max-ack-pending",
    integer(1, 1 << 30),
    1 << 16,
    "Most messages the group holds unacknowledged (set when the consumer is created).",
    metavar="N",
)
DUPLICATE_WINDOW = Option(
    "duplicate-window-s",
    integer(1, 86_400 * 30),
    120,
    "How long the server remembers a result's id to drop it published again (set when "
    "the stream is created).",
    metavar="S",
)


@dataclass(frozen=True)
class NatsURL(ServerURL):
    """A parsed ``nats://`` or ``tls://`` endpoint; the password is never in ``str()``."""

    schemes = ("nats", "tls")

    @classmethod
    def of(cls, endpoint: Endpoint, options: dict) -> NatsURL:
        """The URL of ``endpoint``; UserError (with the password masked) if malformed."""
        shown = str(endpoint)
        where = Location.of(endpoint, "NAME")
        stream = where.name
        if not NAME.match(stream):
            raise UserError(
                f"{stream!r} in {shown} cannot name a JetStream stream: letters, digits, "
                "- and _ only"
            )
        tls = endpoint.scheme == "tls" or bool(options["tls"])
        if (options["cert"] is None) != (options["key"] is None):
            raise UserError(f"give both cert= and key= in {shown}, or neither")
        return cls.located(where, tls, options)

    async def connect(self, **callbacks):
        """A connection to the server (reconnecting by itself for ever once made); UserError
        in one line if it cannot be made."""
        import nats  # start-up time: only runs that use NATS load the client

        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=self.ca)
            if self.cert:
                context.load_cert_chain(self.cert, self.key)
        scheme = "tls" if self.tls else "nats"
        host = f"[{self.host}]" if ":" in self.host else self.host
        options: dict[str, Any] = {}
        if self.username is not None:
            options.update(user=self.username, password=self.password or "")

        seen: list[BaseException] = []

        async def quiet(exc: Exception) -> None:
            # nats-py reports every failed attempt here; the caller logs what matters
            seen.append(exc)
            log.debug("nats %s: %s", self, exc)

        try:
            # a first connection that fails says why at once (one attempt and one more);
            # once made, it is made again for ever
            connecting = nats.connect(
                servers=[f"{scheme}://{host}:{self.port}"],
                connect_timeout=TIMEOUT,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.5,
                allow_reconnect=True,
                tls=context,
                tls_hostname=self.host if context else None,
                error_cb=quiet,
                **callbacks,
                **options,
            )
            # bounded: after a failed TLS handshake nats-py may wait for ever on the next
            nc = await asyncio.wait_for(connecting, 2 * TIMEOUT + 1)
        except Exception as exc:
            # the server's own refusal says more than the reset that follows it
            refusals = [e for e in seen if "authoriz" in str(e).lower()]
            raise server_error(self, (refusals or seen or [exc])[-1]) from None
        nc.options["max_reconnect_attempts"] = -1
        return nc


def server_error(url: NatsURL, exc: BaseException) -> UserError:
    """What a user reads, in one line and without the password, when a first connection or
    request failed."""
    text_ = str(exc).strip() or type(exc).__name__
    where = f"nats at {url.host}:{url.port}"
    if "authorization" in text_.lower() or "authentication" in text_.lower():
        if url.password is None:
            return UserError(f"{where} needs credentials: give them in the URL (USER:PASSWORD@)")
        return UserError(f"{where} refused the user or password: {text_}")
    if "CERTIFICATE_VERIFY_FAILED" in text_:
        return UserError(
            f"cannot reach {where} over TLS: its certificate does not verify"
            + (f" against {url.ca}" if url.ca else "; name the authority that signed it: ?ca=FILE")
        )
    return UserError(f"cannot reach {where}: {text_}")


def _retried_errors() -> tuple[type[BaseException], ...]:
    """A lost connection, a request that timed out, an error the server answers: tried
    again with backoff, never skipped."""
    import nats.errors  # start-up time

    return (nats.errors.Error, asyncio.TimeoutError, OSError)


async def ensure_stream(js, url: NatsURL, duplicate_window: float | None = None) -> None:
    """Stream ``url.stream`` (subject the same) exists; created with file storage if not."""
    # start-up time: the NATS client loads only where NATS is used
    from nats.js.api import StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    try:
        await js.stream_info(url.stream)
        return
    except NotFoundError:
        pass
    config = StreamConfig(
        name=url.stream,
        subjects=[url.stream],
        storage=StorageType.FILE,
        duplicate_window=duplicate_window or 120.0,
    )
    try:
        await js.add_stream(config)
        log.info("created stream %s on nats at %s", url.stream, url.server)
    except Exception as exc:
        if "already in use" not in str(exc):  # another process made it meanwhile
            raise


async def _open(
    url: NatsURL, duplicate_window: float | None = None, create: bool = True, **callbacks
):
    """A connection and its JetStream context, with the stream made if missing (UserError
    if it is missing and not to be made); UserError in one line if that fails."""
    # start-up time: the NATS client loads only where NATS is used
    from nats.js.errors import NotFoundError

    nc = await url.connect(**callbacks)
    js = nc.jetstream(timeout=TIMEOUT, publish_async_max_pending=2 * PUBLISH_GROUP)
    try:
        if create:
            await ensure_stream(js, url, duplicate_window)
        else:
            await js.stream_info(url.stream)
    except NotFoundError:
        await nc.close()
        raise UserError(f"no stream {url.stream!r} on nats at {url.server}") from None
    except Exception as exc:
        await nc.close()
        if "jetstream not enabled" in str(exc).lower() or "no responders" in str(exc).lower():
            raise UserError(
                f"nats at {url.server} has no JetStream (start nats-server with -js)"
            ) from None
        raise server_error(url, exc) from None
    return nc, js


# ---------------------------------------------------------------------------- source
class NatsMessages(Receipt):
    """The receipt of a batch read from JetStream: its messages, in the batch's order, and
    their stream sequence numbers (what the NATS sink names results by)."""

    __slots__ = ("group", "key", "messages", "sequences")

    def __init__(self, source: NatsSource, batch: Batch, messages: list, sequences: list[int]):
        super().__init__(source, batch.stream, batch.first_seq, batch.end_seq)
        self.messages = messages
        self.sequences = sequences
        self.key = source.url.stream
        self.group = source.group


class NatsSource(GroupSource):
    """NATS JetStream source, at least once (exactly once with the NATS sink, within the
    result stream's duplicate window): a crash or stop of ``run`` costs nothing, its
    messages are delivered again after ``?ack-wait-ms=``.

    See the module doc."""

    guarantee = (
        "at least once (exactly once with the NATS sink, within its duplicate window): a "
        "crash of run leaves its messages unacknowledged, to be delivered again"
    )
    options = (*CLIENT_OPTIONS, GROUP, ACK_WAIT, MAX_ACK_PENDING)

    def __init__(
        self,
        url: NatsURL,
        group: str,
        policy: BatchPolicy,
        ack_wait_ms: int = 30_000,
        max_ack_pending: int = 1 << 16,
    ):
        if not NAME.match(group):
            raise UserError(f"--group {group!r} cannot name a NATS consumer: letters, digits, - _")
        super().__init__(url.stream, policy, str(url), log)
        self.url = url
        self.group = group
        self.ack_wait_ms = ack_wait_ms
        self.max_ack_pending = max_ack_pending
        self.nc: Any = None
        self._subscription: Any = None
        self._backoff = Backoff(f"reading {url}", log=log)
        self.counts = collections.Counter(read=0, redelivered=0, acknowledged=0, reconnects=0)

    @classmethod
    def build(cls, endpoint: Endpoint, options: dict, config: AppConfig, metrics=None) -> Source:
        return cls(
            NatsURL.of(endpoint, options),
            options["group"],
            BatchPolicy(config.max_batch, config.max_delay),
            ack_wait_ms=options["ack-wait-ms"],
            max_ack_pending=options["max-ack-pending"],
        )

    def describe(self) -> str:
        return f"{self.url} (consumer group {self.group})"

    async def start(self, sink: Sink) -> None:
        # start-up time: the NATS client loads only where NATS is used
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        async def reconnected() -> None:
            self.counts["reconnects"] += 1
            log.info("nats at %s: reconnected", self.url.server)

        self.nc, js = await _open(self.url, reconnected_cb=reconnected)
        config = ConsumerConfig(
            durable_name=self.group,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_ms / 1000,
            max_ack_pending=self.max_ack_pending,
            max_waiting=4096,
        )
        try:
            self._subscription = await js.pull_subscribe(
                self.url.stream, durable=self.group, stream=self.url.stream, config=config
            )
        except Exception as exc:
            await self.nc.close()
            raise UserError(f"cannot read {self.url} as group {self.group}: {exc}") from None
        self.open_stream()

    async def read(self, timeout: float | None) -> list[Payloads] | None:
        """The next messages' data (one group); ``[]`` when ``timeout`` passes first, None
        once draining. Waits out a lost connection."""
        # start-up time: the NATS client loads only where NATS is used
        import nats.errors

        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self.draining:
            wait = FETCH_SECONDS
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
                if wait <= 0.001:
                    return []
            try:
                messages = await self._subscription.fetch(self.policy.max_batch, timeout=wait)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                self._backoff.succeeded()
                continue
            except _retried_errors() as exc:
                await self._backoff.failed(exc)
                continue
            self._backoff.succeeded()
            if not messages:
                continue
            self.counts["read"] += len(messages)
            self.pending += len(messages)
            redelivered = sum(1 for m in messages if m.metadata.num_delivered > 1)
            if redelivered:
                self.counts["redelivered"] += redelivered
            self.unbatched.add(messages)
            return [Payloads.from_list([m.data for m in messages])]
        return None

    def receipt_for(self, batch: Batch, items: list) -> Receipt:
        return NatsMessages(self, batch, items, [m.metadata.sequence.stream for m in items])

    def retried_errors(self) -> tuple[type[BaseException], ...]:
        return _retried_errors()

    async def settle(self, receipts: list[Receipt]) -> None:
        for receipt in receipts:
            assert isinstance(receipt, NatsMessages)  # this source makes no other
            for message in receipt.messages:
                if not message._ackd:  # acknowledged before a retry, or by nats-py
                    await message.ack()
                    self.counts["acknowledged"] += 1

    def counters(self) -> dict | None:
        return {
            "connector": "nats",
            "where": self.describe(),
            "counters": dict(self.counts),
            "gauges": {"pending": self.pending},
        }

    async def close(self) -> None:
        await super().close()
        if self.nc is not None:
            try:
                await asyncio.wait_for(self.nc.flush(), TIMEOUT)
            except Exception:
                pass  # the acknowledgements not sent are delivered again: nothing is lost
            await self.nc.close()


# ---------------------------------------------------------------------------- sink
class NatsSink(QueuedSink):
    """NATS JetStream sink, exactly once for input from JetStream within the stream's
    duplicate window (each result carries its input's message id), at least once otherwise:
    a crash of ``run`` loses nothing.

    See the module doc. ``write`` waits while ``high_water`` results are held."""

    guarantee = (
        "exactly once for input from JetStream, within the duplicate window; at least once "
        "otherwise: a crash of run loses nothing"
    )
    options = (*CLIENT_OPTIONS, DUPLICATE_WINDOW)
    group_limit = PUBLISH_GROUP

    def __init__(self, url: NatsURL, duplicate_window: int = 120, high_water: int = 4 * 8192):
        super().__init__(f"publishing to {url}")
        self.url = url
        self.duplicate_window = duplicate_window
        self.high_water = high_water
        self.nc: Any = None
        self.js: Any = None
        self.counts.update(published=0, duplicates=0)

    @classmethod
    def build(cls, endpoint: Endpoint, options: dict, config: AppConfig) -> Sink:
        return cls(NatsURL.of(endpoint, options), options["duplicate-window-s"])

    def describe(self) -> str:
        return str(self.url)

    def weight(self, result: BatchResult) -> int:
        return result.count

    def retried_errors(self) -> tuple[type[BaseException], ...]:
        return _retried_errors()

    async def start(self) -> None:
        self.nc, self.js = await _open(self.url, self.duplicate_window)
        await super().start()

    async def deliver(self, results: list[BatchResult]) -> None:
        js, subject = self.js, self.url.stream
        acks = []
        for result in results:
            receipt = result.receipt
            payloads = iter_frames(result.output)
            if isinstance(receipt, NatsMessages):
                prefix = f"{receipt.key}.{receipt.group}."
                for payload, seq in zip(payloads, receipt.sequences):
                    headers = {"Nats-Msg-Id": f"{prefix}{seq}", "in": str(seq)}
                    acks.append(await js.publish_async(subject, payload, headers=headers))
            else:
                for seq, payload in enumerate(payloads, result.first_seq):
                    headers = {"in": f"{result.stream}:{seq}"}
                    acks.append(await js.publish_async(subject, payload, headers=headers))
        stored = await asyncio.wait_for(asyncio.gather(*acks), TIMEOUT * 2)
        duplicates = sum(1 for ack in stored if ack.duplicate)
        self.counts["published"] += len(stored) - duplicates
        if duplicates:
            self.counts["duplicates"] += duplicates
            log.info(
                "%d results were stored before (their inputs were delivered again): the "
                "server dropped them",
                duplicates,
            )

    def counters(self) -> dict | None:
        return {
            "connector": "nats",
            "where": self.describe(),
            "counters": {
                "published": self.counts["published"],
                "duplicates": self.counts["duplicates"],
                "reconnects": self.backoff.outages,
            },
            "gauges": {"pending": self.undelivered},
        }

    async def close(self) -> None:
        await super().close()
        if self.nc is not None:
            await self.nc.close()


# ---------------------------------------------------------------------------- tools
class _Blocking:
    """A connection driven from synchronous code (``send``, ``listen``): its own event loop."""

    #: a missing stream is made (send), or is an error (listen)
    creates = True

    def __init__(self, endpoint: Endpoint):
        self.url = NatsURL.of(endpoint, resolve_options(CLIENT_OPTIONS, endpoint))
        self.loop = asyncio.new_event_loop()
        try:
            self.nc, self.js = self.loop.run_until_complete(_open(self.url, create=self.creates))
        except BaseException:
            self.loop.close()
            raise

    def describe(self) -> str:
        return str(self.url)

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.nc.close())
        finally:
            self.loop.close()


class NatsPublisher(_Blocking):
    """``send --to nats://...``: one message per image, headers ``label`` and ``id``."""

    def publish(self, payloads: list[bytes], labels: list[bytes], ids: list[bytes]) -> None:
        self.loop.run_until_complete(self._publish(payloads, labels, ids))

    async def _publish(self, payloads: list[bytes], labels: list[bytes], ids: list[bytes]):
        js, subject = self.js, self.url.stream
        acks = [
            await js.publish_async(
                subject, payload, headers={"label": label.decode(), "id": msg_id.decode()}
            )
            for payload, label, msg_id in zip(payloads, labels, ids)
        ]
        await asyncio.wait_for(asyncio.gather(*acks), TIMEOUT * 2)

    def flush(self) -> None:
        pass  # publish() returns once the server has stored them


class NatsResultReader(_Blocking):
    """``listen nats://...``: every message of the stream from its start, in its order."""

    creates = False

    def __init__(self, endpoint: Endpoint):
        super().__init__(endpoint)
        # start-up time: the NATS client loads only where NATS is used
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL)
        self.subscription = self.loop.run_until_complete(
            self.js.pull_subscribe(self.url.stream, durable=None, config=config)
        )

    def read(self, most: int, timeout: float) -> list[bytes]:
        # start-up time: the NATS client loads only where NATS is used
        import nats.errors

        try:
            messages = self.loop.run_until_complete(self.subscription.fetch(most, timeout=timeout))
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            return []
        return [m.data for m in messages]


CONNECTOR = Connector(
    ("nats", "tls"),
    NatsSource,
    NatsSink,
    publisher=NatsPublisher,
    result_reader=NatsResultReader,
    title="NATS JetStream",
)
