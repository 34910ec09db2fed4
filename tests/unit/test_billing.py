"""Cost per call on hand-computed invoices, the price table's lookup rules and price files.

Every expected cost below is written out as the invoice a provider would send: tokens of each
kind times its price per million tokens. The usage goes through each provider's own translator
(the same code the gateway runs), so a cache read charged at the input price, a cache write
charged twice or a streamed cache write counted twice fails here.
"""

from __future__ import annotations

import json
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from llmgateway.v1 import chat_pb2

from server import metrics
from server.billing.cost import _parse_dollars, cost_pico, dollars, parse_dollars
from server.billing.meter import Meter
from server.billing.prices import PriceFileError, PriceTable, load_file
from server.core.completion import usage_from_json
from server.providers import anthropic, gemini

TABLE = PriceTable.load()


@pytest.fixture(autouse=True)
def fresh_model_labels() -> Any:
    """The Meter feeds /metrics' model labels: the many names priced here must not use up the
    process's label budget (LLMGW_METRICS_MAX_MODELS) before the metrics tests run."""
    yield
    metrics.models.reset(metrics.models.limit)


def priced(provider: str, model: str, usage: dict[str, Any]) -> str:
    meter = Meter(TABLE)
    proto = usage_from_json(usage)
    meter.price(provider, model, proto)
    return proto.cost_usd


def test_openai_cached_prompt_tokens_are_charged_once_at_the_cached_price() -> None:
    # gpt-4o: $2.50 input, $1.25 cached input, $10.00 output per million tokens.
    #   uncached 2000 - 1200 = 800 x 2.50 / 1e6 = 0.0020
    #   cached            1200 x 1.25 / 1e6 = 0.0015
    #   output             500 x 10.00 / 1e6 = 0.0050
    #   total                                 0.0085  (charging all 2000 at 2.50 would say 0.0115)
    usage = {
        "prompt_tokens": 2000,
        "completion_tokens": 500,
        "prompt_tokens_details": {"cached_tokens": 1200},
    }
    assert priced("openai", "gpt-4o", usage) == "0.0085"


def test_openai_reasoning_tokens_are_output_tokens_not_charged_twice() -> None:
    # o4-mini: $1.10 input, $4.40 output. completion_tokens 3000 include 2500 reasoning:
    #   1000 x 1.10 / 1e6 = 0.0011; 3000 x 4.40 / 1e6 = 0.0132; total 0.0143
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 3000,
        "completion_tokens_details": {"reasoning_tokens": 2500},
    }
    assert priced("openai", "o4-mini", usage) == "0.0143"


def anthropic_usage(**fields: Any) -> dict[str, Any]:
    return anthropic.normalize_usage(fields)


def test_anthropic_5_minute_and_1_hour_cache_writes_and_reads() -> None:
    # claude-sonnet-4-5: $3 input, $3.75 5-minute write, $6 1-hour write, $0.30 read, $15 output.
    #   input        100 x 3.00 / 1e6 = 0.0003
    #   reads      20000 x 0.30 / 1e6 = 0.0060
    #   5m writes   2000 x 3.75 / 1e6 = 0.0075
    #   1h writes   3000 x 6.00 / 1e6 = 0.0180
    #   output       400 x 15.0 / 1e6 = 0.0060
    #   total                           0.0378
    usage = anthropic_usage(
        input_tokens=100,
        cache_read_input_tokens=20000,
        cache_creation_input_tokens=5000,
        cache_creation={"ephemeral_5m_input_tokens": 2000, "ephemeral_1h_input_tokens": 3000},
        output_tokens=400,
    )
    assert priced("anthropic", "claude-sonnet-4-5", usage) == "0.0378"
    # Without the split every write is a 5-minute one: 5000 x 3.75 = 0.01875 instead of 0.0255.
    usage = anthropic_usage(
        input_tokens=100, cache_read_input_tokens=20000, cache_creation_input_tokens=5000, output_tokens=400
    )
    assert priced("anthropic", "claude-sonnet-4-5", usage) == "0.03105"  # 0.0003+0.006+0.01875+0.006


