"""One keep-alive HTTP/1.1 connection (an asyncio protocol) and the response read from it.

The parser is llhttp (via httptools, the C parser uvicorn uses): it handles Content-Length,
chunked transfer coding and malformed framing; this module only moves bytes between it and one
reader. Everything here runs in the event loop's callbacks, without tasks or locks, which is
why it costs a fraction of a general-purpose client.

A response is read by one consumer: `wait_head()`, then either `read(limit)` (the whole body;
returns the connection to the pool) or `read_chunk()` until it returns b"" (then `release()`).
`close()` drops the connection: the only way to stop an upstream that is still sending. Any
await that is cancelled closes the connection too, so a cancelled caller never leaves a request
running upstream.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import zlib
from heapq import heapify, heappop, heappush
from typing import NoReturn, Protocol

import httptools

# Reading pauses while a slow consumer leaves this much unread, and resumes below a quarter.
_PAUSE_ABOVE = 256 * 1024
_RESUME_BELOW = 64 * 1024
# A compressed stream is inflated at most this much per read (a small body must not become GBs).
_INFLATE_STEP = 4 * 1024 * 1024
# Limits on what an upstream may send around the body (llhttp sets none of its own, and
# httptools accumulates a header's name and value in memory until the header ends):
# - every byte fed to the parser before the final head is complete (status lines, header lines,
#   1xx answers), so one endless header line or status line is cut as early as many headers;
MAX_HEAD_BYTES = 64 * 1024
# - one header line (name and value), and the number of header lines, of one head;
MAX_HEADER_LINE = 16 * 1024
MAX_HEADERS = 100
# - 1xx answers (100 Continue, 103 Early Hints) before the real one;
MAX_INFORMATIONAL = 10
# - bytes in a row that carry no body once the head is done: chunk-size lines, chunk
#   extensions, trailers. Counted per read, so the bound is this plus at most one read.
MAX_FRAMING_BYTES = 64 * 1024


class HttpClientError(OSError):
    """The exchange with the upstream failed below HTTP semantics (connect, framing, reset)."""


class ServerDisconnectedError(HttpClientError):
    """The connection closed before the answer was complete."""


class InvalidResponseError(HttpClientError):
    """The upstream's bytes are not a valid HTTP/1.1 answer."""


class IdleTimeoutError(HttpClientError, TimeoutError):
    """Connecting, or waiting for the next bytes, took longer than the per-operation timeout."""


class BodyTooLargeError(ValueError):
    """The answer is larger than the caller's limit."""


# Answer header names as sent -> as `Response.headers` has them (decoded, lower case): the same
# dozen come in every answer. Names only (never a value), of at most 64 bytes, 256 of them.
_HEADER_NAMES: dict[bytes, str] = {}
_MAX_CACHED_HEADER_NAME = 64
_MAX_CACHED_HEADER_NAMES = 256


def _header_name(raw: bytes) -> str:
    name = raw.decode("latin-1").lower()
    if len(raw) <= _MAX_CACHED_HEADER_NAME:
        if len(_HEADER_NAMES) >= _MAX_CACHED_HEADER_NAMES:
            _HEADER_NAMES.clear()
        _HEADER_NAMES[raw] = name
    return name


class _StopParsing(Exception):
    """Raised from a parser callback after the failure was reported: abandons `feed_data`."""


