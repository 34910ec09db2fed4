"""Review of issue 15 item 6: every setting of server/config.py refuses garbage, naming itself.

Every field of `Settings` (and of `RetrySettings`) is classified below; a new setting that is not
fails `test_every_setting_is_classified`, so nobody adds one that reads garbage silently. Each
garbage value is tried through the environment and through the flag, and the message must name
the variable (`LLMGW_<NAME>`).
"""

from __future__ import annotations

import argparse

import pytest

from server.config import _configurable_fields, _retry_setting_names, add_arguments, load_settings

BOOLEANS = {"byok_read_v1", "local_exact_tokens", "retry_connection_errors", "tool_call_missing_retry"}
INTEGERS = {
    "workers": ["abc", "", "1.5", "0", "-1", "99999999999999999999"],
    "trace_queue_bytes": ["abc", "", "1.5", "0", "-1"],
    "trace_page_bytes": ["abc", "", "1.5", "-1", "10"],
    "metrics_max_models": ["abc", "", "1.5", "0", "-1"],
    "max_answer_bytes": ["abc", "", "1.5", "0", "-1"],
    "retry_max_attempts": ["abc", "", "1.5", "0", "-1"],
    "grpc_max_pending_calls": ["abc", "", "1.5", "0", "-1", "1000001"],
}
DURATIONS = {
    "grace_period",
    "upstream_timeout",
    "retry_initial_delay",
    "retry_multiplier",
    "retry_jitter",
    "retry_max_delay",
    "grpc_max_connection_age",
    "grpc_max_connection_age_grace",
    "grpc_keepalive_time",
    "grpc_keepalive_timeout",
    "grpc_min_ping_interval",
}
ENUMS = {
    "auth": ["garbage", "", "Required "],
    "key_store": ["garbage", "mysql", "sqlite3"],
    "local_auth_type": ["garbage", "bearer"],
    "log_level": ["garbage", "verbose", "basic_format", "", "root"],
    "trace_backends": ["garbage", "sqlite,garbage"],
    "limits_redis_failure": ["garbage", "", "Open ", "fail"],
}
URLS = {
    "openai_base_url",
    "openrouter_base_url",
    "anthropic_base_url",
    "google_ai_base_url",
    "groq_base_url",
    "deepseek_base_url",
    "azure_base_url",
    "local_base_url",
    "clickhouse_url",
}
URL_GARBAGE = ["garbage", "ftp://example.com", "http://", "http://example.com:notaport/", "api.openai.com/v1"]
LISTEN = {
    "listen": ["127.0.0.1:abc", "127.0.0.1", "127.0.0.1:99999", "garbage"],
    "admin_listen": ["127.0.0.1:abc", "localhost", "ftp://x", "127.0.0.1:99999", "127.0.0.1:-1"],
}
# Read as given (paths, names, secrets, free text), or checked where they are used (named there).
FREE = {
    "sqlite_path",
    "postgres_dsn",  # its own test below (the password must not be echoed)
    "trace_retention",  # tests/unit/test_config.py
    "trace_socket",
    "openrouter_referer",
    "openrouter_title",
    "azure_api_version",
    "allowed_endpoints",  # checked by the endpoint policy at start-up, named there
    "encryption_key",
    "encryption_key_previous",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "routes_file",
    "prices_file",  # read at start-up; a bad file names the file and the entry (tests/unit/test_billing.py)
    "redis_url",  # its own test below (the password must not be echoed)
    "local_api_key",
    "retry_statuses",  # its own test below
}


def _all_settings() -> list[str]:
    return [*_configurable_fields(), *_retry_setting_names()]


def test_every_setting_is_classified() -> None:
    classified = BOOLEANS | set(INTEGERS) | DURATIONS | set(ENUMS) | URLS | set(LISTEN) | FREE
    assert set(_all_settings()) == classified


def _garbage() -> list[tuple[str, str]]:
    cases: list[tuple[str, str]] = []
    cases += [(name, raw) for name in sorted(BOOLEANS) for raw in ("flase", "", "2", "yes please")]
    cases += [(name, raw) for name, raws in INTEGERS.items() for raw in raws]
    cases += [(name, raw) for name in sorted(DURATIONS) for raw in ("abc", "", "-1", "nan", "inf", "10s")]
    cases += [(name, raw) for name, raws in ENUMS.items() for raw in raws]
    cases += [(name, raw) for name in sorted(URLS) for raw in URL_GARBAGE]
    cases += [(name, raw) for name, raws in LISTEN.items() for raw in raws]
    cases += [("retry_statuses", raw) for raw in ("abc", "99", "600", "-5", "500,x")]
    return cases