def test_anthropic_stream_usage_is_not_double_counted() -> None:
    # message_start carries the cache counts, message_delta repeats them cumulatively (never adds):
    # the same invoice as the unary answer above.
    decoder = anthropic.StreamDecoder(scrub=lambda s: s)
    start_usage = {
        "input_tokens": 100,
        "cache_read_input_tokens": 20000,
        "cache_creation_input_tokens": 5000,
        "cache_creation": {"ephemeral_5m_input_tokens": 2000, "ephemeral_1h_input_tokens": 3000},
        "output_tokens": 1,
    }
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [], "stop_reason": None, "usage": start_usage}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Hi"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {
            "output_tokens": 400, "input_tokens": 100, "cache_read_input_tokens": 20000,
            "cache_creation_input_tokens": 5000}}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    chunks: list[dict[str, Any] | None] = []
    for name, payload in events:
        chunks += decoder.feed(name, json.dumps(payload).encode())
    usage = next(c for c in chunks if c is not None and c.get("usage"))["usage"]
    assert priced("anthropic", "claude-sonnet-4-5", usage) == "0.0378"


def test_gemini_cached_content_and_thinking_tokens() -> None:
    # gemini-2.5-flash: $0.30 input, $0.03 cached, $2.50 output (thinking included).
    #   promptTokenCount 10000 includes cachedContentTokenCount 8000:
    #   uncached 2000 x 0.30 / 1e6 = 0.0006
    #   cached   8000 x 0.03 / 1e6 = 0.00024
    #   answer    200 x 2.50 / 1e6 = 0.0005
    #   thinking 1000 x 2.50 / 1e6 = 0.0025
    #   total                        0.00384
    usage = gemini.usage(
        {"promptTokenCount": 10000, "cachedContentTokenCount": 8000, "candidatesTokenCount": 200,
         "thoughtsTokenCount": 1000, "totalTokenCount": 11200}
    )  # fmt: skip
    assert priced("google_ai", "gemini-2.5-flash", usage) == "0.00384"


def test_gemini_long_prompt_is_priced_at_the_second_tier() -> None:
    # gemini-2.5-pro above 200k prompt tokens: $2.50 input, $15 output.
    #   250000 x 2.50 / 1e6 = 0.625; 1000 x 15 / 1e6 = 0.015; total 0.64
    usage = gemini.usage(
        {"promptTokenCount": 250000, "candidatesTokenCount": 1000, "totalTokenCount": 251000}
    )
    assert priced("google_ai", "gemini-2.5-pro", usage) == "0.64"
    # 200000 (not above the threshold) x 1.25 = 0.25; + 0.01 = 0.26
    usage = gemini.usage(
        {"promptTokenCount": 200000, "candidatesTokenCount": 1000, "totalTokenCount": 201000}
    )
    assert priced("google_ai", "gemini-2.5-pro", usage) == "0.26"


def test_deepseek_cache_hits() -> None:
    # deepseek-chat: $0.28 miss, $0.028 hit, $0.42 output; prompt_cache_hit_tokens 600 of 1000:
    #   400 x 0.28 = 112e-6; 600 x 0.028 = 16.8e-6; 100 x 0.42 = 42e-6; total 0.0001708
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "prompt_cache_hit_tokens": 600}
    assert priced("deepseek", "deepseek-chat", usage) == "0.0001708"


