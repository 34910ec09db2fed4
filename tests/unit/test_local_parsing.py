from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from server.errors import UnparseableModelOutput
from server.providers.local import lenient_json
from server.providers.local.parsing import RAW_OUTPUT_LIMIT, ParsedCall, parse_function_call

CORPUS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent.parent / "fixtures" / "local_outputs.json").read_text(encoding="utf-8")
)["cases"]


def test_corpus_is_large_and_well_formed() -> None:
    assert len(CORPUS) >= 30
    assert len({case["id"] for case in CORPUS}) == len(CORPUS)
    for case in CORPUS:
        assert ("expect" in case) != ("error" in case), case["id"]


@pytest.mark.parametrize("case", [c for c in CORPUS if "expect" in c], ids=lambda c: c["id"])
def test_corpus_parses_to_the_expected_call(case: dict[str, Any]) -> None:
    parsed = parse_function_call(case["output"], primed_prefix=case.get("primed_prefix", ""))
    expect = case["expect"]
    assert parsed == ParsedCall(expect["name"], expect["arguments"], expect["inner_thoughts"])


@pytest.mark.parametrize("case", [c for c in CORPUS if "error" in c], ids=lambda c: c["id"])
def test_corpus_gives_the_expected_error(case: dict[str, Any]) -> None:
    with pytest.raises(UnparseableModelOutput) as info:
        parse_function_call(case["output"], primed_prefix=case.get("primed_prefix", ""))
    assert case["error"] in info.value.message
    assert info.value.metadata == {"raw_output": case["output"]}
    assert info.value.reason == "UNPARSEABLE_MODEL_OUTPUT"


def test_raw_output_in_error_is_truncated() -> None:
    text = "I refuse to answer in JSON. " * 100
    with pytest.raises(UnparseableModelOutput) as info:
        parse_function_call(text)
    assert info.value.metadata["raw_output"] == text[:RAW_OUTPUT_LIMIT]
    assert len(info.value.metadata["raw_output"]) == 500
    assert 'expected {"function": NAME' in info.value.message


def test_pop_inner_thoughts_can_be_turned_off() -> None:
    text = '{"function": "note", "params": {"thinking": "kept", "text": "x"}}'
    parsed = parse_function_call(text, pop_inner_thoughts=False)
    assert parsed == ParsedCall("note", {"thinking": "kept", "text": "x"}, None)


def test_both_thought_keys_are_popped_thinking_wins() -> None:
    text = '{"function": "f", "params": {"inner_thoughts": "old", "thinking": "new", "a": 1}}'
    assert parse_function_call(text) == ParsedCall("f", {"a": 1}, "new")


def test_non_string_thoughts_become_json_text() -> None:
    text = '{"function": "f", "params": {"thinking": ["a", "b"], "a": 1}}'
    assert parse_function_call(text).inner_thoughts == '["a", "b"]'


def test_many_stray_braces_do_not_hang() -> None:
    text = "{" * 5000 + '{"function": "f", "params": {}}'
    with pytest.raises(UnparseableModelOutput):
        parse_function_call(text)


RAISES = object()


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"a": 1}', {"a": 1}),
        ("{a: 1, b_2: 'x'}", {"a": 1, "b_2": "x"}),
        ('{"a": [1, 2,, 3]}', {"a": [1, 2, 3]}),
        ('{"a": tr', {}),
        ('{"a": -', {}),
        ('{"a": 1.}', {"a": 1.0}),
        ('{"a": "x\\', {"a": "x"}),
        ('{"a": "\\ud83d"}', {"a": "\ud83d"}),
        ('{"a": "\\uZZZZ"}', {"a": "\\uZZZZ"}),
        ('{"a": "x"\n "b": "y"}', {"a": "x", "b": "y"}),
        ('["x" "y"]', ['x" "y']),  # same line: read as one string with quotes in it
        ("[" * 50 + "]" * 50, json.loads("[" * 50 + "]" * 50)),
        ("{'a': (1)}", RAISES),
        ('{"a": undefined}', RAISES),
        ("[" * 100, RAISES),  # too deep for the repairing reader
        ("", RAISES),
    ],
)
def test_lenient_json(text: str, value: Any) -> None:
    if value is RAISES:
        with pytest.raises(lenient_json.LenientJSONError):
            lenient_json.loads(text)
    else:
        assert lenient_json.loads(text) == value


def test_lenient_json_reports_repairs() -> None:
    assert lenient_json.decode_at('x {"a": 1} y', 2) == ({"a": 1}, 10, False)
    assert lenient_json.decode_at("{'a': 1}") == ({"a": 1}, 8, True)
    with pytest.raises(lenient_json.LenientJSONError):
        lenient_json.loads('{"a": 1} trailing')
