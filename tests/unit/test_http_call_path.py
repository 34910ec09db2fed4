"""The upstream call's fast paths (session 21), each against the general code it stands for.

- `post(..., fixed=FixedHeaders(...))` sends exactly the bytes `headers={**fixed, **own}` would:
  the fixed lines are cached per client (never a value of the call's own headers), and any
  override, unknown name or value to refuse goes to the general merge.
- A kept-alive connection parses every answer with one llhttp parser; answers of every framing
  in a row come out as with a new parser each, and a closed connection drops it (no cycle).
- `CallOptions.timeout()` without a deadline shares one Timeout per value.
- Every response's deadline waits behind one loop timer (`DeadlineTimer`): each still fails at
  its own deadline, in any order of arrival, and nothing is left of one that finished.
- Answer header names are remembered decoded (names only, bounded): the same headers either way.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import weakref

import pytest

from server.config import RetrySettings
from server.core.retry import Deadline
from server.errors import DeadlineExceeded
from server.providers import http as http_module
from server.providers import http_connection
from server.providers.http import (
    FixedHeaders,
    HttpClient,
    InvalidHeaderError,
    InvalidResponseError,
    Timeout,
    _header_block,
)
from server.providers.http_connection import DeadlineTimer
from server.providers.openai_compat import CallOptions
from tests.unit.test_http_client import (
    BOUNDED,
    LIMIT,
    Peer,
    chunked,
    http_answer,
    raw_server,
    replying,
    then_silent,
)

JSON = FixedHeaders({"Content-Type": "application/json", "Accept": "application/json"})
KEY = "sk-fixed-path-0123456789"


def general(client: HttpClient, fixed: FixedHeaders, own: dict[str, str], length: int) -> bytes:
    return _header_block(client._default_headers, {**fixed.headers, **own}, length)


@pytest.mark.parametrize(
    "own",
    [
        {},
        {"Authorization": f"Bearer {KEY}"},
        {"Authorization": f"Bearer {KEY}", "HTTP-Referer": "https://example.org", "X-Title": "t"},
        # overrides: of a fixed header (lower case, as Anthropic's), of a default, of both
        {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"},
        {"user-agent": "me/1", "Authorization": "Bearer k"},
        {"ACCEPT": "text/plain", "Accept-Encoding": "gzip"},
        # the same name twice in one dict (case differs): the later wins, at the first's place
        {"X-Dup": "1", "x-dup": "2", "X-Other": "3"},
        # values the quick check passes on to the general one: a tab, non-ASCII, empty
        {"X-Tab": "a\tb"},
        {"X-Text": "café ☕"},
        {"X-Empty": ""},
        # a name never seen before (not yet known usable)
        {"X-Brand-New-Name-For-This-Test": "v"},
    ],
)
def test_fixed_headers_send_what_the_merged_headers_would(own: dict[str, str]) -> None:
    client = HttpClient()
    for length in (0, 7, 123456):
        for _ in range(2):  # the first call fills the caches, the second uses them
            assert client._block_after_fixed(JSON, own, length) == general(client, JSON, own, length)


def test_fixed_headers_after_custom_defaults_that_they_override() -> None:
    client = HttpClient(default_headers={"Accept": "*/*", "X-Client": "c"})
    fixed = FixedHeaders({"accept": "application/json", "X-Fixed": "f"})
    for own in ({"Authorization": "Bearer k"}, {"x-client": "mine"}, {}):
        for _ in range(2):
            assert client._block_after_fixed(fixed, own, 5) == general(client, fixed, own, 5)


@pytest.mark.parametrize(
    ("own", "refused"),
    [
        ({"Authorization": "Bearer a\r\nInjected: 1"}, "Authorization"),
        ({"Authorization": "Bearer a\nb"}, "Authorization"),
        ({"X-Nul": "a\x00b"}, "X-Nul"),
        ({"X-Del": "a\x7fb"}, "X-Del"),
        ({"X-Fine": "ok", "Bad Name": "v"}, "Bad Name"),
        ({"Host": "evil.example"}, "Host"),
        ({"content-length": "0"}, "content-length"),
    ],
)
def test_fixed_headers_refuse_what_the_general_path_refuses(own: dict[str, str], refused: str) -> None:
    client = HttpClient()
    client._block_after_fixed(JSON, {"Authorization": "Bearer warm"}, 0)  # caches filled
    with pytest.raises(InvalidHeaderError) as fast:
        client._block_after_fixed(JSON, own, 0)
    with pytest.raises(InvalidHeaderError) as slow:
        general(client, JSON, own, 0)
    assert fast.value.header == slow.value.header == refused
    assert "Injected" not in str(fast.value)


def test_fixed_headers_are_checked_when_made() -> None:
    with pytest.raises(InvalidHeaderError):
        FixedHeaders({"Content-Type": "application/json\r\nX-Injected: 1"})
    with pytest.raises(InvalidHeaderError):
        FixedHeaders({"Transfer-Encoding": "chunked"})
    source = {"Accept": "a/b"}
    fixed = FixedHeaders(source)
    source["Accept"] = "changed"
    assert fixed.headers == {"Accept": "a/b"}


def test_the_fixed_cache_keeps_no_value_of_a_calls_headers_and_is_bounded() -> None:
    client = HttpClient()
    for n in range(3):
        client._block_after_fixed(JSON, {"Authorization": f"Bearer {KEY}-{n}"}, 10)
    assert list(client._fixed_blocks) == [JSON]
    lines, taken = client._fixed_blocks[JSON]
    assert b"sk-" not in lines and "authorization" not in taken
    for _ in range(http_module._MAX_FIXED_BLOCKS + 10):
        fixed = FixedHeaders({"X-Fixed": "1"})
        assert client._block_after_fixed(fixed, {}, 0) == general(client, fixed, {}, 0)
        assert len(client._fixed_blocks) <= http_module._MAX_FIXED_BLOCKS


async def test_post_with_fixed_headers_sends_the_same_request_bytes() -> None:
    own = {"Authorization": f"Bearer {KEY}", "X-Title": "t"}
    async with raw_server(replying(http_answer(b"{}"))) as server:
        client = HttpClient()
        try:
            for fixed in (JSON, None):
                headers = own if fixed is not None else {**JSON.headers, **own}
                response = await client.post(
                    server.url(), b'{"a":1}', headers, BOUNDED, private_ok=True, fixed=fixed
                )
                assert await response.read(LIMIT) == b"{}"
        finally:
            await client.close()
    with_fixed, merged = server.requests
    assert with_fixed.raw_head == merged.raw_head
    assert with_fixed.header("authorization") == f"Bearer {KEY}"
    assert with_fixed.body == merged.body == b'{"a":1}'


async def test_one_parser_reads_every_framing_in_a_row_on_one_connection() -> None:
    answers = [
        http_answer(b'{"n": 1}'),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-N: 2\r\n\r\n" + chunked(b'{"n"', b": 2}"),
        b"HTTP/1.1 100 Continue\r\n\r\n" + http_answer(b'{"n": 3}', headers=(("X-N", "3"),)),
        b"HTTP/1.1 204 No Content\r\nX-N: 4\r\n\r\n",
        http_answer(b"", status="200 OK"),
        # a trailer on a chunked answer, then a plain one again
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"six", trailer=b"X-T: 1\r\n"),
        http_answer(b'{"n": 7}', status="503 Service Unavailable"),
    ]
    expected = [
        (200, b'{"n": 1}'),
        (200, b'{"n": 2}'),
        (200, b'{"n": 3}'),
        (204, b""),
        (200, b""),
        (200, b"six"),
        (503, b'{"n": 7}'),
    ]

    async def handler(peer: Peer) -> None:
        for answer in answers:
            await peer.read_request()
            # In two pieces, split inside the head: the parser resumes mid-message.
            await peer.send(answer[:9])
            await asyncio.sleep(0.005)
            await peer.send(answer[9:])
        await peer.wait_client_close()

    async with raw_server(handler) as server:
        client = HttpClient()
        parsers = set()
        try:
            for status, body in expected:
                response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
                connection = response._connection
                assert connection is not None
                parsers.add(id(connection._reused_parser))
                assert response.status == status
                assert "content-length" not in response.headers or response.headers["content-length"] == str(
                    len(body)
                )
                assert await response.read(LIMIT) == body
                assert client.connections_idle == 1
        finally:
            await client.close()
    assert server.connections == 1
    assert len(parsers) == 1  # one parser for every answer


async def test_a_closed_connection_lets_go_of_its_parser() -> None:
    async with raw_server(replying(http_answer(b"{}"))) as server:
        client = HttpClient()
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        connection = response._connection
        assert connection is not None
        assert await response.read(LIMIT) == b"{}"
        assert connection._reused_parser is not None  # kept for the next answer
        gone = weakref.ref(connection)
        del response, connection
        gc.disable()
        try:
            await client.close()
            for _ in range(5):  # the transport reports the close on a later loop iteration
                await asyncio.sleep(0)
            assert gone() is None  # freed by reference counting alone: no parser cycle left
        finally:
            gc.enable()


@pytest.mark.parametrize(
    ("encoding", "decoded"),
    [(None, True), ("identity", True), ("", True), (" Identity ", True), ("gzip", True), ("br", False)],
)
async def test_the_head_sets_the_decoder_as_the_content_encoding_says(
    encoding: str | None, decoded: bool
) -> None:
    body = b'{"plain": true}'
    sent = gzip.compress(body) if encoding == "gzip" else body
    headers = (("Content-Encoding", encoding),) if encoding is not None else ()
    async with raw_server(replying(http_answer(sent, headers=headers))) as server:
        client = HttpClient()
        try:
            if not decoded:
                with pytest.raises(InvalidResponseError, match="unsupported Content-Encoding: br"):
                    await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
                return
            response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
            assert (response._inflater is None) == (encoding != "gzip")
            assert await response.read(LIMIT) == body
        finally:
            await client.close()


def test_the_timeout_without_a_deadline_is_shared_and_equal() -> None:
    options = CallOptions(deadline=Deadline(None), retry=RetrySettings(), default_timeout=42.0, scrub=str)
    assert options.timeout() == Timeout(total=42.0)
    assert options.timeout() is options.timeout()
    assert options.timeout(stream=True) == Timeout(total=None, idle=42.0)
    assert options.timeout(stream=True) is options.timeout(stream=True)
    other = CallOptions(deadline=Deadline(None), retry=RetrySettings(), default_timeout=7.5, scrub=str)
    assert other.timeout() == Timeout(total=7.5)
    timed = CallOptions(deadline=Deadline.after(30.0), retry=RetrySettings(), default_timeout=42.0, scrub=str)
    total = timed.timeout().total
    assert total is not None and 29.0 < total <= 30.0
    assert timed.timeout(stream=True).idle is None
    with pytest.raises(DeadlineExceeded):
        CallOptions(
            deadline=Deadline.after(-1.0), retry=RetrySettings(), default_timeout=42.0, scrub=str
        ).timeout()


# --- one loop timer for every response's deadline --------------------------------------------------


async def timed_out_after(client: HttpClient, url: str, total: float) -> float:
    """Seconds until a POST to a silent upstream failed with its deadline (TimeoutError)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError, match="did not answer in time"):
        await client.post(url, b"{}", {}, Timeout(total=total), private_ok=True)
    return loop.time() - started