def test_fine_tuned_and_dated_model_names() -> None:
    # ft:gpt-4o-mini: $0.30 input, $1.20 output: 1000 x 0.30 = 0.0003; 100 x 1.20 = 0.00012
    usage = {"prompt_tokens": 1000, "completion_tokens": 100}
    assert priced("openai", "ft:gpt-4o-mini-2024-07-18:acme::AbC123", usage) == "0.00042"
    # A dated name takes its family's price: gpt-4o-mini $0.15 / $0.60 -> 0.00015 + 0.00006
    assert priced("openai", "gpt-4o-mini-2024-07-18", usage) == "0.00021"
    # ...unless it has its own: gpt-4o-2024-05-13 $5 / $15 -> 0.005 + 0.0015
    assert priced("openai", "gpt-4o-2024-05-13", usage) == "0.0065"
    # Anthropic's dated names (claude-sonnet-4-5-20250929: $3 / $15): 0.003 + 0.0015
    assert priced("anthropic", "claude-sonnet-4-5-20250929", usage) == "0.0045"
    assert priced("anthropic", "claude-3-5-haiku-latest", usage) == "0.0012"  # 0.0008 + 0.0004
    assert priced("google_ai", "models/gemini-2.0-flash", usage) == "0.00014"  # 0.0001 + 0.00004


def test_no_general_prefix_matching() -> None:
    # o3-pro is $20 / $80, never o3's $2 / $8; an unknown suffix is unpriced, not its family's.
    usage = {"prompt_tokens": 1000, "completion_tokens": 100}
    assert priced("openai", "o3-pro", usage) == "0.028"  # 0.02 + 0.008
    assert priced("openai", "gpt-4o-mini-realtime-preview", usage) == ""
    assert priced("openai", "gpt-4o", usage) != priced("azure", "gpt-4o-mini", usage)


def test_unpriced_model_is_unpriced_never_zero(caplog: pytest.LogCaptureFixture) -> None:
    meter = Meter(TABLE)
    for _ in range(3):
        usage = usage_from_json({"prompt_tokens": 10, "completion_tokens": 5})
        assert meter.price("openai", "gpt-99", usage) is None
        assert usage.cost_usd == ""
    assert meter.unpriced == 3
    assert meter.totals[("openai", "gpt-99")].unpriced == 3
    warnings = [r for r in caplog.records if "gpt-99" in r.getMessage()]
    assert len(warnings) == 1  # once per model


def test_inconsistent_or_negative_usage_is_not_priced() -> None:
    price = TABLE.find("openai", "gpt-4o")
    assert price is not None
    assert cost_pico(price, prompt_tokens=10, completion_tokens=1, cached_tokens=11) is None
    assert cost_pico(price, prompt_tokens=-5, completion_tokens=1) is None
    assert cost_pico(price, prompt_tokens=5, completion_tokens=1, reasoning_tokens=2) is None
    assert (
        cost_pico(price, prompt_tokens=5, completion_tokens=1, cache_write_tokens=2, cache_write_1h_tokens=3)
        is None
    )
    # A huge but consistent count is exact (no float, no overflow): 2**31-1 tokens at $10/M.
    big = cost_pico(price, prompt_tokens=0, completion_tokens=2**31 - 1)
    assert big is not None and dollars(big) == str(Decimal(2**31 - 1) * 10 / 10**6)


def test_dollars_round_trip_exactly() -> None:
    for text in ("0", "0.000000000001", "12.5", "0.0085", "999999999.999999999999"):
        assert dollars(parse_dollars(text)) == text
    for bad in ("1e3", "nan", "0.0000000000001", "1.2.3", "", "٣", "12,5"):
        with pytest.raises(ValueError):
            parse_dollars(bad)


def test_parse_dollars_fast_form_agrees_with_the_general_parse() -> None:
    """`parse_dollars` takes a short path for the form `dollars` writes; every other text goes
    the general way. Both agree on every text either accepts, and refuse the same ones."""
    texts = ["0", "5", "5.", ".5", "-0.25", " 7.1 ", "0.000000000001", "123456789012345", "1234567890123456"]
    texts += ["1.0000000000001", "1.2.3", "", "-", ".", "+1", "١", "1_000", "0x10", "12,5", "1e3", "0.5\n"]
    rng = random.Random(5)
    texts += [dollars(rng.randrange(10**16)) for _ in range(500)]
    for text in texts:
        try:
            expected: int | str = _parse_dollars(text)
        except ValueError:
            expected = "refused"
        try:
            got: int | str = parse_dollars(text)
        except ValueError:
            got = "refused"
        assert got == expected, text
        if got != "refused":
            assert Decimal(text.strip()) * 10**12 == got