class ConnectionPool(Protocol):
    def check_in(self, connection: Connection, *, reusable: bool) -> None: ...

    def forget(self, connection: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """A transport, its parser state, and the response being read from it (if any)."""

    def __init__(self, pool: ConnectionPool, key: tuple[str, str, int], *, public: bool) -> None:
        self.pool = pool
        self.key = key
        # Connected to a public address: reusable by calls whose target the operator did not list.
        self.public = public
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._response: Response | None = None
        self._parser: httptools.HttpResponseParser | None = None
        # One llhttp parser for every answer on this connection (llhttp starts the next message
        # where a kept-alive one ended); made on the first request, which costs several
        # microseconds (it looks up each callback on this object).
        self._reused_parser: httptools.HttpResponseParser | None = None
        self._header_pairs: list[tuple[bytes, bytes]] = []
        self._head_fed = 0  # bytes fed to the parser before the final head completed
        self._head_done = False
        self._header_count = 0
        self._informational_count = 0
        self._framing_run = 0  # bytes fed since the last body bytes (after the head)
        self._body_pieces = 0
        self._informational = False
        self._keep_alive = False
        self._until_eof = False  # no Content-Length, not chunked: the body ends with the connection
        self._reading_paused = False

    # -- used by the client and the response --------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def start(self, response: Response, payload: bytes) -> None:
        assert self.transport is not None
        self._response = response
        # Only a connection whose previous answer ended cleanly, kept alive, with no byte after
        # it, is started again (`finish(reusable=True)`): its parser is at a message's start.
        if self._reused_parser is None:
            self._reused_parser = httptools.HttpResponseParser(self)
        self._parser = self._reused_parser
        self._header_pairs = []
        self._head_fed = 0
        self._head_done = False
        self._header_count = 0
        self._informational_count = 0
        self._framing_run = 0
        self._body_pieces = 0
        self._informational = False
        self._keep_alive = False
        self._until_eof = False
        self.transport.write(payload)

    def finish(self, *, reusable: bool) -> None:
        """The response is done with this connection: back to the pool, or closed."""
        self._response = None
        self._parser = None
        self.resume_reading()
        self.pool.check_in(self, reusable=reusable and self._keep_alive and self.usable)

    def close(self, error: Exception | None = None) -> None:
        """Close the transport; a response still reading from it fails with `error`."""
        response = self._response
        self._response = None
        self._parser = None
        self._reused_parser = None  # it refers back to this connection: no cycle left behind
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        if response is not None:  # e.g. HttpClient.close() while an answer is being read
            response.on_error(error or ServerDisconnectedError("the connection was closed by the gateway"))

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> bool:
        """Resume a paused transport; True if it was paused."""
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()
            return True
        return False

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:  # bytes nobody asked for: this connection can no longer be trusted
            self.close()
            return
        try:
            if self._response is not None:
                self._response.note_bytes()
            if not self._head_done:
                data = self._feed_head(parser, data)
                if not data:
                    return
                if self._parser is not parser:  # the answer ended with bytes after it
                    self._keep_alive = False  # out of step: never reuse this connection
                    return
            pieces = self._body_pieces
            parser.feed_data(data)
            if self._parser is not parser:
                return
            self._framing_run = 0 if self._body_pieces != pieces else self._framing_run + len(data)
            if self._framing_run > MAX_FRAMING_BYTES:
                self._fail(
                    InvalidResponseError(
                        f"the upstream sent over {MAX_FRAMING_BYTES} bytes of chunk framing or trailers "
                        "without body"
                    )
                )
        except _StopParsing:
            return
        except httptools.HttpParserUpgrade:
            self._fail(InvalidResponseError("the upstream switched protocols, which was never asked for"))
        except httptools.HttpParserError as exc:
            self._fail(InvalidResponseError(f"the upstream sent a malformed HTTP answer ({exc})"))

    def _feed_head(self, parser: httptools.HttpResponseParser, data: bytes) -> bytes:
        """Feed what the head budget allows; returns the bytes left once the head completed."""
        budget = MAX_HEAD_BYTES - self._head_fed
        if len(data) <= budget:
            self._head_fed += len(data)
            parser.feed_data(data)
            return b""
        head, rest = data[:budget], data[budget:]
        self._head_fed += len(head)
        parser.feed_data(head)
        if self._parser is parser and not self._head_done:
            self._fail(InvalidResponseError(f"the upstream's response head is over {MAX_HEAD_BYTES} bytes"))
            return b""
        return rest

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost decides what the EOF means

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self._response
        self._response = None
        self._parser = None
        self._reused_parser = None
        if response is not None:
            if self._until_eof and response.status is not None and exc is None:
                response.on_complete()  # the body was "everything until the connection closes"
            else:
                # No byte of an answer yet (typically a kept-alive connection the upstream had
                # dropped as we sent on it) is not an answer cut off halfway.
                when = "mid-answer" if self._head_fed else "before answering"
                detail = f": {exc}" if exc else ""
                response.on_error(
                    ServerDisconnectedError(f"the upstream closed the connection {when}{detail}")
                )
        self.pool.forget(self)

    # -- httptools callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._parser is None:  # a second answer in one read: this connection is out of step
            self._keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            return  # a trailer: never used; MAX_FRAMING_BYTES bounds what it can cost
        if len(name) + len(value) > MAX_HEADER_LINE:
            self._fail(InvalidResponseError(f"the upstream sent a header line over {MAX_HEADER_LINE} bytes"))
            raise _StopParsing
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            self._fail(InvalidResponseError(f"the upstream sent over {MAX_HEADERS} headers"))
            raise _StopParsing
        self._header_pairs.append((name, value))

    def on_headers_complete(self) -> None:
        response, parser = self._response, self._parser
        if response is None or parser is None:
            return
        status = parser.get_status_code()
        if 100 <= status < 200:  # 100 Continue / 103 Early Hints: the real answer follows
            self._informational = True
            self._header_pairs = []
            self._header_count = 0
            self._informational_count += 1
            if self._informational_count > MAX_INFORMATIONAL:
                self._fail(InvalidResponseError(f"the upstream sent over {MAX_INFORMATIONAL} 1xx answers"))
                raise _StopParsing
            return
        self._head_done = True
        headers: dict[str, str] = {}
        names = _HEADER_NAMES
        for raw_name, raw_value in self._header_pairs:
            name = names.get(raw_name) or _header_name(raw_name)
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self._header_pairs = []
        self._keep_alive = parser.should_keep_alive()
        self._until_eof = (
            status not in (204, 304)
            and "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
        )
        response.on_head(status, headers)

    def on_body(self, body: bytes) -> None:
        if self._response is not None and self._parser is not None and not self._informational:
            self._body_pieces += 1
            self._response.on_body(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        response, parser = self._response, self._parser
        # Whatever follows in this connection belongs to no request of ours.
        self._parser = None
        if parser is not None and not parser.should_keep_alive():
            # llhttp decides again at the message's end, trailers included (a `Connection:
            # close` one), and would refuse any next answer: the connection, kept alive by its
            # head, reads the next one with a parser of its own, as before the reuse.
            self._reused_parser = None
        if response is not None:
            response.on_complete()

    def _fail(self, error: Exception) -> None:
        self.close(error)


class Response:
    """Status, headers (lower-case names) and the body of one answer, as it arrives."""

    __slots__ = (
        "status",
        "headers",
        "_connection",
        "_loop",
        "_chunks",
        "_buffered",
        "_complete",
        "_error",
        "_waiter",
        "_done",
        "_deadlines",
        "_idle_timeout",
        "_idle_timer",
        "_head_timer",
        "_last_progress",
        "_inflater",
        "reader_state",
        "_reading_whole",
    )

    def __init__(
        self,
        connection: Connection,
        loop: asyncio.AbstractEventLoop,
        *,
        deadline: float | None,
        idle_timeout: float | None,
        deadlines: DeadlineTimer,
    ) -> None:
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self._connection: Connection | None = connection
        self._loop = loop
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._complete = False  # every byte of the body arrived
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._done = False  # released or closed: the connection is no longer ours
        # Where this response's deadline waits while it is read (None: none, or no longer).
        self._deadlines: DeadlineTimer | None = None
        if deadline is not None:
            deadlines.add(self, deadline)
            self._deadlines = deadlines
        self._idle_timeout = idle_timeout
        self._last_progress = loop.time()
        self._idle_timer = (
            loop.call_later(idle_timeout, self._check_idle) if idle_timeout is not None else None
        )
        # The head (status, headers, any 1xx answers) must be complete within the deadline, or
        # without one within the idle timeout counted from now: bytes trickling in keep the idle
        # clock alive but do not extend this bound.
        self._head_timer = (
            loop.call_later(idle_timeout, self._head_overdue)
            if deadline is None and idle_timeout is not None
            else None
        )
        self._inflater: _Inflater | None = None
        # What a reader of the body left for the next one (a parser's read-ahead, for example).
        self.reader_state: object = None
        self._reading_whole = False

    # -- what callers use -------------------------------------------------------------------------

    @property
    def content_type(self) -> str:
        """The media type, lower-case, without parameters ('application/octet-stream' if absent)."""
        value = self.headers.get("content-type")
        if not value:
            return "application/octet-stream"
        return value.split(";", 1)[0].strip().lower()

    @property
    def idle_timeout(self) -> float | None:
        """The bound between reads (a stream without a caller deadline), else None."""
        return self._idle_timeout

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None

    async def wait_head(self) -> None:
        while self.status is None:
            if self._error is not None:
                self._raise_error(self._error)
            # `_wait` inlined: every request waits here (one coroutine fewer each).
            waiter = self._loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            except BaseException:  # cancelled: stop the upstream request now
                self.close()
                raise
            finally:
                self._waiter = None
        encoding = self.headers.get("content-encoding")
        # None without a Content-Encoding (what is asked for, and nearly every answer), as
        # `for_encoding(None)` would say.
        self._inflater = None if encoding is None else _Inflater.for_encoding(encoding)

    async def read(self, limit: int) -> bytes:
        """The whole body (at most `limit` bytes, decoded); the connection goes back to the pool."""
        self._reading_whole = True
        if self._connection is not None:
            self._connection.resume_reading()
        try:
            while not self._complete:
                if self._error is not None:
                    self._raise_error(self._error)
                if self._buffered > limit:
                    raise BodyTooLargeError(f"the answer is over {limit} bytes")
                await self._wait()
            body = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
            if len(body) > limit:
                raise BodyTooLargeError(f"the answer is over {limit} bytes")
            self._chunks = []
            self._buffered = 0
            if self._inflater is not None:
                body = self._inflater.inflate(body, limit=limit, final=True)
        except BaseException:
            self.close()
            raise
        self.release()
        return body

    async def read_chunk(self) -> bytes:
        """What arrived since the last call (waiting if nothing did); b"" once the body ended."""
        while True:
            if self._inflater is not None and self._inflater.pending:
                return self._inflater.inflate(b"", limit=_INFLATE_STEP, final=False)
            if self._chunks:
                data = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
                self._chunks = []
                self._buffered = 0
                if self._connection is not None and self._connection.resume_reading():
                    # Reading was paused for a slow reader: the upstream's silence so far is ours.
                    self._last_progress = self._loop.time()
                if self._inflater is not None:
                    data = self._inflater.inflate(data, limit=_INFLATE_STEP, final=False)
                    if not data:
                        continue
                return data
            if self._error is not None:
                self._raise_error(self._error)
            if self._complete:
                if self._inflater is not None and self._inflater.fed and not self._inflater.finished:
                    raise InvalidResponseError("the compressed body ends before its compressed stream does")
                return b""
            # `_wait` inlined: a stream waits here for every chunk (one coroutine fewer each).
            waiter = self._loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            except BaseException:  # cancelled: stop the upstream request now
                self.close()
                raise
            finally:
                self._waiter = None

    def release(self) -> None:
        """Done reading: a complete answer's connection is reused; otherwise it is closed."""
        if self._done:
            return
        if not self._complete or self._chunks:
            self.close()
            return
        self._finish()
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.finish(reusable=self._error is None)

    def close(self) -> None:
        """Drop the connection (an upstream still sending stops only this way)."""
        if self._done:
            return
        if not self._complete and self._error is None:  # a later read fails, never waits
            self._error = ServerDisconnectedError("the response was closed before its end")
        self._finish()
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
            connection.finish(reusable=False)

    # -- fed by the connection --------------------------------------------------------------------

    def on_head(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = headers
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._wake()

    def note_bytes(self) -> None:
        """Bytes of this answer arrived (headers, 1xx answers and body alike): the upstream is alive."""
        if self._idle_timer is not None:
            self._last_progress = self._loop.time()

    def on_body(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _PAUSE_ABOVE and not self._reading_whole and self._connection is not None:
            self._connection.pause_reading()
        self._wake()

    def on_complete(self) -> None:
        self._complete = True
        self._cancel_timers()
        self._wake()

    def on_error(self, error: Exception) -> None:
        if self._complete or self._error is not None:
            return  # the answer is already whole; a later reset changes nothing
        self._error = error
        self._cancel_timers()
        self._wake()

    # -- internals ------------------------------------------------------------------------------

    @staticmethod
    def _raise_error(error: Exception) -> NoReturn:
        # A copy, never the stored error itself: raised, an exception takes the traceback of the
        # frames it passes, and those hold this response and the whole call above it (its grpc
        # context, the request). Kept here, that is a cycle per failed call (response -> error ->
        # traceback -> frame -> response) that only the cyclic collector frees. Every stored
        # error is one of ours made from a message, which copies as a new exception of its type.
        raise copy.copy(error)

    async def _wait(self) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        except BaseException:  # cancelled: stop the upstream request now
            self.close()
            raise
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _deadline_passed(self) -> None:
        """Called by the DeadlineTimer, which already let go of this response."""
        self._deadlines = None
        self._fail(TimeoutError("the upstream did not answer in time"))

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.status is None:
            self._fail(
                IdleTimeoutError(
                    f"the upstream sent no complete response head within {self._idle_timeout:g} s"
                )
            )

    def _check_idle(self) -> None:
        self._idle_timer = None
        timeout = self._idle_timeout
        if self._complete or self._done or timeout is None:
            return
        waited = self._loop.time() - self._last_progress
        # Unread data means the reader is slow, not the upstream; unless the reader waits for more.
        if waited >= timeout and (not self._chunks or self._waiter is not None):
            self._fail(IdleTimeoutError(f"the upstream sent nothing for {timeout:g} s"))
            return
        self._idle_timer = self._loop.call_later(max(timeout - waited, 0.05), self._check_idle)

    def _fail(self, error: Exception) -> None:
        if self._complete or self._error is not None:
            return
        self._error = error
        connection, self._connection = self._connection, None
        self._done = True
        self._cancel_timers()
        if connection is not None:
            connection.close()
            connection.finish(reusable=False)
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._cancel_timers()

    def _cancel_timers(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._deadlines is not None:
            self._deadlines.discard(self)
            self._deadlines = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


class DeadlineTimer:
    """The deadlines of one loop's responses being read, behind one loop timer for the earliest.

    Arming and cancelling a loop timer costs ~8k instructions (uvloop) per request, and an
    answer nearly always comes long before its deadline. Here a response's deadline is a dict
    entry while it is read, and the one timer is armed for the earliest of them (again only when
    a response comes with an earlier one): when it fires, every response whose deadline it
    reached fails as its own timer would have failed it, and it is armed for the earliest left.

    The deadlines are also in a heap, so a fire costs by what is due, not by everything pending
    (an upstream outage leaves thousands of responses waiting, each deadline its own fire). A
    response that finished leaves only the dict; its heap entry goes when it reaches the top,
    when none is left pending (the heap is emptied), or when the heap holds over twice as many
    entries as are pending and 64 more (it is rebuilt of the pending ones): so what it keeps of
    finished responses is bounded by what is pending.
    """

    __slots__ = ("loop", "_pending", "_heap", "_order", "_timer", "_armed_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: dict[Response, float] = {}
        # (deadline, order of arrival, response), earliest first; the order breaks ties (as the
        # earlier arrival fails first) so that responses are never compared.
        self._heap: list[tuple[float, int, Response]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = 0.0

    def add(self, response: Response, deadline: float) -> None:
        self._pending[response] = deadline
        heappush(self._heap, (deadline, next(self._order), response))
        if self._timer is None or deadline < self._armed_at:
            if self._timer is not None:
                self._timer.cancel()
            self._arm(deadline)

    def discard(self, response: Response) -> None:
        pending = self._pending
        pending.pop(response, None)
        if not pending:
            self._heap.clear()  # only finished ones left in it
        elif len(self._heap) > 2 * len(pending) + _SPARE_HEAP_ENTRIES:
            heap = self._heap = [entry for entry in self._heap if entry[2] in pending]
            heapify(heap)

    def close(self) -> None:
        """Stop the timer and forget every deadline (the client closed its connections)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()
        self._heap.clear()

    def _arm(self, when: float) -> None:
        self._armed_at = when
        self._timer = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        # A loop may run a timer a little before its time (libuv counts milliseconds): what it
        # was armed for is due, as that response's own timer would have been.
        due = max(self.loop.time(), self._armed_at)
        pending, heap = self._pending, self._heap
        expired = []
        while heap and heap[0][0] <= due:
            response = heappop(heap)[2]
            if pending.pop(response, None) is not None:
                expired.append(response)
        while heap and heap[0][2] not in pending:  # finished: the next deadline is a live one's
            heappop(heap)
        if heap:
            self._arm(heap[0][0])
        for response in expired:
            try:
                response._deadline_passed()
            except Exception as exc:  # as the loop reports a failing timer of its own; the rest still run
                self.loop.call_exception_handler(
                    {"message": "a response's deadline could not be enforced", "exception": exc}
                )


# Finished responses' entries a DeadlineTimer's heap may hold beyond twice its pending ones.
_SPARE_HEAP_ENTRIES = 64


class _Inflater:
    """gzip/deflate decoding for an upstream that compresses although we asked for identity."""

    __slots__ = ("_decompressor", "pending", "fed")

    def __init__(self, wbits: int) -> None:
        self._decompressor = zlib.decompressobj(wbits)
        self.pending = False  # input left over from a read capped at its step
        self.fed = False  # any compressed input seen (an empty body is not a truncated one)

    @staticmethod
    def for_encoding(encoding: str | None) -> _Inflater | None:
        value = (encoding or "").strip().lower()
        if value in ("", "identity"):
            return None
        if value in ("gzip", "x-gzip"):
            return _Inflater(16 + zlib.MAX_WBITS)
        if value == "deflate":
            return _Inflater(zlib.MAX_WBITS)
        raise InvalidResponseError(f"the upstream used an unsupported Content-Encoding: {value[:40]}")

    @property
    def finished(self) -> bool:
        return self._decompressor.eof

    def inflate(self, data: bytes, *, limit: int, final: bool) -> bytes:
        decompressor = self._decompressor
        source = decompressor.unconsumed_tail + data if decompressor.unconsumed_tail else data
        self.fed = self.fed or bool(source)
        try:
            out = decompressor.decompress(source, limit + 1 if final else limit)
        except zlib.error as exc:
            raise InvalidResponseError(f"the upstream sent a body that does not decompress ({exc})") from exc
        if final and (len(out) > limit or decompressor.unconsumed_tail):
            raise BodyTooLargeError(f"the answer is over {limit} bytes once decompressed")
        if final and self.fed and not decompressor.eof:
            raise InvalidResponseError("the compressed body ends before its compressed stream does")
        self.pending = bool(decompressor.unconsumed_tail)
        return out
