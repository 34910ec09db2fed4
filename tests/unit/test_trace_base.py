"""Shared pieces of the trace backends: timestamps, page tokens, redaction, the factory."""

from __future__ import annotations

import logging
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.auth.redact import redact_text, redact_url
from server.traces.base import (
    MAX_LIST_LIMIT,
    RateLimitedLog,
    TraceRecord,
    clamp_limit,
    from_micros,
    new_trace_id,
    page_token,
    parse_page_token,
    record_size,
    to_micros,
)
from server.traces.factory import create_backends

moments = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC))


@given(moments)
def test_micros_round_trip_exactly(moment: datetime) -> None:
    assert from_micros(to_micros(moment)) == moment


def test_micros_order_at_sub_second_resolution() -> None:
    base = datetime(2025, 1, 1, tzinfo=UTC)
    assert to_micros(base + timedelta(microseconds=1)) - to_micros(base) == 1
    assert to_micros(datetime(2025, 1, 1)) == to_micros(base)  # naive is UTC


@given(moments, st.text(min_size=1))
def test_page_token_round_trip(moment: datetime, trace_id: str) -> None:
    token = page_token(TraceRecord(id=trace_id, created_at=moment))
    assert parse_page_token(token) == (moment, trace_id)


@pytest.mark.parametrize("token", ["", "!!!", "bm90LWEtbnVtYmVy", "MTIz"])
def test_malformed_page_token(token: str) -> None:
    with pytest.raises(ValueError):
        parse_page_token(token)


