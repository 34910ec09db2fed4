"""Settings: flags over LLMGW_* over seed aliases over defaults, and refusals that name the setting."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from server.config import RetrySettings, Settings, add_arguments, load_settings


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_match_the_contract() -> None:
    settings = load_settings(parse(), environ={})
    assert settings.listen == "127.0.0.1:50051"
    assert settings.trace_backends == ("sqlite",)
    assert settings.openai_base_url == "https://api.openai.com/v1"
    assert settings.auth == "auto"
    assert settings.retry == RetrySettings()


def test_flags_win_over_environment_which_wins_over_seed_aliases() -> None:
    env = {
        "LLMGW_TRACE_BACKENDS": "sqlite,socket",
        "LETTA_TELEMETRY_PROVIDER_TRACE_BACKEND": "postgres",
        "TELEMETRY_SOCKET": "/tmp/seed.sock",
        "LLMGW_LISTEN": "127.0.0.1:6000",
    }
    settings = load_settings(parse("--listen", "127.0.0.1:7000"), environ=env)
    assert settings.listen == "127.0.0.1:7000"
    assert settings.trace_backends == ("sqlite", "socket")
    assert settings.trace_socket == "/tmp/seed.sock"  # alias used when LLMGW_TRACE_SOCKET is absent


def test_seed_alias_alone_selects_backends() -> None:
    env = {"LETTA_TELEMETRY_PROVIDER_TRACE_BACKEND": "sqlite,socket"}
    assert load_settings(parse(), environ=env).trace_backends == ("sqlite", "socket")


def test_provider_keys_come_from_their_usual_names_only() -> None:
    env = {"OPENAI_API_KEY": "sk-a", "OPENROUTER_API_KEY": "or-b", "LLMGW_OPENAI_API_KEY": "ignored"}
    settings = load_settings(parse(), environ=env)
    assert (settings.openai_api_key, settings.openrouter_api_key) == ("sk-a", "or-b")
    assert "sk-a" not in repr(settings)


def test_retry_policy_is_configurable() -> None:
    env = {
        "LLMGW_RETRY_MAX_ATTEMPTS": "3",
        "LLMGW_RETRY_STATUSES": "429,503",
        "LLMGW_RETRY_CONNECTION_ERRORS": "no",
    }
    settings = load_settings(parse("--retry-initial-delay", "0.25"), environ=env)
    assert settings.retry == RetrySettings(
        initial_delay=0.25, max_attempts=3, retry_statuses=(429, 503), retry_connection_errors=False
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LLMGW_WORKERS": "many"}, "LLMGW_WORKERS"),
        ({"LLMGW_WORKERS": "0"}, "LLMGW_WORKERS"),
        ({"LLMGW_AUTH": "maybe"}, "LLMGW_AUTH"),
        ({"LLMGW_TRACE_BACKENDS": "sqlite,mongo"}, "mongo"),
        ({"LLMGW_TRACE_BACKENDS": "postgres"}, "LLMGW_POSTGRES_DSN"),
        ({"LLMGW_TRACE_BACKENDS": "clickhouse"}, "LLMGW_CLICKHOUSE_URL"),
        ({"LLMGW_TLS_CERT": "/x.pem"}, "--tls-key"),
        ({"LLMGW_LOCAL_AUTH_TYPE": "basic"}, "LLMGW_LOCAL_AUTH_TYPE"),
        ({"LLMGW_LOCAL_AUTH_TYPE": "bearer_token", "LLMGW_LOCAL_API_KEY": "k" * 12}, "LLMGW_LOCAL_BASE_URL"),
        ({"LLMGW_RETRY_MAX_ATTEMPTS": "0"}, "LLMGW_RETRY_"),
        ({"LLMGW_RETRY_STATUSES": "429,oops"}, "LLMGW_RETRY_STATUSES"),
    ],
)
def test_bad_configuration_is_refused_naming_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_settings(parse(), environ=env)


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().listen = "x"  # type: ignore[misc]


# -- issue 15, item 6: configuration errors are errors --------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        # A boolean that is not a documented spelling is refused, not read as false.
        ({"LLMGW_BYOK_READ_V1": "flase"}, "LLMGW_BYOK_READ_V1: 'flase' is not a boolean"),
        ({"LLMGW_RETRY_CONNECTION_ERRORS": "disabled"}, "LLMGW_RETRY_CONNECTION_ERRORS"),
        ({"LLMGW_BYOK_READ_V1": ""}, "LLMGW_BYOK_READ_V1"),
        # Durations: negative, not finite, or not a number.
        ({"LLMGW_GRACE_PERIOD": "-5"}, "LLMGW_GRACE_PERIOD: '-5'"),
        ({"LLMGW_UPSTREAM_TIMEOUT": "nan"}, "LLMGW_UPSTREAM_TIMEOUT"),
        ({"LLMGW_UPSTREAM_TIMEOUT": "inf"}, "LLMGW_UPSTREAM_TIMEOUT"),
        ({"LLMGW_GRACE_PERIOD": "10s"}, "LLMGW_GRACE_PERIOD"),
        ({"LLMGW_RETRY_INITIAL_DELAY": "-0.1"}, "LLMGW_RETRY_INITIAL_DELAY"),
        ({"LLMGW_RETRY_JITTER": "-1"}, "LLMGW_RETRY_JITTER"),
        ({"LLMGW_TRACE_RETENTION": "-30d"}, "LLMGW_TRACE_RETENTION"),
        ({"LLMGW_TRACE_RETENTION": "30 days"}, "LLMGW_TRACE_RETENTION"),
        ({"LLMGW_TRACE_RETENTION": "0d"}, "LLMGW_TRACE_RETENTION"),
        ({"LLMGW_TRACE_RETENTION": "1.5d"}, "LLMGW_TRACE_RETENTION"),
        # Unknown names.
        ({"LLMGW_TRACE_BACKENDS": "sqlite,SQLite"}, "SQLite"),
        ({"LLMGW_KEY_STORE": "redis"}, "LLMGW_KEY_STORE must be sqlite or postgres"),
        ({"LLMGW_KEY_STORE": "postgres"}, "LLMGW_KEY_STORE is postgres but LLMGW_POSTGRES_DSN is empty"),
    ],
)
def test_garbled_values_refuse_to_start_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_settings(parse(), environ=env)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("1", True),
        ("TRUE", True),
        ("yes", True),
        ("On", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("off", False),
    ],
)
def test_every_documented_boolean_spelling_is_read(raw: str, value: bool) -> None:
    assert load_settings(parse(), environ={"LLMGW_BYOK_READ_V1": raw}).byok_read_v1 is value


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("30d", 30 * 86400.0),
        ("12h", 43200.0),
        ("90m", 5400.0),
        ("3600s", 3600.0),
        ("2w", 14 * 86400.0),
        ("", 0.0),
        ("0", 0.0),
    ],
)
def test_trace_retention_spellings(raw: str, seconds: float) -> None:
    assert load_settings(parse(), environ={"LLMGW_TRACE_RETENTION": raw}).trace_retention == seconds


def test_a_flag_is_as_strict_as_the_variable() -> None:
    with pytest.raises(ValueError, match="LLMGW_GRACE_PERIOD"):
        load_settings(parse("--grace-period", "-1"), environ={})


def test_a_relative_sqlite_path_is_resolved_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(parse(), environ={"LLMGW_SQLITE_PATH": "data/gw.db"})
    assert settings.sqlite_path == str(tmp_path / "data" / "gw.db")
    assert load_settings(parse(), environ={}).sqlite_path == str(tmp_path / "llm-gateway.db")
    assert load_settings(parse(), environ={"LLMGW_SQLITE_PATH": ":memory:"}).sqlite_path == ":memory:"


def test_the_key_store_is_sqlite_unless_told_even_with_a_dsn(tmp_path: Path) -> None:
    from server.auth.factory import create_auth_store
    from server.auth.store_sqlite import SqliteAuthStore

    env = {"LLMGW_POSTGRES_DSN": "postgresql://u@db/x", "LLMGW_SQLITE_PATH": str(tmp_path / "gw.db")}
    settings = load_settings(parse(), environ=env)
    assert settings.key_store == ""  # not chosen: SQLite, with the check for an older layout
    assert isinstance(create_auth_store(settings), SqliteAuthStore)
    assert load_settings(parse(), environ={**env, "LLMGW_KEY_STORE": "sqlite"}).key_store == "sqlite"
    env = {"LLMGW_POSTGRES_DSN": "postgresql://u@db/x", "LLMGW_KEY_STORE": "postgres"}
    assert load_settings(parse(), environ=env).key_store == "postgres"