async def test_each_response_fails_at_its_own_deadline_earliest_last_added() -> None:
    async with raw_server(then_silent()) as server:
        client = HttpClient()
        try:
            # Added latest-first: each new one is earlier than the armed timer, which is moved.
            waits = await asyncio.gather(
                *(timed_out_after(client, server.url(), total) for total in (0.6, 0.4, 0.2))
            )
            assert client._deadlines is not None and client._deadlines._pending == {}
        finally:
            await client.close()
    for waited, total in zip(waits, (0.6, 0.4, 0.2), strict=True):
        assert total - 0.01 <= waited < total + 0.15


async def test_a_later_deadline_is_kept_after_the_earlier_response_finished() -> None:
    answered = asyncio.Event()

    async def handler(peer: Peer) -> None:
        request = await peer.read_request()
        if request.body == b"quick":
            await peer.send(http_answer(b"{}"))
            answered.set()
        await peer.wait_client_close()

    async with raw_server(handler) as server:
        client = HttpClient()
        try:
            # The quick call arms the timer for its deadline (0.2 s), then answers at once; the
            # silent one (0.5 s) must still fail at its own deadline when that timer fires early.
            quick = await client.post(server.url(), b"quick", {}, Timeout(total=0.2), private_ok=True)
            slow = asyncio.ensure_future(timed_out_after(client, server.url(), 0.5))
            assert await quick.read(LIMIT) == b"{}"
            waited = await slow
            assert client._deadlines is not None and client._deadlines._pending == {}
            assert client._deadlines._timer is None  # nothing left to wait for
        finally:
            await client.close()
    assert 0.49 <= waited < 0.65


