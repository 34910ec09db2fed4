"""One Settings object, built once in main from flags and `LLMGW_*` variables, passed down."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit

from server.config_values import (
    parse_bool,
    parse_listen,
    parse_non_negative,
    parse_retention,
    userinfo_unencoded,
)
from server.grpc_options import connection_problems
from server.setting_names import AUTH_MODES, BACKEND_NAMES, LOCAL_AUTH_TYPES

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_OPENROUTER_BASE_URL = "https://openrouter.ai/api/v1"
DEFAULT_ANTHROPIC_BASE_URL = "https://api.anthropic.com/v1"
DEFAULT_GOOGLE_AI_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"
DEFAULT_GROQ_BASE_URL = "https://api.groq.com/openai/v1"
DEFAULT_DEEPSEEK_BASE_URL = "https://api.deepseek.com/v1"
# Azure OpenAI has no default resource; this is the latest GA data-plane API version.
DEFAULT_AZURE_API_VERSION = "2024-10-21"
# The gRPC server sends messages up to 64 MiB (server.app): an answer's final message is its text
# plus small, bounded labels and framing, so the cap may go up to 63 MiB and defaults to half.
MAX_ANSWER_BYTES_LIMIT = 63 * 1024 * 1024
DEFAULT_MAX_ANSWER_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """Backoff for upstream calls: delay = min(max_delay, initial * multiplier**n * (1 + jitter*rand))."""

    initial_delay: float = 1.0
    multiplier: float = 2.0
    jitter: float = 1.0
    max_delay: float = 20.0
    max_attempts: int = 6
    retry_statuses: tuple[int, ...] = (429, 500, 502, 503, 504)
    retry_connection_errors: bool = True


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable; field names are the lower-cased `LLMGW_` variable names."""

    listen: str = "127.0.0.1:50051"
    workers: int = 1
    trace_backends: tuple[str, ...] = ("sqlite",)
    # Made absolute once, by load_settings (logged at start-up): workers and `keys` agree on it.
    sqlite_path: str = "llm-gateway.db"
    postgres_dsn: str = ""
    # Where gateway keys and BYOK providers live: "sqlite" (LLMGW_SQLITE_PATH) or "postgres";
    # "" is SQLite too, not chosen explicitly (server/auth/factory.py then checks an older layout).
    key_store: str = ""
    # Seconds a trace is kept (LLMGW_TRACE_RETENTION=30d); 0 keeps every trace.
    trace_retention: float = 0.0
    clickhouse_url: str = ""
    trace_socket: str = "/var/run/telemetry/telemetry.sock"
    # Per trace backend: the most trace text its queue holds while the store is slow (oldest
    # dropped first, counted), besides the 10,000-trace bound.
    trace_queue_bytes: int = 256 * 1024 * 1024
    # The most one ListProviderTraces page or GetProviderTrace answer carries (default: the 4 MiB
    # every gRPC client receives by default); a bigger trace comes back cut, marked `truncated`.
    trace_page_bytes: int = 4 * 1024 * 1024
    # The admin HTTP listener: /metrics, the console and its JSON API ("" turns it off). With
    # several workers, worker 0 serves it and its /metrics sums every worker's.
    admin_listen: str = "127.0.0.1:9464"
    # Distinct model names a process labels metrics with; later ones are counted as "other".
    metrics_max_models: int = 50
    openai_base_url: str = DEFAULT_OPENAI_BASE_URL
    openrouter_base_url: str = DEFAULT_OPENROUTER_BASE_URL
    openrouter_referer: str = ""
    openrouter_title: str = ""
    anthropic_base_url: str = DEFAULT_ANTHROPIC_BASE_URL
    google_ai_base_url: str = DEFAULT_GOOGLE_AI_BASE_URL
    groq_base_url: str = DEFAULT_GROQ_BASE_URL
    deepseek_base_url: str = DEFAULT_DEEPSEEK_BASE_URL
    # The Azure resource (`https://<name>.openai.azure.com`) or its v1 API (`.../openai/v1`).
    azure_base_url: str = ""
    azure_api_version: str = DEFAULT_AZURE_API_VERSION
    allowed_endpoints: tuple[str, ...] = ()
    encryption_key: str = field(default="", repr=False)
    # Also accepted for reading BYOK keys, never for writing: the other passphrase of a rotation.
    encryption_key_previous: str = field(default="", repr=False)
    # false once `keys rotate-encryption` has run: unbound v1 records are then refused.
    byok_read_v1: bool = True
    auth: str = "auto"
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    grace_period: float = 10.0
    # gRPC connection management for load balancers (seconds; server/grpc_options.py says why).
    grpc_max_connection_age: float = 300.0
    grpc_max_connection_age_grace: float = 3600.0
    grpc_keepalive_time: float = 60.0
    grpc_keepalive_timeout: float = 20.0
    grpc_min_ping_interval: float = 10.0
    # Calls that arrived but that this worker's event loop has not started yet, held by grpc
    # instead of cancelled (server/grpc_options.py says why and what one costs).
    grpc_max_pending_calls: int = 4_000
    # Bound on an upstream call when the caller set no deadline (streams: between two reads).
    upstream_timeout: float = 600.0
    # UTF-8 bytes of text one answer may carry (content, reasoning, tool calls; streamed or unary).
    max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES
    log_level: str = "INFO"
    # The routes file (TOML, `server.routing.config`); reloaded on SIGHUP. "": no routes.
    routes_file: str = ""
    # Prices (server.billing): a JSON file whose entries add to or replace the shipped table.
    prices_file: str = ""
    # Limit counters shared by every replica (server.limits); empty: in this process only.
    redis_url: str = field(default="", repr=False)  # may hold a password
    # Redis unreachable: "open" admits calls unchecked (a warning, a counter), "closed" refuses
    # them with UNAVAILABLE LIMITS_UNAVAILABLE.
    limits_redis_failure: str = "open"
    # Local LLM servers (seed: openllm_auth_type / openllm_api_key): "", "bearer_token" or "api_key".
    local_auth_type: str = ""
    # The local server the local key belongs to; the key is sent to no other endpoint.
    local_base_url: str = ""
    local_api_key: str = field(default="", repr=False)
    # llamacpp/vllm endpoints: the guard counts the prompt with the server's /tokenize (one
    # extra loopback round trip, cached per prompt prefix; server.providers.local.exact_count).
    local_exact_tokens: bool = False
    # A required or forced call answered without one is asked once more before TOOL_CALL_MISSING
    # (server.core.tool_call_check; streams only when nothing was relayed yet).
    tool_call_missing_retry: bool = False
    # Provider keys keep their usual names and are read from the environment only.
    openai_api_key: str = field(default="", repr=False)
    openrouter_api_key: str = field(default="", repr=False)
    anthropic_api_key: str = field(default="", repr=False)
    gemini_api_key: str = field(default="", repr=False)
    groq_api_key: str = field(default="", repr=False)
    deepseek_api_key: str = field(default="", repr=False)
    azure_api_key: str = field(default="", repr=False)
    retry: RetrySettings = field(default_factory=RetrySettings)

    def provider_base_urls(self) -> tuple[str, ...]:
        """The base URLs of the providers the server holds keys for (always callable); Azure's
        only when one is configured."""
        urls = (
            self.openai_base_url,
            self.openrouter_base_url,
            self.anthropic_base_url,
            self.google_ai_base_url,
            self.groq_base_url,
            self.deepseek_base_url,
            self.azure_base_url,
        )
        return tuple(url for url in urls if url)

    def secrets(self) -> tuple[str, ...]:
        """Every server-held secret value (for the redactor)."""
        return tuple(getattr(self, name) for name in sorted(SECRET_FIELDS))