def _needs(name: str) -> dict[str, str]:
    """What a setting needs beside it to be checked at all."""
    if name == "local_base_url":
        return {"LLMGW_LOCAL_AUTH_TYPE": "bearer_token", "LLMGW_LOCAL_API_KEY": "k"}
    if name == "clickhouse_url":
        return {"LLMGW_TRACE_BACKENDS": "sqlite,clickhouse"}
    return {}


@pytest.mark.parametrize(("name", "raw"), _garbage())
def test_garbage_in_the_environment_is_refused_naming_the_variable(name: str, raw: str) -> None:
    variable = "LLMGW_" + name.upper()
    with pytest.raises(ValueError, match=variable) as refused:
        load_settings(environ={**_needs(name), variable: raw})
    assert "Traceback" not in str(refused.value)


@pytest.mark.parametrize(("name", "raw"), _garbage())
def test_garbage_in_a_flag_is_refused_naming_the_variable(name: str, raw: str) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--" + name.replace("_", "-"), raw])
    with pytest.raises(ValueError, match="LLMGW_" + name.upper()):
        load_settings(args, environ=_needs(name))


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"LLMGW_LOG_LEVEL": "debug"}, "debug"),
        ({"LLMGW_LOG_LEVEL": "WARNING"}, "WARNING"),
        ({"LLMGW_RETRY_STATUSES": "500, 503"}, None),
        ({"LLMGW_RETRY_STATUSES": ""}, None),  # retry on 429 and connection errors only
        ({"LLMGW_LISTEN": "[::1]:50051"}, None),
        ({"LLMGW_LISTEN": "0.0.0.0:0"}, None),
        ({"LLMGW_LISTEN": "unix:/tmp/gw.sock"}, None),
        ({"LLMGW_LISTEN": "localhost:50051"}, None),
        ({"LLMGW_ADMIN_LISTEN": "[::1]:9464"}, None),
        ({"LLMGW_ADMIN_LISTEN": "127.0.0.1:0"}, None),
        ({"LLMGW_ADMIN_LISTEN": ""}, None),
        ({"LLMGW_OPENAI_BASE_URL": "http://10.0.0.5:8080/v1"}, None),
        ({"LLMGW_AZURE_BASE_URL": ""}, None),
        ({"LLMGW_POSTGRES_DSN": "postgres://u:p@db:5432/gw"}, None),
        ({"LLMGW_POSTGRES_DSN": "postgresql:///gw?host=/run/postgresql"}, None),
    ],
)
def test_good_values_still_pass(env: dict[str, str], expected: str | None) -> None:
    settings = load_settings(environ=env)
    if expected is not None:
        assert settings.log_level == expected


@pytest.mark.parametrize(
    "dsn",
    [
        "garbage",
        "mysql://gw:s3cr3t-pw@db/gw",
        "postgresql://gw:s3cr3t-pw@db:notaport/gw",
        "host=db password=s3cr3t-pw",
    ],
)
def test_a_garbled_postgres_dsn_is_refused_without_its_password(dsn: str) -> None:
    with pytest.raises(ValueError, match="LLMGW_POSTGRES_DSN") as refused:
        load_settings(environ={"LLMGW_POSTGRES_DSN": dsn, "LLMGW_KEY_STORE": "postgres"})
    assert "s3cr3t-pw" not in str(refused.value)


def test_tls_halves_name_their_variables() -> None:
    with pytest.raises(ValueError, match="LLMGW_TLS_KEY") as refused:
        load_settings(environ={"LLMGW_TLS_CERT": "/etc/gw/cert.pem"})
    assert "LLMGW_TLS_CERT" in str(refused.value)


@pytest.mark.parametrize("command", [["serve"], ["keys", "create"], ["keys", "list"]])
def test_help_says_where_keys_live(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "LLMGW_KEY_STORE: where gateway keys and BYOK providers live: sqlite" in text
    assert "only with LLMGW_KEY_STORE=postgres" in text  # the DSN alone no longer moves keys


@pytest.mark.parametrize(
    "value",
    ["garbage", "http://redis:6379", "redis://:pa/ss@host:6379/0", "redis://host:notaport/0", "redis://"],
)
def test_a_garbled_redis_url_is_refused_naming_the_variable_not_the_password(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMGW_REDIS_URL", value)
    with pytest.raises((SystemExit, ValueError)) as raised:
        load_settings([])
    message = str(raised.value)
    assert "LLMGW_REDIS_URL" in message
    assert "pa/ss" not in message and "ss@" not in message


def test_redis_urls_users_write_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in (
        "redis://127.0.0.1:6379/0",
        "rediss://:p%2Fw@cache.internal:6380",
        "unix:///run/redis.sock",
    ):
        monkeypatch.setenv("LLMGW_REDIS_URL", value)
        assert load_settings([]).redis_url == value