async def test_an_answer_in_time_is_not_failed_by_the_shared_timer() -> None:
    async def handler(peer: Peer) -> None:
        while True:
            request = await peer.read_request()
            await asyncio.sleep(0.15 if request.body == b"slowish" else 0.0)
            await peer.send(http_answer(request.body))

    async with raw_server(handler) as server:
        client = HttpClient()
        try:

            async def call(body: bytes, total: float) -> bytes:
                response = await client.post(server.url(), body, {}, Timeout(total=total), private_ok=True)
                return await response.read(LIMIT)

            short = asyncio.ensure_future(timed_out_after(client, "http://127.0.0.1:1/", 5.0))
            short.cancel()  # a call that never got a response: nothing of it is left
            with pytest.raises(asyncio.CancelledError):
                await short
            assert await asyncio.gather(call(b"slowish", 1.0), call(b"a", 0.3), call(b"b", 2.0)) == [
                b"slowish",
                b"a",
                b"b",
            ]
            assert client._deadlines is not None and client._deadlines._pending == {}
        finally:
            await client.close()


def test_a_timer_run_early_still_fails_what_it_was_armed_for() -> None:
    class Clock:
        now = 10.0

        def time(self) -> float:
            return self.now

        def call_at(self, when: float, callback: object) -> Handle:
            return Handle()

    class Handle:
        def cancel(self) -> None:
            pass

    failed: list[str] = []

    class Watched:
        def __init__(self, name: str) -> None:
            self.name = name

        def _deadline_passed(self) -> None:
            failed.append(self.name)

    clock = Clock()
    timer = DeadlineTimer(clock)  # type: ignore[arg-type]
    timer.add(Watched("first"), 10.5)  # type: ignore[arg-type]
    timer.add(Watched("second"), 10.5)  # type: ignore[arg-type]
    timer.add(Watched("later"), 12.0)  # type: ignore[arg-type]
    clock.now = 10.499  # the loop ran the timer a millisecond early
    timer._fire()
    assert failed == ["first", "second"]
    assert timer._armed_at == 12.0 and timer._timer is not None
    timer.close()