# Seed names accepted as aliases so its users can switch without edits.
_ALIASES = {
    "trace_backends": ("LETTA_TELEMETRY_PROVIDER_TRACE_BACKEND",),
    "trace_socket": ("TELEMETRY_SOCKET",),
    # Letta's names for the Azure settings.
    "azure_base_url": ("AZURE_BASE_URL",),
    "azure_api_version": ("AZURE_API_VERSION",),
}
# Provider key field -> its variables, the first set one wins (GOOGLE_API_KEY: the google-genai
# SDK's other name for the Gemini key).
_PROVIDER_KEYS = {
    "openai_api_key": ("OPENAI_API_KEY",),
    "openrouter_api_key": ("OPENROUTER_API_KEY",),
    "anthropic_api_key": ("ANTHROPIC_API_KEY",),
    "gemini_api_key": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    "groq_api_key": ("GROQ_API_KEY",),
    "deepseek_api_key": ("DEEPSEEK_API_KEY",),
    "azure_api_key": ("AZURE_API_KEY",),
}
_TUPLE_FIELDS = {"trace_backends", "allowed_endpoints"}
# Upstream base URLs: checked as the endpoint policy reads them, so a typo names its variable.
_BASE_URL_FIELDS = (
    "openai_base_url",
    "openrouter_base_url",
    "anthropic_base_url",
    "google_ai_base_url",
    "groq_base_url",
    "deepseek_base_url",
    "azure_base_url",
    "local_base_url",
)
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# More server processes than this is a typo, not a deployment (each is a whole server).
MAX_WORKERS = 1024
_RETENTION_FIELDS = {"trace_retention"}
SECRET_FIELDS = frozenset({"encryption_key", "encryption_key_previous", "local_api_key", *_PROVIDER_KEYS})


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _coerce(name: str, raw: str, default: object) -> object:
    """The setting's value in the type of its default; a bad value names the setting."""
    try:
        if name in _TUPLE_FIELDS:
            return _split(raw)
        if name in _RETENTION_FIELDS:
            return parse_retention(raw)
        if isinstance(default, tuple):  # a list of numbers, e.g. LLMGW_RETRY_STATUSES
            return tuple(int(part) for part in _split(raw))
        if isinstance(default, bool):
            return parse_bool(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):  # durations and multipliers: finite and not negative
            return parse_non_negative(raw)
    except ValueError as exc:
        raise ValueError(f"LLMGW_{name.upper()}: {exc}") from exc
    return raw