def test_dollars_is_the_exact_decimal() -> None:
    rng = random.Random(3)
    for pico in [0, 1, -1, 10**12, -(10**12) - 5, *(rng.randrange(-(10**18), 10**18) for _ in range(500))]:
        text = dollars(pico)
        assert Decimal(text) == Decimal(pico).scaleb(-12)
        assert text == "0" or (not text.endswith("0") or "." not in text)


def _dollars_general(pico: int) -> str:
    """`dollars` before its short path for amounts under a dollar: the reference it must match."""
    if pico < 0:
        return "-" + _dollars_general(-pico)
    whole, fraction = divmod(pico, 10**12)
    if fraction:
        return f"{whole}.{fraction:012d}".rstrip("0")
    return str(whole)


def test_dollars_short_path_under_a_dollar_writes_what_the_general_path_writes() -> None:
    """Amounts of (0, $1) take a short path; it and the general one meet at 0 and at $1 exactly.
    Every digit count, trailing zeros of every length, and random amounts either side agree."""
    rng = random.Random(11)
    picos = [0, 1, 9, 10, 55_800_000, 10**12 - 1, 10**12, 10**12 + 1, 2 * 10**12 - 1, -1, -(10**12) + 1]
    picos += [10**k for k in range(13)] + [10**k - 1 for k in range(1, 13)] + [7 * 10**k for k in range(12)]
    picos += [rng.randrange(1, 10**12) for _ in range(2000)] + [
        rng.randrange(10**12, 10**14) for _ in range(200)
    ]
    for pico in picos:
        assert dollars(pico) == _dollars_general(pico), pico
        assert Decimal(dollars(pico)) == Decimal(pico).scaleb(-12), pico
    assert dollars(1) == "0.000000000001"
    assert dollars(55_800_000) == "0.0000558"
    assert dollars(10**12 - 1) == "0.999999999999"
    assert dollars(10**12) == "1"


def test_cost_counter_is_the_exact_sum_after_a_flush_and_pending_before() -> None:
    """record_cost adds to a cell; a flush sets the counter to the float nearest the exact sum
    (never a float running sum), once per change; models folded into `other` share one cell."""

    def counted(model: str) -> float:
        value = metrics.REGISTRY.get_sample_value(
            "llmgw_cost_usd_total", {"provider": metrics.provider_label("openai"), "model": model}
        )
        return value or 0.0

    model = "cost-cell-test-model"
    metrics.flush()
    before = counted(model)
    assert before == 0.0
    picos = [10_000_000_000, 120_000_000] * 4  # $0.01 and $0.00012: as floats they drift
    for pico in picos:
        metrics.record_cost("openai", model, pico)
    metrics.record_cost("openai", model, 0)  # nothing: not counted, not a series change
    assert counted(model) == 0.0  # pending until the flush
    metrics.flush()
    assert counted(model) == sum(picos) / 10**12 == 0.04048
    metrics.flush()  # nothing changed: the same value, nothing added twice
    assert counted(model) == 0.04048
    metrics.record_cost("openai", model, 1)
    metrics.flush()
    assert counted(model) == (sum(picos) + 1) / 10**12
    other = counted(metrics.OTHER)
    metrics.record_cost("openai", "y" * 500, 3 * 10**12)  # too long for a label: `other`
    metrics.record_cost("openai", "z" * 500, 10**12)
    metrics.flush()
    assert counted(metrics.OTHER) - other == 4.0