def test_one_client_used_by_two_loops_keeps_enforcing_deadlines() -> None:
    client = HttpClient()

    async def one_loop() -> float:
        async with raw_server(then_silent()) as server:
            return await timed_out_after(client, server.url(), 0.2)

    try:
        for _ in range(2):
            assert 0.19 <= asyncio.run(one_loop()) < 0.5
    finally:
        asyncio.run(client.close())


# --- answer header names, remembered ----------------------------------------------------------------


async def test_answer_header_names_are_lower_case_with_the_cache_cold_and_warm() -> None:
    long_name = "X-" + "Long" * 20  # over the cached length: decoded every time
    answer = http_answer(
        b"{}",
        headers=(
            ("Content-Type", "application/json"),
            ("X-Request-ID", "req-secret-value"),
            ("x-request-id", "second"),
            (long_name, "v"),
            ("Set-Cookie", "a=1"),
            ("set-cookie", "b=2"),
        ),
    )
    async with raw_server(replying(answer)) as server:
        client = HttpClient()
        try:
            http_connection._HEADER_NAMES.clear()
            seen = []
            for _ in range(2):  # cold, then every name (but the long one) from the cache
                response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
                seen.append(dict(response.headers))
                assert await response.read(LIMIT) == b"{}"
        finally:
            await client.close()
    assert (
        seen[0]
        == seen[1]
        == {
            "content-type": "application/json",
            "x-request-id": "req-secret-value, second",
            long_name.lower(): "v",
            "set-cookie": "a=1, b=2",
            "content-length": "2",
        }
    )
    assert http_connection._HEADER_NAMES[b"X-Request-ID"] == "x-request-id"
    assert long_name.encode() not in http_connection._HEADER_NAMES
    assert not any(
        b"secret" in name or "secret" in lower for name, lower in http_connection._HEADER_NAMES.items()
    )