def test_clamp_limit() -> None:
    assert clamp_limit(0) == 50 and clamp_limit(-1) == 50
    assert clamp_limit(7) == 7 and clamp_limit(10**9) == MAX_LIST_LIMIT


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://gw:s3cret@db:5432/traces", "postgresql://gw:***@db:5432/traces"),
        ("postgresql://gw@db/traces", "postgresql://gw@db/traces"),
        ("http://default:s3cret@127.0.0.1:8123/?database=x", "http://default:***@127.0.0.1:8123/?database=x"),
        ("http://ch:8123/?user=u&password=s3cret", "http://ch:8123/?user=u&password=***"),
        ("host=db user=gw password=s3cret dbname=t", "host=db user=gw password=*** dbname=t"),
        ("host=db password='s3 cret' dbname=t", "host=db password=*** dbname=t"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    assert "s3cret" not in redact_url(url)


def test_redact_text() -> None:
    text = "failed: postgresql://gw:s3cret@db/t (key sk-abc)"
    assert redact_text(text, "sk-abc") == "failed: postgresql://gw:***@db/t (key ***)"


def test_rate_limited_log(caplog: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog(logging.getLogger("test.rate"), interval=3600)
    with caplog.at_level(logging.WARNING, logger="test.rate"):
        for i in range(5):
            log.warning("a", "problem %d", i)
        log.warning("b", "other")
    assert [r.getMessage() for r in caplog.records] == ["problem 0", "other"]


def test_trace_ids_are_unique_and_prefixed() -> None:
    ids = {new_trace_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(i.startswith("provider_trace-") for i in ids)


def test_factory_builds_in_order() -> None:
    backends = create_backends(
        ["socket", "sqlite", "postgres", "clickhouse"],
        sqlite_path="/tmp/x.db",
        postgres_dsn="postgresql://u:p@h/d",
        clickhouse_url="http://h:8123",
        socket_path="/tmp/s.sock",
    )
    assert [b.name for b in backends] == ["socket", "sqlite", "postgres", "clickhouse"]
    assert [b.readable for b in backends] == [False, True, True, True]
    assert "p@" not in repr(backends[2]) and "u:***@h" in repr(backends[2])


@pytest.mark.parametrize(
    ("names", "kwargs"),
    [
        (["nope"], {}),
        (["sqlite", "sqlite"], {"sqlite_path": "x"}),
        (["postgres"], {}),
        (["clickhouse"], {}),
        (["clickhouse"], {"clickhouse_url": "ftp://h"}),
        (["socket"], {}),
        (["sqlite"], {}),
    ],
)
def test_factory_refuses_bad_settings(names: list[str], kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        create_backends(names, **kwargs)


def test_factory_imports_only_the_drivers_it_uses() -> None:
    code = (
        "import sys\n"
        "from server.traces.factory import create_backends\n"
        "create_backends(['sqlite', 'socket'], sqlite_path='x.db', socket_path='s')\n"
        "print(sorted(m for m in ('asyncpg', 'aiohttp', 'aiosqlite') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "['aiosqlite']"


def test_trace_ids_are_time_ordered_version_7_uuids() -> None:
    import time
    import uuid

    from server.traces.base import new_trace_id

    before_ms = time.time_ns() // 1_000_000
    ids = [new_trace_id() for _ in range(2000)]
    after_ms = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for trace_id in ids:
        assert trace_id.startswith("provider_trace-")
        parsed = uuid.UUID(trace_id.removeprefix("provider_trace-"))
        assert str(parsed) == trace_id.removeprefix("provider_trace-")  # canonical lower-case form
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert before_ms <= int.from_bytes(parsed.bytes[:6], "big") <= after_ms
    time.sleep(0.002)
    later = new_trace_id()
    assert all(later > trace_id for trace_id in ids)  # a later millisecond sorts after


def _reference_trace_id(millis: int, bits: int) -> str:
    """`new_trace_id` as first written: the 128-bit value built whole, formatted, then cut."""
    value = millis << 80 | 0x7 << 76 | (bits >> 62) << 64 | 0b10 << 62 | bits & ((1 << 62) - 1)
    h = f"{value:032x}"
    return f"provider_trace-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@given(millis=st.integers(0, (1 << 48) - 1), bits=st.integers(0, (1 << 74) - 1))
def test_trace_id_groups_are_the_value_built_whole(millis: int, bits: int) -> None:
    import random
    import time

    from server.traces import base

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(random, "getrandbits", lambda k: bits if k == 74 else pytest.fail(f"{k} bits"))
        patch.setattr(time, "time_ns", lambda: millis * 1_000_000 + 999_999)
        assert base.new_trace_id() == _reference_trace_id(millis, bits)


def test_trace_id_groups_at_every_bit_edge() -> None:
    """Each group's edges: all ones, all zeros and a single bit on either side of each boundary."""
    import random
    import time

    from server.traces import base

    millis_cases = [0, (1 << 48) - 1, 1 << 15, 1 << 16, (1 << 16) - 1, 1 << 47, 1_796_000_000_000]
    bits_cases = [0, (1 << 74) - 1, 1 << 47, 1 << 48, 1 << 61, 1 << 62, 1 << 73, (1 << 62) - 1]
    for millis in millis_cases:
        for bits in bits_cases:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(random, "getrandbits", lambda k, bits=bits: bits)
                patch.setattr(time, "time_ns", lambda millis=millis: millis * 1_000_000)
                assert base.new_trace_id() == _reference_trace_id(millis, bits), (millis, bits)


def _reference_size(record: TraceRecord) -> int:
    """`record_size` as first written: 512 plus each text's bound (len if ASCII, else 4 x len)."""

    def pinned(text: str) -> int:
        return len(text) if text.isascii() else 4 * len(text)

    texts = [record.request_json, record.response_json, record.llm_config_json, record.error_message]
    texts += [record.step_id, record.run_id, record.agent_id, *record.agent_tags, *record.notes]
    return 512 + sum(pinned(text) for text in texts)


texts = st.text(max_size=40)


@given(
    request=texts,
    response=texts,
    config=texts,
    error=texts,
    ids=st.tuples(texts, texts, texts),
    tags=st.lists(texts, max_size=3),
    notes=st.lists(texts, max_size=3),
)
def test_record_size_bounds_every_text(
    request: str,
    response: str,
    config: str,
    error: str,
    ids: tuple[str, str, str],
    tags: list[str],
    notes: list[str],
) -> None:
    record = TraceRecord(
        id="t",
        created_at=datetime(2026, 12, 4, tzinfo=UTC),
        request_json=request,
        response_json=response,
        llm_config_json=config,
        error_message=error,
        step_id=ids[0],
        run_id=ids[1],
        agent_id=ids[2],
        agent_tags=tags,
        notes=notes,
    )
    assert record_size(record) == _reference_size(record)


def test_record_size_counts_non_ascii_four_times_and_every_list() -> None:
    record = TraceRecord(id="t", created_at=datetime(2026, 12, 4, tzinfo=UTC), request_json="abcd")
    assert record_size(record) == 512 + 4
    record.request_json = "abc\u00e9"  # one non-ASCII character: the whole text at 4 bytes each
    assert record_size(record) == 512 + 16
    record.agent_tags = ["tag"]
    record.notes = ["\u4e2d"]
    assert record_size(record) == 512 + 16 + 3 + 4


def test_sqlite_rows_hold_tags_and_notes_as_json_lists() -> None:
    from server.traces.sqlite import _NOTES, _TAGS, _to_row

    record = TraceRecord(id="t", created_at=datetime(2026, 12, 4, tzinfo=UTC))
    row = _to_row(record)
    assert (row[_TAGS], row[_NOTES]) == ("[]", "[]")
    record.agent_tags, record.notes = ["a", "b\u00e9"], ["temperature"]
    row = _to_row(record)
    assert (row[_TAGS], row[_NOTES]) == ('["a","b\u00e9"]', '["temperature"]')


def test_trace_notes_without_notes_is_a_fresh_empty_list() -> None:
    from server.traces.base import trace_notes

    def scrub(text: str) -> str:
        raise AssertionError("nothing to scrub")

    first, second = trace_notes([], scrub), trace_notes((), scrub)
    assert first == second == [] and type(first) is list and first is not second
    assert trace_notes(["a sk-x"], lambda text: text.replace("sk-x", "[REDACTED]")) == ["a [REDACTED]"]
