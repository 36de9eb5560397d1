"""The acknowledged TCP connector, chosen by ``run --acked`` (wire: :mod:`digitstream.wire.acked`).

**Source** (:class:`AckedTcpSource`): each connection is one named stream of a
``send --acked --stream NAME``. Its HELLO is passed on to the sink, which asks the
listener where the stream stands; the sender is told (RESUME) and sends from
there, in DATA messages read into the buffer and cut in place as on the plain
wire (:class:`AckedReader` is a :class:`~digitstream.connectors.tcp.FrameReader`
that cuts messages). The source acknowledges to the sender what the sink says the
listener acknowledged, and nothing sooner: ``run`` holds nothing that cannot be
rebuilt.

**Sink** (:class:`AckedTcpSink`): one connection to ``listen --acked``; it keeps
every result until the listener acknowledges it (at most ``high_water`` bytes:
then ``write`` waits, which stops the source reading and, through the sender's
window, the sender), and after a reconnection says HELLO again for every stream
and sends again what was not acknowledged; the listener drops what it holds.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from digitstream.addresses import Address
from digitstream.batch import Batch, BatchResult, Receipt
from digitstream.batching import BatchPolicy, batches
from digitstream.config import AppConfig
from digitstream.connectors import tcp
from digitstream.connectors.kit import Endpoint
from digitstream.connectors.tcp import (
    FrameReader,
    TcpSource,
    TcpStream,
    connect_to_listener,
    tcp_address,
)
from digitstream.errors import UserError
from digitstream.sinks import QueuedSink, ResumingSink, Sink
from digitstream.wire import acked
from digitstream.wire.framing import HEADER, HEADER_SIZE, FrameTooLarge, Payloads, split_frames

log = logging.getLogger("digitstream.acked")

#: a sender has this long after connecting to say HELLO
HELLO_TIMEOUT = 10.0
#: the longest HELLO message (its name is at most 255 bytes, its body a short JSON object)
MAX_HELLO = 4096
#: the sender's DATA messages hold at most this many bytes of frames (or one larger frame)
MAX_DATA = 1 << 20


class StreamRefused(Exception):
    """The listener refused a stream (its name is taken by other data); the text says why."""


def hello_fingerprint(message: acked.Message) -> str:
    """The fingerprint of a HELLO every field of which is what the wire says; ProtocolError,
    saying which is not, otherwise."""
    name = message.stream
    if not name:
        raise acked.ProtocolError("a HELLO without a stream name")
    size = len(name.encode("utf-8"))
    if size > acked.MAX_NAME:
        raise acked.ProtocolError(
            f"a stream name of {size} bytes in HELLO: at most {acked.MAX_NAME} bytes"
        )
    try:
        fields = json.loads(bytes(message.body))
    except ValueError:  # UnicodeDecodeError too
        raise acked.ProtocolError(f"stream {name!r}: the HELLO's body is not JSON") from None
    if not isinstance(fields, dict):
        raise acked.ProtocolError(f"stream {name!r}: the HELLO's body is not a JSON object")
    version = fields.get("version")
    if type(version) is not int or version != acked.VERSION:
        raise acked.ProtocolError(
            f"stream {name!r}: protocol version {version!r} in HELLO, this side speaks "
            f"{acked.VERSION}"
        )
    fingerprint = fields.get("fingerprint")
    if not isinstance(fingerprint, str) or not 0 < len(fingerprint) <= acked.MAX_NAME:
        raise acked.ProtocolError(
            f"stream {name!r}: the HELLO's fingerprint is {fingerprint!r}, not a string of "
            f"1 to {acked.MAX_NAME} characters"
        )
    return fingerprint


class AckedReader(FrameReader):
    """One acked input connection: its HELLO, then the frames of its DATA messages, cut in
    place from the buffer (fixed-width payloads are views of it, as on the plain wire)."""

    def __init__(self, on_connect, max_frame: int, budget=None):
        super().__init__(on_connect, max_frame + acked.DATA_OVERHEAD + MAX_DATA, budget)
        self.frame_limit = max_frame
        self.name: str | None = None
        self.fingerprint: str | None = None
        #: the sequence number the next DATA message must start at (set once resumed)
        self.expected: int | None = None

    def _cut(self, start: int, end: int) -> tuple[list[Payloads], int]:
        view = self._view
        groups: list[Payloads] = []
        pos = start
        while pos + HEADER_SIZE <= end:
            (length,) = HEADER.unpack_from(view, pos)
            if self.name is None and length > MAX_HELLO:
                raise acked.ProtocolError(
                    f"a first message of {length} bytes: a HELLO has at most {MAX_HELLO}"
                )
            if length > self.max_frame:
                raise FrameTooLarge(length, self.max_frame, groups, pos)
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break
            message = acked.parse(view[pos + HEADER_SIZE : stop])
            if self.name is None:
                if message.kind != acked.HELLO:
                    raise acked.ProtocolError("the first message is not HELLO")
                self.fingerprint = hello_fingerprint(message)
                self.name = message.stream
                return groups, stop  # the rest waits for the RESUME
            if message.kind != acked.DATA or message.stream != self.name:
                raise acked.ProtocolError(
                    f"stream {self.name!r}: a {message.kind!r} message of {message.stream!r} "
                    "where DATA was expected"
                )
            if message.seq != self.expected:
                raise acked.ProtocolError(
                    f"stream {self.name!r}: DATA from {message.seq} where {self.expected} was due"
                )
            first = stop - len(message.frames)
            cut, at = split_frames(view, first, stop, self.frame_limit)
            if at != stop or sum(map(len, cut)) != message.count:
                raise acked.ProtocolError(
                    f"stream {self.name!r}: a DATA message's {message.count} frames do not fill it"
                )
            groups.extend(cut)
            self.expected += message.count
            pos = stop
        return groups, pos

    async def read_hello(self) -> bool:
        """Wait for the HELLO; False if the connection ends first. Raises ProtocolError."""
        while self.name is None:
            self._take()
            if self.name is not None:
                break
            if self._eof:
                return False
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return True

    def send(self, message: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(message)

    def abort(self) -> None:
        """End the connection now: its sender is gone (another connection took its stream)."""
        self.finish()
        if self.transport is not None:
            self.transport.abort()


class AckedStream(TcpStream):
    """One acked connection of an :class:`AckedTcpSource`: its frames as batches, numbered
    from where the stream was resumed."""

    def __init__(
        self,
        source: AckedTcpSource,
        reader: AckedReader,
        first_seq: int,
        policy: BatchPolicy,
        **kwargs,
    ):
        assert reader.name is not None  # streams are made after the HELLO
        super().__init__(reader.name, reader, policy, **kwargs)
        self.source = source
        self.first_seq = first_seq

    async def batches(self) -> AsyncIterator[Batch]:
        try:
            async for batch in batches(
                self.id, self.reader.read_groups, self.policy, self.first_seq
            ):
                batch.receipt = Receipt(self.source, self.id, batch.first_seq, batch.end_seq)
                yield batch
        except (acked.ProtocolError, FrameTooLarge) as exc:
            log.warning("stream %r from %s closed: %s", self.id, self.reader.peer, exc)
            self._error("protocol")


class AckedTcpSource(TcpSource):
    """Acked TCP source, exactly once with ``send --acked`` and an acked sink: a crash of
    ``run`` or of the sender costs nothing (the sender resends from where the listener stands).

    Listens on ``addr`` for ``send --acked`` connections, one named stream each; see the
    module doc. The bounds of :class:`~digitstream.connectors.tcp.TcpSource` apply.
    """

    guarantee = "exactly once: a crash of the sender or of run is resumed from the listener"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sink: ResumingSink | None = None
        self._handshakes: set[asyncio.Task] = set()

    async def start(self, sink: Sink) -> None:
        """Start listening; the sink must say where a stream stands (an acked sink)."""
        if not isinstance(sink, ResumingSink):
            raise UserError(
                f"run --acked needs a sink that resumes streams (an acked listener), "
                f"not {sink.describe()}"
            )
        self.sink = sink
        await super().start(sink)

    def _new_reader(self) -> FrameReader:
        return AckedReader(self._accepted, self.max_frame, self.budget)

    def _accepted(self, reader: FrameReader) -> None:
        # a connection counts against max_connections from its arrival, HELLO or not
        if not self._admit(reader):
            return
        assert isinstance(reader, AckedReader)
        task = asyncio.ensure_future(self._handshake(reader))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def _handshake_failed(self, reader: AckedReader, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.connection_error(kind)
        reader.close()

    async def _handshake(self, reader: AckedReader) -> None:
        try:
            await self._shake_hands(reader)
        except Exception:
            # whatever went wrong, the connection does not stay open uncounted
            log.exception("connection from %s closed: its handshake failed", reader.peer)
            self._handshake_failed(reader, "protocol")

    async def _shake_hands(self, reader: AckedReader) -> None:
        assert self.sink is not None  # start() set it
        try:
            said_hello = await asyncio.wait_for(reader.read_hello(), HELLO_TIMEOUT)
        except asyncio.TimeoutError:
            self.budget.notes.warning(
                "hello_timeout",
                "connection from %s closed: no HELLO within %.0f s",
                reader.peer,
                HELLO_TIMEOUT,
            )
            self._handshake_failed(reader, "hello_timeout")
            return
        except (acked.ProtocolError, FrameTooLarge) as exc:
            self.budget.notes.warning(
                "protocol", "connection from %s refused: %s", reader.peer, exc
            )
            reader.send(acked.refused("", str(exc)))  # its one error, then the end
            self._handshake_failed(reader, "protocol")
            return
        if not said_hello:
            if reader.closed_because is not None:
                self._handshake_failed(reader, reader.closed_because)
            reader.close()
            return
        assert reader.name is not None and reader.fingerprint is not None
        name = reader.name
        reader.held_by_us = True  # what it waits for now is the listener's RESUME
        try:
            seq = await self.sink.open_stream(name, reader.fingerprint)
        except StreamRefused as exc:
            log.warning("stream %r from %s refused: %s", name, reader.peer, exc)
            reader.send(acked.refused(name, str(exc)))
            reader.close()
            return
        finally:
            reader.held_by_us = False
        if self._draining or reader.transport is None or reader.transport.is_closing():
            reader.close()
            return
        old = self._open.get(name)
        if old is not None:
            log.info("stream %r: a new connection from %s replaces the old one", name, reader.peer)
            assert isinstance(old.reader, AckedReader)
            old.reader.abort()
        reader.expected = seq
        reader.send(acked.resume(name, seq))
        log.info("stream %r from %s resumes at %d", name, reader.peer, seq)
        stream = AckedStream(
            self, reader, seq, self.policy, metrics=self.metrics, on_close=self._closed
        )
        self._open[name] = stream
        self._new.put_nowait(stream)

    def _closed(self, stream: TcpStream) -> None:
        if self._open.get(stream.id) is stream:  # not a newer connection of the same stream
            self._open.pop(stream.id)
        self._trim.soon()

    def acknowledge(self, receipt: Receipt) -> None:
        # by name: a sender that reconnected gets what the listener stored of its stream
        open_stream = self._open.get(receipt.stream)
        if open_stream is not None:
            assert isinstance(open_stream.reader, AckedReader)
            open_stream.reader.send(acked.ack(str(receipt.stream), receipt.end_seq))

    async def close(self) -> None:
        for task in list(self._handshakes):
            task.cancel()
        await super().close()


@dataclass
class _SinkStream:
    fingerprint: str
    waiters: list[asyncio.Future] = field(default_factory=list)


class AckedTcpSink(ResumingSink, QueuedSink):
    """Acked TCP sink, exactly once with ``listen --acked``: a crash of the listener costs
    nothing (unacknowledged results are kept here and sent again).

    See the module doc. A result counts as delivered once the listener acknowledges it.
    """

    guarantee = "exactly once: results are kept until the listener has stored them"
    confirms_later = True

    def __init__(self, addr: Address, high_water: int = 8 << 20, backoff_max: float = 1.0):
        super().__init__(f"writing to {addr}", quiet_retries=True)
        self.addr = addr
        self.high_water = high_water
        self.backoff_max = backoff_max
        self._streams: dict[str, _SinkStream] = {}
        #: a new stream under the name of one here, until the listener answers its HELLO
        self._candidates: dict[str, _SinkStream] = {}
        #: per stream name, the fingerprints of the HELLOs not yet answered, in order
        self._asked: dict[str, collections.deque[str]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._connection: asyncio.Task | None = None
        self.connects = 0
        self.closed = False

    @classmethod
    def build(cls, endpoint: Endpoint, options: dict, config: AppConfig) -> AckedTcpSink:
        return cls(tcp_address(endpoint.location))

    def describe(self) -> str:
        return str(self.addr)

    def weight(self, result: BatchResult) -> int:
        return len(result.output) + acked.DATA_OVERHEAD

    @property
    def kept_bytes(self) -> int:
        return self.held

    def delivered(self, stream) -> int:
        return self.confirmed(str(stream))

    async def start(self) -> None:
        self._connection = asyncio.create_task(self._run_connection(), name="acked sink")
        await super().start()

    async def open_stream(self, name: str, fingerprint: str) -> int:
        """Where ``name`` stands at the listener (waits for the listener); StreamRefused if
        the listener holds other data under that name."""
        state = self._streams.get(name)
        if state is None:
            state = self._streams[name] = _SinkStream(fingerprint)
        elif state.fingerprint != fingerprint:
            # another stream under a name in use: it replaces the old one only once the
            # listener takes it, and never while the old one has results here
            if self.holds(name) or state.waiters or name in self._candidates:
                raise StreamRefused(f"stream {name!r} is in use with other data")
            state = self._candidates[name] = _SinkStream(fingerprint)
        waiter = asyncio.get_running_loop().create_future()
        state.waiters.append(waiter)
        if self._writer is not None:
            self._hello(self._writer, name, fingerprint)
        return await waiter

    def _hello(self, writer: asyncio.StreamWriter, name: str, fingerprint: str) -> None:
        """Ask the listener where ``name`` stands; its answers come in the order asked."""
        self._asked.setdefault(name, collections.deque()).append(fingerprint)
        writer.write(acked.hello(name, fingerprint))

    def _answered(self, name: str) -> tuple[_SinkStream | None, bool]:
        """The stream the listener's next answer about ``name`` is for, and whether it is a
        candidate (a new stream under the name of an old one)."""
        asked = self._asked.get(name)
        fingerprint = asked.popleft() if asked else None
        candidate = self._candidates.get(name)
        if candidate is not None and candidate.fingerprint == fingerprint:
            return candidate, True
        return self._streams.get(name), False

    async def deliver(self, results: list[BatchResult]) -> None:
        # kept until the listener acknowledges them (confirm); sent now if it is there, or
        # with everything unacknowledged once it is back
        writer = self._writer
        if writer is None:
            return
        for result in results:
            if result.end_seq > self.confirmed(str(result.stream)):
                writer.write(_message(result))

    async def close(self) -> None:
        self.closed = True
        await super().close()
        if self._connection is not None:
            self._connection.cancel()
            await asyncio.gather(self._connection, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await connect_to_listener(
            self.addr,
            f"digitstream listen --acked -o FILE {self.addr}",
            first_delay=0.02,
            backoff_max=self.backoff_max,
            limit=1 << 20,
        )

    async def _run_connection(self) -> None:
        while not self.closed:
            reader, writer = await self._connect()
            self.connects += 1
            # every stream again, then what the listener has not acknowledged: it answers
            # each HELLO with where the stream stands and drops what it already holds
            self._asked.clear()
            for name, state in [*self._streams.items(), *self._candidates.items()]:
                self._hello(writer, name, state.fingerprint)
            resent = 0
            for result in self.unconfirmed():
                writer.write(_message(result))
                resent += result.count
            self._writer = writer
            log.info(
                "connected to the acked listener at %s%s; %d results to send again",
                self.addr,
                "" if self.connects == 1 else f" (reconnection {self.connects - 1})",
                resent,
            )
            try:
                await self._read_replies(reader)
                reason = "it closed the connection"
            except (
                ConnectionError,
                OSError,
                acked.ProtocolError,
                asyncio.IncompleteReadError,
            ) as exc:
                reason = str(exc) or type(exc).__name__
            finally:
                self._writer = None
                writer.close()
            log.warning(
                "acked listener at %s went away (%s); %d results kept, reconnecting",
                self.addr,
                reason,
                self.undelivered,
            )

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        while True:
            head = await reader.readexactly(HEADER_SIZE)
            (length,) = HEADER.unpack(head)
            message = acked.parse(await reader.readexactly(length))
            name = message.stream
            if message.kind == acked.ACK:
                self.confirm(name, message.seq)
            elif message.kind == acked.RESUME:
                state, candidate = self._answered(name)
                if candidate and self.holds(name):
                    # the old stream has results here again: the new one waits its turn
                    self._candidates.pop(name)
                    assert state is not None
                    for waiter in state.waiters:
                        if not waiter.done():
                            waiter.set_exception(
                                StreamRefused(f"stream {name!r} is in use with other data")
                            )
                    continue
                if candidate:
                    self.forget(name)  # the old stream, all of it delivered, goes
                    self._streams[name] = self._candidates.pop(name)
                self.confirm(name, message.seq)
                if state is not None:
                    for waiter in state.waiters:
                        if not waiter.done():
                            waiter.set_result(message.seq)
                    state.waiters.clear()
            elif message.kind == acked.REFUSED:
                state, candidate = self._answered(name)
                if state is not None:
                    for waiter in state.waiters:
                        if not waiter.done():
                            waiter.set_exception(StreamRefused(message.reason))
                    state.waiters.clear()
                if candidate:
                    del self._candidates[name]  # the stream already here stays as it was
                elif state is not None and not self.holds(name):
                    del self._streams[name]
            else:
                raise acked.ProtocolError(f"unexpected {message.kind!r} message from the listener")


def _message(result: BatchResult) -> bytes:
    """The DATA message that carries ``result`` to the listener."""
    return acked.data(str(result.stream), result.first_seq, result.count, result.output)


#: the TCP connector, with the acknowledged parts ``run --acked`` takes
CONNECTOR = replace(tcp.CONNECTOR, acked_source=AckedTcpSource, acked_sink=AckedTcpSink)