def test_the_answer_header_name_cache_is_bounded() -> None:
    http_connection._HEADER_NAMES.clear()
    for n in range(http_connection._MAX_CACHED_HEADER_NAMES + 20):
        assert http_connection._header_name(f"X-Name-{n}".encode()) == f"x-name-{n}"
        assert len(http_connection._HEADER_NAMES) <= http_connection._MAX_CACHED_HEADER_NAMES


def test_every_character_is_refused_in_a_value_exactly_as_the_search_says() -> None:
    client = HttpClient()
    client._block_after_fixed(JSON, {"X-V": "warm"}, 0)
    for code in [*range(0x300), 0x2028, 0xFEFF, 0x1F600]:
        value = f"a{chr(code)}b"
        refused = http_module._BAD_VALUE.search(value) is not None
        for build in (
            lambda v: _header_block({}, {"X-V": v}, 0),
            lambda v: client._block_after_fixed(JSON, {"X-V": v}, 0),
        ):
            if refused:
                with pytest.raises(InvalidHeaderError):
                    build(value)
            else:
                assert f"X-V: {value}\r\n".encode() in build(value)


def test_a_failing_deadline_callback_stops_neither_the_others_nor_the_timer() -> None:
    reported: list[object] = []

    class Clock:
        now = 5.0

        def time(self) -> float:
            return self.now

        def call_at(self, when: float, callback: object) -> Handle:
            return Handle()

        def call_exception_handler(self, context: dict[str, object]) -> None:
            reported.append(context["exception"])

    class Handle:
        def cancel(self) -> None:
            pass

    failed: list[str] = []

    class Watched:
        def __init__(self, name: str) -> None:
            self.name = name

        def _deadline_passed(self) -> None:
            if self.name == "broken":
                raise RuntimeError("broken")
            failed.append(self.name)

    clock = Clock()
    timer = DeadlineTimer(clock)  # type: ignore[arg-type]
    for name in ("broken", "fine"):
        timer.add(Watched(name), 6.0)  # type: ignore[arg-type]
    timer.add(Watched("later"), 9.0)  # type: ignore[arg-type]
    clock.now = 6.0
    timer._fire()
    assert failed == ["fine"]
    assert [str(exc) for exc in reported] == ["broken"]
    assert timer._armed_at == 9.0 and timer._timer is not None