def _retry_setting_names() -> dict[str, str]:
    """Setting name (`LLMGW_<NAME>`, `--name`) -> RetrySettings field."""
    names = {}
    for f in fields(RetrySettings):
        names[f.name if f.name.startswith("retry_") else "retry_" + f.name] = f.name
    return names


def _configurable_fields() -> list[str]:
    return [f.name for f in fields(Settings) if f.name != "retry" and f.name not in _PROVIDER_KEYS]


# What `--help` says beyond the variable's name, where the rule is not obvious from it.
_HELP = {
    "sqlite_path": "the SQLite file: traces, and gateway keys and BYOK providers unless "
    "LLMGW_KEY_STORE=postgres; a relative path is resolved against the working directory at start-up",
    "postgres_dsn": "PostgreSQL (postgresql://...) for the postgres trace backend, and for gateway keys "
    "and BYOK providers only with LLMGW_KEY_STORE=postgres",
    "key_store": "where gateway keys and BYOK providers live: sqlite (default, LLMGW_SQLITE_PATH) or "
    "postgres (LLMGW_POSTGRES_DSN)",
    "trace_retention": "delete traces older than this: 30d, 12h, 90m, 3600s, 2w (unset: keep all)",
    "log_level": "DEBUG, INFO (default), WARNING, ERROR or CRITICAL",
}


def add_arguments(parser: argparse.ArgumentParser, *, nested: bool = False) -> None:
    """Add one flag per setting (`--sqlite-path` for `LLMGW_SQLITE_PATH`).

    `nested` is for sub-commands: their flags leave alone a value the parent parser already read.
    """
    for name in [*_configurable_fields(), *_retry_setting_names()]:
        help_text = f"env LLMGW_{name.upper()}"
        if name in _HELP:
            help_text += ": " + _HELP[name]
        if name in SECRET_FIELDS:
            help_text += " (prefer the environment for secrets)"
        default = argparse.SUPPRESS if nested else None
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=default, help=help_text)