def test_unpriced_calls_are_counted_after_a_flush() -> None:
    def counted() -> float:
        labels = {"provider": metrics.provider_label("openai"), "model": "unpriced-cell-test-model"}
        return metrics.REGISTRY.get_sample_value("llmgw_unpriced_calls_total", labels) or 0.0

    metrics.flush()
    before = counted()
    meter = Meter(TABLE)
    for _ in range(3):
        assert meter.price("openai", "unpriced-cell-test-model", chat_pb2.Usage(prompt_tokens=1)) is None
    metrics.flush()
    assert counted() == before + 3


def test_each_negative_count_is_not_priced() -> None:
    price = TABLE.find("openai", "gpt-4o")
    assert price is not None
    counts = ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens")
    counts += ("cache_write_1h_tokens", "reasoning_tokens")
    for name in counts:
        usage: dict[str, int] = {"prompt_tokens": 10, "completion_tokens": 10, name: -1}
        assert cost_pico(price, **usage) is None, name


def write(tmp_path: Path, models: list[dict[str, Any]]) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": models}))
    return path


ENTRY = {
    "provider": "openai",
    "model": "gpt-4o",
    "input": "1",
    "output": "2",
    "source": "contract",
    "date": "2026-01-01",
}


def test_prices_file_overrides_and_adds(tmp_path: Path) -> None:
    local = {**ENTRY, "provider": "ollama", "model": "llama3", "input": "0", "output": "0"}
    table = PriceTable.load(str(write(tmp_path, [ENTRY, local])))
    usage = {"prompt_tokens": 1000, "completion_tokens": 1000}
    meter = Meter(table)
    proto = usage_from_json(usage)
    meter.price("openai", "gpt-4o", proto)
    assert proto.cost_usd == "0.003"  # the negotiated $1 / $2, not the list price
    proto = usage_from_json(usage)
    meter.price("ollama", "llama3", proto)
    assert proto.cost_usd == "0"  # priced at zero on purpose: "0", not unpriced
    proto = usage_from_json(usage)
    meter.price("openai", "gpt-4o-mini", proto)
    assert proto.cost_usd == "0.00075"  # the shipped entries stay


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input": "-1"}, "between 0"),
        ({"input": "1e400"}, "between 0"),
        ({"input": "NaN"}, "between 0"),
        ({"input": 1.5}, "decimal string"),
        ({"input": "0.0000001"}, "6 fractional digits"),
        ({"output": None}, "missing output"),
        ({"source": ""}, "source and date"),
        ({"input": "1000000"}, "between 0"),
        ({"colour": "red"}, "unknown fields"),
        ({"long_context": {"input": "2"}}, "go together"),
    ],
)
def test_bad_price_files_are_refused_naming_the_entry(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    entry = {**ENTRY, **change}
    with pytest.raises(PriceFileError, match=message) as info:
        load_file(write(tmp_path, [entry]))
    assert "models[0]" in str(info.value)


def test_price_file_that_is_not_json_or_missing(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text("{not json")
    with pytest.raises(PriceFileError, match="not JSON"):
        load_file(path)
    with pytest.raises(PriceFileError, match="models"):
        load_file(_doc(tmp_path, {"entries": []}))
    with pytest.raises(PriceFileError):
        load_file(tmp_path / "absent.json")


def _doc(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(document))
    return path


def test_shipped_table_is_complete() -> None:
    table = load_file(Path(__file__).parents[2] / "server" / "billing" / "prices.json")
    providers = {p.provider for p in table}
    assert {"openai", "anthropic", "google_ai", "azure", "groq", "deepseek"} <= providers
    assert all(p.source.startswith("https://") and p.date for p in table)
    for p in table:
        if p.provider == "anthropic":  # both cache-write durations priced apart
            assert p.rates.cache_write_1h > p.rates.cache_write_5m > p.rates.input > p.rates.cached_input


def test_meter_counts_are_bounded() -> None:
    meter = Meter(TABLE)
    for i in range(1100):
        meter.price("openai", f"made-up-{i}", chat_pb2.Usage(prompt_tokens=1))
    assert len(meter.totals) <= 1025
    assert meter.unpriced == 1100
