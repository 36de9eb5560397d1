"""The Redis Streams connector: ``redis://[[USER]:PASSWORD@]HOST:PORT/STREAM`` for ``--in`` and
``--out`` (``rediss://`` for TLS).

**Source.** Consumer ``--name`` of consumer group ``--group`` on STREAM (the group
is created, with the stream, if missing, reading the stream from its start). On
start it first re-reads its own pending entries (those it had read and not
answered before it stopped), then reads new ones with ``XREADGROUP COUNT`` of up
to ``--max-batch`` entries, and every half ``--claim-idle-ms`` takes over, with
``XAUTOCLAIM``, entries that any consumer of the group has held for longer than
that (a consumer that died or stalls). The whole group is one stream of the
application, numbered from 0 in the order entries are read; each batch carries
its entry ids (a :class:`RedisEntries` receipt). An entry's field ``data`` is the payload, the
same bytes a TCP frame carries; an entry without it is answered as an empty
payload. Redis bounds an entry (512 MB); ``--max-frame`` does not apply, the
decoder refuses a payload of the wrong size. A read that brings large entries
makes the next read ask for fewer.

**Sink.** One result entry per input entry: field ``data`` the result payload,
field ``in`` the input entry's id. When the input entries come from a Redis
source on the same server (the same ``HOST:PORT`` and ``db`` written in both
URLs), a batch's result entries and the acknowledgement of its input entries
are one server-side script (:data:`COMMIT_SCRIPT`), which first asks
``XPENDING`` which of the batch's entries this consumer still owns and adds and
acknowledges only those: an entry taken over by another consumer is that
consumer's to answer. A commit that fails with the connection is sent again
after reconnecting, and since acknowledged entries are no longer pending, a
commit that had in fact been applied adds nothing the second time. Results of
another source (TCP: ``in`` is then ``STREAM:SEQ``, the connection's number and
the frame's sequence number in it) or of a Redis source on another server are
added with ``XADD`` in a transaction and, for Redis input, acknowledged by the
source afterwards.

With any other sink, the source acknowledges entries once the sink says their
results are delivered, by the same script without the results: only entries
it still owns.

The password is taken from the URL or, if the URL has none, from the
environment variable ``DIGITSTREAM_REDIS_PASSWORD`` (which keeps it out of
``ps``); :meth:`RedisURL.masked` is what logs and the metrics UI show.
A lost connection is retried with backoff, for ever; at start, a server that
cannot be reached or refuses the password is a :class:`UserError`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from dataclasses import dataclass, replace
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
from digitstream.wire.framing import Payloads, iter_frames

log = logging.getLogger("digitstream.redis")

#: where the password comes from when the URL has none
PASSWORD_ENV = "DIGITSTREAM_REDIS_PASSWORD"
#: the longest a blocking read waits before looking again (for a drain, a claim)
BLOCK_MS = 500
#: bytes one read may bring, as best as can be told from the entries read before
READ_BYTES = 64 << 20
#: most entries in one commit (one script call)
COMMIT_ENTRIES = 8192

#: KEYS[1] the input stream, KEYS[2] the result stream (absent: acknowledge only);
#: ARGV: group, consumer, the entry ids joined by spaces, then (with a result stream) the
#: results as frames (4-byte big-endian length, payload), one per id in order: two long
#: arguments rather than two per entry, which the client would encode one by one; then the
#: result stream's approximate MAXLEN (0: none). Adds a result entry (``data``, ``in``) and
#: acknowledges the input entry for each id this consumer still owns; returns {owned, not
#: owned}.
COMMIT_SCRIPT = """
local group, consumer, results = ARGV[1], ARGV[2], ARGV[4]
local maxlen = ARGV[5] or '0'
local ids = {}
for id in string.gmatch(ARGV[3], '%S+') do ids[#ids + 1] = id end
local n = #ids
if n == 0 then return {0, 0} end
-- An id is two unsigned 64-bit integers, compared here as the decimal strings they are:
-- Lua's numbers are doubles, which tell integers apart only below 2^53.
local function parse(id)
  return string.match(id, '^0*(%d+)-0*(%d+)$')
end
-- a < b, decimals without leading zeros: the longer is the larger; of equal lengths,
-- up to 15 digits are exact as numbers, longer ones are taken 10 digits at a time
-- (numbers, not strings, which Lua orders by the locale's collation)
local function below(a, b)
  if #a ~= #b then return #a < #b end
  if #a <= 15 then return tonumber(a) < tonumber(b) end
  local x, y = tonumber(string.sub(a, 1, 10)), tonumber(string.sub(b, 1, 10))
  if x ~= y then return x < y end
  return tonumber(string.sub(a, 11)) < tonumber(string.sub(b, 11))
end
local function before(ms, seq, other_ms, other_seq)
  if ms ~= other_ms then return below(ms, other_ms) end
  return below(seq, other_seq)
end
-- one XPENDING over the range the ids span, rather than one per id
local lo, hi = ids[1], ids[1]
local lo_ms, lo_seq = parse(lo)
local hi_ms, hi_seq = lo_ms, lo_seq
for i = 2, n do
  local ms, seq = parse(ids[i])
  if before(ms, seq, lo_ms, lo_seq) then lo, lo_ms, lo_seq = ids[i], ms, seq end
  if before(hi_ms, hi_seq, ms, seq) then hi, hi_ms, hi_seq = ids[i], ms, seq end
end
local owned = {}
local pending = redis.call('XPENDING', KEYS[1], group, lo, hi, 1000000000, consumer)
for _, entry in ipairs(pending) do owned[entry[1]] = true end
local ack, done, pos = {}, 0, 1
for i = 1, n do
  local id = ids[i]
  local data
  if results then
    local length, start = struct.unpack('>I4', results, pos)
    data = string.sub(results, start, start + length - 1)
    pos = start + length
  end
  if owned[id] then
    owned[id] = nil
    if results then
      if maxlen ~= '0' then
        redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'data', data, 'in', id)
      else
        redis.call('XADD', KEYS[2], '*', 'data', data, 'in', id)
      end
    end
    ack[#ack + 1] = id
    -- unpack() is bounded by Lua's C stack: acknowledge in slices
    if #ack == 1000 then
      redis.call('XACK', KEYS[1], group, unpack(ack))
      done = done + #ack
      ack = {}
    end
  end
end
if #ack > 0 then
  redis.call('XACK', KEYS[1], group, unpack(ack))
  done = done + #ack
end
return {done, n - done}
"""


#: what every Redis URL may say, for the connection
CLIENT_OPTIONS = (
    Option("db", integer(0, 1 << 20), 0, "The database number.", metavar="N"),
    Option("ca", text, None, "TLS: a CA bundle to trust instead of the system's.", metavar="FILE"),
    Option("cert", text, None, "TLS: this client's certificate (PEM).", metavar="FILE"),
    Option("key", text, None, "TLS: this client's private key (PEM).", metavar="FILE"),
)
CLAIM_IDLE = Option(
    "claim-idle-ms",
    integer(1, 86_400_000),
    10_000,
    "With --in redis://...: take over entries another consumer has held this long.",
    flag=True,
    metavar="MS",
)


TRIM_INPUT = Option(
    "trim-input",
    boolean,
    True,
    "Remove input entries once every group of the stream has acknowledged them (0: keep them all).",
    metavar="1|0",
)
MAXLEN = Option(
    "maxlen",
    integer(0, 1 << 62),
    1_000_000,
    "Keep about this many entries in the result stream, the oldest removed as new ones "
    "come (approximate, as MAXLEN ~; 0: keep them all).",
    metavar="N",
)
#: seconds between two trims of the input stream
TRIM_EVERY = 5.0


def _entry_id(text: bytes | str) -> tuple[int, int]:
    """A stream entry id as the two unsigned 64-bit numbers it is (compared exactly)."""
    raw = text.decode() if isinstance(text, bytes) else str(text)
    ms, _, seq = raw.partition("-")
    return int(ms), int(seq or 0)


def _retried_errors() -> tuple[type[BaseException], ...]:
    """A lost connection, and any error the server answers: logged and tried again with
    backoff, never skipped, since what is refused now (out of memory, a busy script, a
    server loading its data) may be taken later."""
    # start-up time: redis-py loads only where Redis is used
    from redis.exceptions import RedisError

    return (RedisError, OSError)


@dataclass(frozen=True)
class RedisURL(ServerURL):
    """A parsed ``redis://`` or ``rediss://`` endpoint. ``password`` is never in ``str()``."""

    db: int = 0

    schemes = ("redis", "rediss")

    @classmethod
    def parse(cls, location: str, tls: bool = False, environ=os.environ) -> RedisURL:
        """``[[USER]:PASSWORD@]HOST:PORT/STREAM[?db=N&ca=FILE&cert=FILE&key=FILE]``, what
        follows ``redis://``; UserError (with the password masked) if malformed."""
        scheme = "rediss" if tls else "redis"
        endpoint = Endpoint.parse(f"{scheme}://{location}")
        return cls.of(endpoint, resolve_options(CLIENT_OPTIONS, endpoint), environ)

    @classmethod
    def of(cls, endpoint: Endpoint, options: dict, environ=os.environ) -> RedisURL:
        """The URL of ``endpoint`` (its :data:`CLIENT_OPTIONS` parsed into ``options``)."""
        where = Location.of(Endpoint(endpoint.scheme, endpoint.location), "STREAM")
        if not where.password:
            where = replace(where, password=environ.get(PASSWORD_ENV) or None)
        return cls.located(where, endpoint.scheme == "rediss", options, db=options["db"])

    @property
    def server(self) -> str:
        """Which server and database, as written: two endpoints are one server when equal."""
        return f"{self.host}:{self.port}/{self.db}"

    def masked(self, query: str = "") -> str:
        return super().masked(query or (f"?db={self.db}" if self.db else ""))

    def client(self, sync: bool = False, **options):
        """A ``redis.asyncio`` client (``redis.Redis`` with ``sync``; hiredis parses replies
        when it is installed); it does not retry by itself: the connector does, with its own
        backoff and log lines."""
        # start-up time: redis-py loads only where Redis is used
        import redis
        import redis.asyncio
        import redis.asyncio.retry
        import redis.retry
        from redis.backoff import NoBackoff

        kwargs: dict = {}
        if self.tls:
            kwargs.update(
                ssl=True, ssl_ca_certs=self.ca, ssl_certfile=self.cert, ssl_keyfile=self.key
            )
        kwargs["retry"] = (redis.retry.Retry if sync else redis.asyncio.retry.Retry)(NoBackoff(), 0)
        client_class: Any = redis.Redis if sync else redis.asyncio.Redis
        return client_class(
            host=self.host,
            port=self.port,
            db=self.db,
            username=self.username,
            password=self.password,
            socket_connect_timeout=5.0,
            socket_timeout=10.0,
            protocol=2,
            **kwargs,
            **options,
        )


async def check_server(url: RedisURL, client) -> None:
    """PING ``client``: :func:`server_error` if that fails."""
    try:
        await client.ping()
    except Exception as exc:
        raise server_error(url, exc) from None


def server_error(url: RedisURL, exc: BaseException) -> UserError:
    """What a user reads, in one line and without the password, when a first PING failed: the
    server cannot be reached, or refuses the credentials."""
    # start-up time: redis-py loads only where Redis is used
    from redis.exceptions import AuthenticationError, RedisError, ResponseError

    where = f"redis at {url.host}:{url.port}"
    text = str(exc) or type(exc).__name__
    refused = isinstance(exc, AuthenticationError) or (
        isinstance(exc, ResponseError) and ("AUTH" in text or "WRONGPASS" in text)
    )
    if refused and not url.password:
        return UserError(
            f"{where} needs a password: give it in the URL (redis://:PASSWORD@HOST:PORT/STREAM) "
            f"or in ${PASSWORD_ENV}"
        )
    if refused:
        return UserError(f"{where} refused the password: {text}")
    if isinstance(exc, (RedisError, OSError)):
        hint = _tls_hint(url, text)
        return UserError(f"cannot reach {where}: {text.rstrip('.') if hint else text}{hint}")
    return UserError(f"{where}: {text}")


def _tls_hint(url: RedisURL, text: str) -> str:
    """What to do about a TLS failure, when the error says which kind it is."""
    if not url.tls:
        return ""
    if "CERTIFICATE_VERIFY_FAILED" in text:
        if url.ca:
            return f"; the server's certificate does not verify against {url.ca}"
        return (
            "; the server's certificate is not signed by an authority trusted here: name the "
            "one that signed it with ?ca=FILE"
        )
    if not url.cert and ("SSL" in text or "_ssl.c" in text or "EOF occurred" in text):
        return (
            "; the TLS handshake failed: if the server asks clients for a certificate "
            "(tls-auth-clients), give one with ?cert=FILE&key=FILE"
        )
    return ""


class RedisEntries(Receipt):
    """The receipt of a batch read from Redis: its entries' ids, in the batch's order, and
    where they were read (what the Redis sink needs to commit their results and acknowledge
    them in one step, when it writes to the same server)."""

    __slots__ = ("consumer", "group", "ids", "key", "server")

    def __init__(self, source: RedisSource, batch: Batch, ids: list[bytes], server: str, key: str):
        super().__init__(source, batch.stream, batch.first_seq, batch.end_seq)
        self.ids = ids
        self.server = server
        self.key = key
        self.group = source.group
        self.consumer = source.consumer


class RedisSource(GroupSource):
    """Redis Streams source, at least once: a crash of ``run`` costs nothing (its entries stay
    pending and are read again, by it on restart or by another consumer after
    ``--claim-idle-ms``); with the Redis sink on the same server, exactly once into the result
    stream; a crash of Redis loses what it had not persisted.

    See the module doc.
    """

    guarantee = (
        "at least once (exactly once with the Redis sink): a crash of run leaves its entries "
        "pending, to be read again"
    )
    options = (*CLIENT_OPTIONS, GROUP, CLAIM_IDLE, TRIM_INPUT)

    def __init__(
        self,
        url: RedisURL,
        group: str,
        consumer: str,
        policy: BatchPolicy,
        claim_idle_ms: int = 10_000,
        trim_input: bool = True,
    ):
        super().__init__(url.stream, policy, str(url), log)
        self.url = url
        self.group = group
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.trim_input = trim_input
        self.client: Any = None
        self._ack_script: Any = None
        self._reading_own = True  # re-reading this consumer's own pending entries
        self._own_cursor = b"0"
        self._claim_cursor = b"0-0"
        self._next_claim = 0.0
        self._count = policy.max_batch
        self._read_backoff = Backoff(f"reading {url}", log=log)
        self.counts = collections.Counter(
            read=0, redelivered=0, claimed=0, acknowledged=0, lost=0, reconnects=0, trimmed=0
        )
        self.group_pending: int | None = None  # the whole group's, as XPENDING last said

    @classmethod
    def build(
        cls, endpoint: Endpoint, options: dict, config: AppConfig, metrics=None
    ) -> RedisSource:
        # what it counts, the application reads from counters(): metrics is not needed
        return cls(
            RedisURL.of(endpoint, options),
            options["group"],
            config.name,
            BatchPolicy(config.max_batch, config.max_delay),
            claim_idle_ms=options["claim-idle-ms"],
            trim_input=options["trim-input"],
        )

    def describe(self) -> str:
        return f"{self.url.masked()} (group {self.group}, consumer {self.consumer})"

    async def start(self, sink: Sink) -> None:
        # start-up time: redis-py loads only where Redis is used
        from redis.exceptions import ResponseError

        self.client = self.url.client()
        await check_server(self.url, self.client)
        try:
            await self._create_group()
        except ResponseError as exc:
            raise UserError(f"cannot read {self.url}: {exc}") from None
        self._ack_script = self.client.register_script(COMMIT_SCRIPT)
        # the raw replies: turning each entry's fields into a dict costs more than the rest
        # of reading it (see _payload)
        for command in ("XREADGROUP", "XAUTOCLAIM"):
            self.client.set_response_callback(command, _raw_reply)
        self.open_stream(self._watch_group())

    async def _create_group(self) -> None:
        # start-up time: redis-py loads only where Redis is used
        from redis.exceptions import ResponseError

        try:
            await self.client.xgroup_create(self.url.stream, self.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", self.group, self.url)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ------------------------------------------------------------------ reading
    async def read(self, timeout: float | None) -> list[Payloads] | None:
        """The next entries' payloads (one group); ``[]`` when ``timeout`` passes first, None
        once draining. Waits out a lost connection."""
        # start-up time: redis-py loads only where Redis is used
        from redis.exceptions import ResponseError

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.draining:
            block = BLOCK_MS
            if deadline is not None:
                block = int((deadline - time.monotonic()) * 1000)
                if block <= 0:
                    return []
            try:
                entries, kind = await self._next_entries(min(block, BLOCK_MS))
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    await self._read_backoff.failed(exc)
                    continue
                log.warning(
                    "the group %s of %s is gone (did Redis lose its data?); creating it again "
                    "from the stream's start",
                    self.group,
                    self.url,
                )
                await self._create_group_retrying()
                continue
            except _retried_errors() as exc:
                if self._read_backoff.failing_since is None:
                    self.counts["reconnects"] += 1
                await self._read_backoff.failed(exc)
                continue
            self._read_backoff.succeeded()
            if entries:
                return [self._take(entries, kind)]
        return None

    async def _create_group_retrying(self) -> None:
        while True:
            try:
                await self._create_group()
                return
            except _retried_errors() as exc:
                await self._read_backoff.failed(exc)

    async def _next_entries(self, block_ms: int) -> tuple[list, str]:
        client, key = self.client, self.url.stream
        if self._reading_own:
            reply = await client.xreadgroup(
                self.group, self.consumer, {key: self._own_cursor}, count=self._count
            )
            entries = reply[0][1] if reply else []
            if entries:
                self._own_cursor = entries[-1][0]
                return entries, "redelivered"
            self._reading_own = False
        now = time.monotonic()
        if now >= self._next_claim:
            cursor, entries, *_ = await client.xautoclaim(
                key, self.group, self.consumer, self.claim_idle_ms, self._claim_cursor, self._count
            )
            self._claim_cursor = cursor
            if cursor in (b"0-0", "0-0"):
                self._next_claim = now + self.claim_idle_ms / 2000
            if entries:
                return entries, "claimed"
        reply = await client.xreadgroup(
            self.group, self.consumer, {key: ">"}, count=self._count, block=max(block_ms, 1)
        )
        return (reply[0][1] if reply else []), "read"

    def _take(self, entries: list, kind: str) -> Payloads:
        ids = [entry_id for entry_id, _ in entries]
        payloads = [_payload(fields) for _, fields in entries]
        size = sum(map(len, payloads))
        if size > READ_BYTES // 2 or self._count < self.policy.max_batch:
            per_entry = max(1, size // len(entries))
            self._count = max(1, min(self.policy.max_batch, READ_BYTES // per_entry))
        self.counts[kind] += len(ids)
        self.pending += len(ids)
        self.unbatched.add(ids)
        if kind == "claimed":
            log.info("took over %d entries idle for over %d ms", len(ids), self.claim_idle_ms)
        return Payloads.from_list(payloads)

    def receipt_for(self, batch: Batch, items: list) -> Receipt:
        """The entries of ``batch`` (their ids are ``items``), kept until its results are
        delivered."""
        return RedisEntries(self, batch, items, self.url.server, self.url.stream)

    # ------------------------------------------------------------ acknowledging
    def retried_errors(self) -> tuple[type[BaseException], ...]:
        return _retried_errors()

    async def settle(self, receipts: list[Receipt]) -> None:
        """Acknowledge the entries of ``receipts`` this consumer still owns (the commit
        script without results), ``COMMIT_ENTRIES`` at a time."""
        ids = [entry_id for receipt in receipts for entry_id in _ids(receipt)]
        for start in range(0, len(ids), COMMIT_ENTRIES):
            done, lost = await self._ack_script(
                keys=[self.url.stream],
                args=[self.group, self.consumer, b" ".join(ids[start : start + COMMIT_ENTRIES])],
            )
            self.counts["acknowledged"] += done
            self.counts["lost"] += lost

    async def _watch_group(self) -> None:
        """Keeps :attr:`group_pending` current, for the metrics, and trims the input stream
        every ``TRIM_EVERY`` seconds (``?trim-input=1``, the default)."""
        next_trim = 0.0
        while True:
            try:
                summary = await self.client.xpending(self.url.stream, self.group)
                self.group_pending = int(summary["pending"])
                if self.trim_input and time.monotonic() >= next_trim:
                    next_trim = time.monotonic() + TRIM_EVERY
                    await self.trim()
            except Exception:  # the reader reports a lost connection; this only skips a beat
                pass
            await asyncio.sleep(1.0)

    async def trim(self) -> int:
        """Remove the input entries every group of the stream has acknowledged: those before
        the oldest entry any group has pending, or has not yet read. The number removed."""
        groups = await self.client.xinfo_groups(self.url.stream)
        if not groups:
            return 0
        keep: list[tuple[int, int]] = []
        for group in groups:
            name, pending = group["name"], int(group["pending"])
            if pending:
                summary = await self.client.xpending(self.url.stream, name)
                first = summary["min"]
            else:
                first = group["last-delivered-id"]
            keep.append(_entry_id(first))
        oldest = min(keep)
        if oldest == (0, 0):
            return 0
        # approximate: Redis frees whole nodes of its radix tree, which costs next to nothing;
        # limit 0: all of them (an approximate trim stops at 10,000 entries by default)
        removed = await self.client.xtrim(
            self.url.stream, minid=f"{oldest[0]}-{oldest[1]}", approximate=True, limit=0
        )
        self.counts["trimmed"] += removed
        return removed

    def counters(self) -> dict | None:
        """What the metrics show of it: entries by what happened to them, and pending now."""
        return {
            "connector": "redis",
            "where": self.describe(),
            "counters": dict(self.counts),
            "gauges": {"pending": self.pending, "group_pending": self.group_pending or 0},
        }

    async def close(self) -> None:
        await super().close()
        if self.client is not None:
            await self.client.aclose()


class RedisSink(QueuedSink):
    """Redis Streams sink, exactly once for entries of a Redis source on the same server (each
    result committed with its input's acknowledgement, only by the consumer that owns the
    entry), at least once otherwise: a crash of ``run`` loses nothing; a lost connection
    during a transaction of other results can add them twice.

    See the module doc. ``write`` waits while ``high_water`` results are queued: that is the
    back-pressure that stops the source reading when Redis is slow or gone.
    """

    guarantee = (
        "exactly once for entries of a Redis source on the same server, at least once "
        "otherwise: a crash of run loses nothing"
    )
    options = (*CLIENT_OPTIONS, MAXLEN)
    group_limit = COMMIT_ENTRIES

    def __init__(
        self, url: RedisURL, high_water: int = 4 * COMMIT_ENTRIES, maxlen: int = 1_000_000
    ):
        super().__init__(f"writing {url}")
        self.url = url
        self.maxlen = maxlen
        self.high_water = high_water
        self.client: Any = None
        self._script: Any = None
        self.counts.update(committed=0, acknowledged=0, skipped=0)

    @classmethod
    def build(cls, endpoint: Endpoint, options: dict, config: AppConfig) -> RedisSink:
        return cls(RedisURL.of(endpoint, options), maxlen=options["maxlen"])

    def describe(self) -> str:
        return self.url.masked()

    def retried_errors(self) -> tuple[type[BaseException], ...]:
        return _retried_errors()

    async def start(self) -> None:
        self.client = self.url.client()
        await check_server(self.url, self.client)
        self._script = self.client.register_script(COMMIT_SCRIPT)
        await super().start()

    def weight(self, result: BatchResult) -> int:
        return result.count

    def joins(self, first: BatchResult, result: BatchResult) -> bool:
        return self._kind(result) == self._kind(first)

    def _kind(self, result: BatchResult):
        receipt = result.receipt
        if isinstance(receipt, RedisEntries) and receipt.server == self.url.server:
            return (receipt.key, receipt.group, receipt.consumer)
        return None

    async def deliver(self, results: list[BatchResult]) -> None:
        first = results[0]
        receipt = first.receipt
        if self._kind(first) is not None:
            assert isinstance(receipt, RedisEntries)
            ids = b" ".join(i for result in results for i in _entries(result).ids)
            # the results' framed bytes are what the script takes: no need to split them here
            outputs = first.output if len(results) == 1 else b"".join(r.output for r in results)
            done, skipped = await self._script(
                keys=[receipt.key, self.url.stream],
                args=[receipt.group, receipt.consumer, ids, outputs, str(self.maxlen)],
            )
            for result in results:
                _entries(result).settled = True
            self.counts["committed"] += done
            self.counts["acknowledged"] += done
            if skipped:
                self.counts["skipped"] += skipped
                log.info(
                    "%d results not written: their entries were taken over by another "
                    "consumer, whose results they are",
                    skipped,
                )
            return
        payloads = [p for result in results for p in iter_frames(result.output)]
        sources: list = []
        for result in results:
            if isinstance(result.receipt, RedisEntries):
                sources.extend(result.receipt.ids)
            else:
                stream = result.stream
                sources.extend(f"{stream}:{seq}" for seq in range(result.first_seq, result.end_seq))
        pipe = self.client.pipeline(transaction=True)
        for source_id, payload in zip(sources, payloads):
            pipe.xadd(
                self.url.stream,
                {"data": payload, "in": source_id},
                maxlen=self.maxlen or None,
                approximate=True,
            )
        await pipe.execute()
        self.counts["committed"] += len(payloads)

    def counters(self) -> dict | None:
        return {
            "connector": "redis",
            "where": self.describe(),
            "counters": {
                **{name: self.counts[name] for name in ("committed", "acknowledged", "skipped")},
                "reconnects": self.backoff.outages,
            },
            "gauges": {"pending": self.undelivered},
        }

    async def close(self) -> None:
        await super().close()
        if self.client is not None:
            await self.client.aclose()


def _raw_reply(response, **options):
    return response


def _payload(fields: list | None) -> bytes:
    """The ``data`` of an entry's raw fields (``[name, value, ...]``), first where the sender
    puts it; empty when absent, or when the entry was deleted while pending (no fields)."""
    if not fields:
        return b""
    if fields[0] == b"data":
        return fields[1]
    for i in range(2, len(fields) - 1, 2):
        if fields[i] == b"data":
            return fields[i + 1]
    return b""


def _ids(receipt: Receipt) -> list[bytes]:
    assert isinstance(receipt, RedisEntries)  # a Redis source makes no other
    return receipt.ids


def _entries(result: BatchResult) -> RedisEntries:
    assert isinstance(result.receipt, RedisEntries)
    return result.receipt


# ------------------------------------------------------------------ send and listen
def _connect_sync(url: RedisURL):
    """A synchronous client whose server answered PING; UserError in one line if it did not."""
    client = url.client(sync=True)
    try:
        client.ping()
    except Exception as exc:
        raise server_error(url, exc) from None
    return client


class RedisPublisher:
    """``send --to redis://...``: one entry per image, fields ``data``, ``label`` and ``id``,
    pipelined many to a round trip."""

    def __init__(self, endpoint: Endpoint):
        self.url = RedisURL.of(endpoint, resolve_options(CLIENT_OPTIONS, endpoint))
        self.client = _connect_sync(self.url)

    def describe(self) -> str:
        return str(self.url)

    def publish(self, payloads: list[bytes], labels: list[bytes], ids: list[bytes]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for payload, label, entry_id in zip(payloads, labels, ids):
            pipe.xadd(self.url.stream, {"data": payload, "label": label, "id": entry_id})
        pipe.execute()

    def flush(self) -> None:
        pass  # publish() returns once Redis has them

    def close(self) -> None:
        self.client.close()


class RedisResultReader:
    """``listen redis://...``: the result stream's entries from its start, their ``data``."""

    def __init__(self, endpoint: Endpoint):
        self.url = RedisURL.of(endpoint, resolve_options(CLIENT_OPTIONS, endpoint))
        self.client = _connect_sync(self.url)
        self._last = b"0-0"

    def describe(self) -> str:
        return str(self.url)

    def read(self, most: int, timeout: float) -> list[bytes]:
        reply = self.client.xread(
            {self.url.stream: self._last}, count=most, block=int(timeout * 1000)
        )
        if not reply:
            return []
        entries = reply[0][1]
        self._last = entries[-1][0]
        return [(fields or {}).get(b"data", b"") for _, fields in entries]

    def close(self) -> None:
        self.client.close()


CONNECTOR = Connector(
    ("redis", "rediss"),
    RedisSource,
    RedisSink,
    publisher=RedisPublisher,
    result_reader=RedisResultReader,
    title="Redis Streams",
)
