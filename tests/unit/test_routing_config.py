"""The routes file: what loads, what is refused (naming the line, never a key), weights,
cooldown arithmetic and the weighted selection (seeded, 10,000 draws)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from llmgateway.v1 import chat_pb2

from server.auth.actor import Actor
from server.config import Settings
from server.routing.config import RoutesFileError, load_routes, parse_routes
from server.routing.health import MAX_UNITS, Health, MinuteWindow
from server.routing.router import Router, _Call

KEY_A = "sk-route-a-" + "a" * 32
KEY_B = "sk-route-b-" + "b" * 32
OPENAI_KEY = "sk-proj-" + "o" * 40
ENV = {"ROUTE_KEY_A": KEY_A, "ROUTE_KEY_B": KEY_B, "OPENAI_API_KEY": OPENAI_KEY}
SETTINGS = Settings(openai_api_key=OPENAI_KEY)

GOOD = """\
cooldown_seconds = 7

[routes.chat]
fallbacks = ["backup"]

[[routes.chat.deployments]]
name = "a"
provider = "openai"
model = "gpt-4o-mini"
base_url = "http://127.0.0.1:9/v1"
keys = ["ROUTE_KEY_A", "ROUTE_KEY_B"]
weight = 3
context_window = 8192

[[routes.chat.deployments]]
name = "b"
provider = "openai"
model = "gpt-4o"
weight = 0.5