def load_settings(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Flags win over `LLMGW_*` variables, which win over seed aliases and defaults."""
    env = os.environ if environ is None else environ
    defaults = Settings()
    values: dict[str, object] = {}
    for name in _configurable_fields():
        raw: str | None = getattr(args, name, None) if args is not None else None
        if raw is None:
            raw = env.get("LLMGW_" + name.upper())
        if raw is None:
            raw = next((env[a] for a in _ALIASES.get(name, ()) if a in env), None)
        if raw is not None:
            values[name] = _coerce(name, raw, getattr(defaults, name))
    for name, variables in _PROVIDER_KEYS.items():
        values[name] = next((env[v] for v in variables if env.get(v)), "")
    retry_defaults = RetrySettings()
    retry_values: dict[str, object] = {}
    for name, field_name in _retry_setting_names().items():
        raw = getattr(args, name, None) if args is not None else None
        if raw is None:
            raw = env.get("LLMGW_" + name.upper())
        if raw is None:
            continue
        retry_values[field_name] = _coerce(name, raw, getattr(retry_defaults, field_name))
    values["retry"] = RetrySettings(**retry_values)  # type: ignore[arg-type]
    # Resolved here, once: a worker or a later chdir must not move the database.
    path = str(values.get("sqlite_path", defaults.sqlite_path))
    if path and path != ":memory:" and not path.startswith("file:"):
        values["sqlite_path"] = os.path.abspath(path)
    settings = Settings(**values)  # type: ignore[arg-type]
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    """Refuse configurations that cannot work, with a message naming the setting."""
    problems: list[str] = []
    if not 1 <= settings.workers <= MAX_WORKERS:
        problems.append(f"LLMGW_WORKERS must be between 1 and {MAX_WORKERS}")
    if settings.log_level.upper() not in _LOG_LEVELS:
        problems.append(f"LLMGW_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)} (any case)")
    problems += _address_problems(settings)
    if settings.auth not in AUTH_MODES:
        problems.append(f"LLMGW_AUTH must be one of {', '.join(AUTH_MODES)}")
    unknown: Sequence[str] = [b for b in settings.trace_backends if b not in BACKEND_NAMES]
    if unknown:
        problems.append(f"LLMGW_TRACE_BACKENDS: unknown backend(s) {', '.join(unknown)}")
    if "postgres" in settings.trace_backends and not settings.postgres_dsn:
        problems.append("LLMGW_TRACE_BACKENDS has postgres but LLMGW_POSTGRES_DSN is empty")
    if settings.key_store not in ("", "sqlite", "postgres"):
        problems.append("LLMGW_KEY_STORE must be sqlite or postgres")
    elif settings.key_store == "postgres" and not settings.postgres_dsn:
        problems.append("LLMGW_KEY_STORE is postgres but LLMGW_POSTGRES_DSN is empty")
    if "clickhouse" in settings.trace_backends and not settings.clickhouse_url:
        problems.append("LLMGW_TRACE_BACKENDS has clickhouse but LLMGW_CLICKHOUSE_URL is empty")
    if settings.metrics_max_models < 1:
        problems.append("LLMGW_METRICS_MAX_MODELS must be at least 1")
    if settings.trace_queue_bytes < 1:
        problems.append("LLMGW_TRACE_QUEUE_BYTES must be at least 1")
    # Below the server's 64 MiB gRPC send limit (server/app.py MAX_MESSAGE_BYTES), with room.
    if not 4096 <= settings.trace_page_bytes <= 60 * 1024 * 1024:
        problems.append("LLMGW_TRACE_PAGE_BYTES must be between 4096 and 62914560 (60 MiB)")
    retry = settings.retry
    if retry.max_attempts < 1:
        problems.append("LLMGW_RETRY_MAX_ATTEMPTS must be at least 1")
    if retry.multiplier < 1:
        problems.append("LLMGW_RETRY_MULTIPLIER must be at least 1")
    bad_statuses = [str(s) for s in retry.retry_statuses if not 100 <= s <= 599]
    if bad_statuses:
        problems.append(f"LLMGW_RETRY_STATUSES: {', '.join(bad_statuses)} not HTTP status codes (100-599)")
    if not 1 <= settings.max_answer_bytes <= MAX_ANSWER_BYTES_LIMIT:
        problems.append(
            f"LLMGW_MAX_ANSWER_BYTES must be between 1 and {MAX_ANSWER_BYTES_LIMIT} "
            "(the final gRPC message must stay under the server's 64 MiB send limit)"
        )
    if settings.local_auth_type not in ("", *LOCAL_AUTH_TYPES):
        problems.append(f"LLMGW_LOCAL_AUTH_TYPE must be empty, {' or '.join(LOCAL_AUTH_TYPES)}")
    elif settings.local_auth_type and not (settings.local_api_key and settings.local_base_url):
        problems.append(
            "LLMGW_LOCAL_AUTH_TYPE needs LLMGW_LOCAL_API_KEY and LLMGW_LOCAL_BASE_URL "
            "(the key is sent only to endpoints under that base URL)"
        )
    if settings.limits_redis_failure not in ("open", "closed"):
        problems.append("LLMGW_LIMITS_REDIS_FAILURE must be open or closed")
    problems += connection_problems(settings)
    if bool(settings.tls_cert) != bool(settings.tls_key):
        problems.append("LLMGW_TLS_CERT (--tls-cert) and LLMGW_TLS_KEY (--tls-key) go together")
    if problems:
        raise ValueError("; ".join(problems))


def _address_problems(settings: Settings) -> list[str]:
    """Listen addresses, upstream URLs and the DSN, each named (a DSN is never echoed: its password)."""
    # Here, not at the top: endpoints imports grpc, which main() must configure first.
    from server.auth.endpoints import InvalidEndpoint, normalize_url

    problems: list[str] = []
    for name, value, unix in (
        ("listen", settings.listen, True),
        ("admin_listen", settings.admin_listen, False),
    ):
        if name == "admin_listen" and not value:
            continue  # off
        try:
            parse_listen(value, allow_unix=unix)
        except ValueError as exc:
            problems.append(f"LLMGW_{name.upper()}: {exc}")
    for name in _BASE_URL_FIELDS:
        url = getattr(settings, name)
        if not url:
            continue
        try:
            normalize_url(url)
        except InvalidEndpoint as exc:
            problems.append(f"LLMGW_{name.upper()}: not a usable base URL: {exc}")
    url = settings.clickhouse_url
    if url and (userinfo_unencoded(url) or not _http_url(url)):
        problems.append(
            "LLMGW_CLICKHOUSE_URL must be http(s)://[user:password@]host[:port][/database] "
            "(the password percent-encoded)"
        )
    redis = settings.redis_url
    if redis and (userinfo_unencoded(redis) or not _redis_url(redis)):
        problems.append(
            "LLMGW_REDIS_URL must be redis://[:password@]host[:port][/db], rediss://... or "
            "unix:///path (the password percent-encoded)"
        )
    dsn = settings.postgres_dsn
    if dsn and not dsn.lower().startswith(("postgres://", "postgresql://")):
        problems.append(
            "LLMGW_POSTGRES_DSN must be a postgresql:// URL (postgresql://user:password@host:port/db)"
        )
    elif dsn and userinfo_unencoded(dsn):
        problems.append(
            "LLMGW_POSTGRES_DSN: percent-encode the password's / ? # @ characters (e.g. / as %2F)"
        )
    elif dsn and not _dsn_ports_ok(dsn):
        problems.append("LLMGW_POSTGRES_DSN: a port is not a number (host:port[,host:port...])")
    return problems


def _http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def _redis_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return False
    if parts.scheme.lower() == "unix":
        return bool(parts.path)
    return parts.scheme.lower() in ("redis", "rediss") and bool(parts.hostname)


def _dsn_ports_ok(dsn: str) -> bool:
    """Every `host[:port]` of a postgresql:// URL (libpq allows several, comma-separated) has a
    numeric port or none."""
    netloc = dsn.partition("://")[2].split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    for host in netloc.split(","):
        if host.startswith("["):  # [v6]:port
            host = host.partition("]")[2]
        port = host.rpartition(":")[2] if ":" in host else ""
        if port and not port.isdigit():
            return False
    return True