[routes.backup]
[[routes.backup.deployments]]
name = "c"
provider = "anthropic"
model = "claude-x"
byok = "team-anthropic"
"""


def parse(text: str, env: dict[str, str] | None = None, settings: Settings = SETTINGS) -> object:
    return parse_routes(text, path="routes.toml", settings=settings, environ=ENV if env is None else env)


def refused(text: str, env: dict[str, str] | None = None, settings: Settings = SETTINGS) -> RoutesFileError:
    with pytest.raises(RoutesFileError) as caught:
        parse(text, env, settings)
    message = str(caught.value)
    for secret in (KEY_A, KEY_B, OPENAI_KEY):
        assert secret not in message
    return caught.value


def test_a_good_file_loads_with_modes_weights_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(GOOD)
    table = load_routes(str(path), settings=SETTINGS, environ=ENV)
    chat = table.routes["chat"]
    a, b = chat.deployments
    assert (a.mode, a.weight, a.context_window, a.cooldown, a.line) == ("keys", 3.0, 8192, 7.0, 6)
    assert [k.variable for k in a.keys] == ["ROUTE_KEY_A", "ROUTE_KEY_B"]
    assert a.keys[0].target.headers["Authorization"] == f"Bearer {KEY_A}"
    assert a.keys[0].target.base_url == "http://127.0.0.1:9/v1"
    assert KEY_A not in repr(a) and KEY_A not in repr(table)
    assert (b.mode, b.weight, b.base_url) == ("server", 0.5, "")
    (c,) = table.routes["backup"].deployments
    assert (c.mode, c.byok, c.config.provider_category) == (
        "byok",
        "team-anthropic",
        chat_pb2.PROVIDER_CATEGORY_BYOK,
    )
    assert chat.fallbacks == ("backup",)


def test_toml_syntax_error_names_line_and_column() -> None:
    error = refused('[routes.chat]\nfallbacks = ["x"\n')
    assert "line 2" in str(error) or "line 3" in str(error)


@pytest.mark.parametrize("weight", ["0", "-1", "nan", "inf", "1e300", "true", '"3"', "1e-12"])
def test_bad_weights_are_refused_naming_their_line(weight: str) -> None:
    text = GOOD.replace("weight = 0.5", f"weight = {weight}")
    error = refused(text)
    assert error.line == 19, str(error)
    assert "weight" in str(error)


def test_tiny_and_huge_weights_that_fit_are_kept_exactly() -> None:
    table = parse(GOOD.replace("weight = 0.5", "weight = 1e-9").replace("weight = 3", "weight = 1e12"))
    a, b = table.routes["chat"].deployments  # type: ignore[attr-defined]
    assert (a.weight, b.weight) == (1e12, 1e-9)


def test_fallback_cycles_are_refused() -> None:
    text = (
        GOOD
        + '\n[routes.backup2]\nfallbacks = ["chat"]\n'
        + '[[routes.backup2.deployments]]\nprovider = "openai"\nmodel = "m"\n'
    )
    text = text.replace('fallbacks = ["backup"]', 'fallbacks = ["backup2"]')
    error = refused(text)
    assert "cycle" in str(error) and "chat -> backup2 -> chat" in str(error)
    assert error.line == 29  # the `fallbacks` line that closes the cycle
    assert "cycle" in str(refused(GOOD.replace('fallbacks = ["backup"]', 'fallbacks = ["chat"]')))


def test_unknown_fallback_route_and_unknown_settings_are_refused() -> None:
    assert refused(GOOD.replace('["backup"]', '["nope"]')).line == 4
    error = refused(GOOD.replace("context_window = 8192", "context_windw = 8192"))
    assert "context_windw" in str(error) and error.line == 6


def test_a_pasted_key_is_never_echoed() -> None:
    error = refused(GOOD.replace('keys = ["ROUTE_KEY_A", "ROUTE_KEY_B"]', f'key = "{KEY_A}"'))
    assert "not an environment variable name" in str(error) and error.line == 11
    # Mixed case (a Gemini key has that shape) is never echoed either.
    mixed = "AIzaSyD" + "x" * 32
    error = refused(GOOD.replace('keys = ["ROUTE_KEY_A", "ROUTE_KEY_B"]', f'keys = ["{mixed}"]'))
    assert mixed not in str(error)


def test_unset_variable_is_named_without_any_value() -> None:
    error = refused(GOOD, env={"ROUTE_KEY_A": KEY_A})
    assert "ROUTE_KEY_B is not set" in str(error) and error.line == 11


def test_a_server_key_may_only_go_to_its_own_base_url() -> None:
    # A variable holding the server's OpenAI key (by any name) for another base URL: refused.
    env = {**ENV, "INNOCENT_NAME": OPENAI_KEY}
    error = refused(GOOD.replace('keys = ["ROUTE_KEY_A", "ROUTE_KEY_B"]', 'key = "INNOCENT_NAME"'), env)
    assert "only sent to its own base URL" in str(error) and error.line == 11
    # The encryption passphrase is never sent anywhere.
    settings = Settings(openai_api_key=OPENAI_KEY, encryption_key="pass-" + "e" * 20)
    env = {**ENV, "PASS": "pass-" + "e" * 20}
    error = refused(GOOD.replace('keys = ["ROUTE_KEY_A", "ROUTE_KEY_B"]', 'key = "PASS"'), env, settings)
    assert "pass-" not in str(error)
    # The same key to its own base URL is fine.
    table = parse(
        GOOD.replace('keys = ["ROUTE_KEY_A", "ROUTE_KEY_B"]', 'key = "OPENAI_API_KEY"').replace(
            "http://127.0.0.1:9/v1", "https://api.openai.com/v1"
        )
    )
    assert table.routes["chat"].deployments[0].mode == "keys"  # type: ignore[attr-defined]


def test_byok_deployments_take_no_base_url_or_key_and_local_types_are_refused() -> None:
    assert "byok" in str(refused(GOOD.replace('byok = "team-anthropic"', 'byok = "x"\nkey = "ROUTE_KEY_A"')))
    assert "provider must be one of" in str(
        refused(GOOD.replace('provider = "anthropic"', 'provider = "ollama"'))
    )
    error = refused(GOOD.replace("http://127.0.0.1:9/v1", "http://169.254.169.254/v1"))
    assert "metadata" in str(error) and error.line == 10
    error = refused(GOOD.replace("http://127.0.0.1:9/v1", f"http://127.0.0.1:9/v1?key={KEY_A}"))
    assert "query" in str(error) and error.line == 10


def test_duplicate_names_and_empty_routes_are_refused() -> None:
    assert "two deployments" in str(refused(GOOD.replace('name = "b"', 'name = "a"')))
    assert "no deployments" in str(refused("[routes.empty]\nfallbacks = []\n"))


def test_cooldown_extends_and_never_shortens() -> None:
    now = [100.0]
    health = Health(clock=lambda: now[0])
    assert health.cool("d", 2.0) == 102.0
    assert health.cool("d", 10.0) == 110.0  # a later, longer Retry-After extends it
    assert health.cool("d", 1.0) == 110.0  # a shorter one never shortens it
    now[0] = 111.0
    assert health.cooling_until("d") < now[0]


def test_cooldowns_are_bounded_and_expire() -> None:
    now = [0.0]
    health = Health(clock=lambda: now[0])
    for i in range(MAX_UNITS + 50):
        health.cool(f"u{i}", 10.0)
    assert len(health._until) == MAX_UNITS  # noqa: SLF001
    now[0] = 20.0
    health.cool("fresh", 5.0)
    assert len(health._until) == 1 and not health.calm()  # noqa: SLF001 - the expired ones went
    assert health.cooling_until("u1", now[0]) == 0.0
    assert health.cooling_until("fresh", now[0]) == 25.0
    now[0] = 30.0
    assert health.cooling_until("fresh", now[0]) == 0.0 and health.calm()


def test_minute_window_counts_and_frees() -> None:
    window = MinuteWindow()
    window.add(1000.2, requests=1, tokens=50)
    window.add(1030.0, requests=2, tokens=10)
    assert window.totals(1030.5) == (3, 60)
    assert window.frees_at(1030.5) == 1060
    assert window.totals(1060.5) == (2, 10)
    assert window.totals(1200.0) == (0, 0)


WEIGHTS = """\
[routes.w]
[[routes.w.deployments]]
name = "big"
provider = "openai"
model = "m"
weight = 6
[[routes.w.deployments]]
name = "mid"
provider = "openai"
model = "m"
weight = 3.7
[[routes.w.deployments]]
name = "tiny"
provider = "openai"
model = "m"
weight = 0.3
[[routes.w.deployments]]
name = "tinier"
provider = "openai"
model = "m"
weight = 0.05
"""


def test_weights_within_three_percent_over_10000_seeded_selections() -> None:
    table = parse(WEIGHTS)
    router = Router(SETTINGS, table, rand=random.Random(1234).random)  # type: ignore[arg-type]
    actor = Actor(organization_id="org")
    counts: Counter[str] = Counter()
    for _ in range(10_000):
        call = _Call(router, router.table, chat_pb2.CreateRequest(route="w"), actor, None)
        picked = call._pick()
        assert isinstance(picked, tuple)
        counts[picked[0].label] += 1
    total = 6 + 3.7 + 0.3 + 0.05
    for name, weight in (("big", 6), ("mid", 3.7), ("tiny", 0.3), ("tinier", 0.05)):
        share = counts[f"w/{name}"] / 10_000
        expected = weight / total
        # Within 3 points of the configured share, and within 4.5 binomial standard deviations
        # (tighter than 3 points for every weight here): a real bias would fail one of them.
        sigma = (expected * (1 - expected) / 10_000) ** 0.5
        assert abs(share - expected) <= min(0.03, 4.5 * sigma), (name, share, expected)
        if expected >= 0.3:  # where 10,000 draws resolve it: within 3% of the share itself
            assert abs(share - expected) <= 0.03 * expected, (name, share, expected)
    assert counts["w/tinier"] > 0  # a weight of 0.05 next to 6 is not rounded to zero


def test_a_cooling_deployment_is_not_selected_and_all_cooling_reports_the_earliest() -> None:
    table = parse(WEIGHTS)
    now = [50.0]
    router = Router(SETTINGS, table, rand=random.Random(1).random, health=Health(clock=lambda: now[0]))  # type: ignore[arg-type]
    actor = Actor(organization_id="org")
    router.health.cool("w/big", 5)
    router.health.cool("w/mid", 3)
    router.health.cool("w/tinier", 4)
    for _ in range(200):
        picked = _Call(router, router.table, chat_pb2.CreateRequest(route="w"), actor, None)._pick()
        assert isinstance(picked, tuple) and picked[0].label == "w/tiny"
    router.health.cool("w/tiny", 9)
    assert _Call(router, router.table, chat_pb2.CreateRequest(route="w"), actor, None)._pick() == 53.0
