"""The routes file (`LLMGW_ROUTES_FILE`, TOML) -> an immutable `RouteTable`.

    cooldown_seconds = 5                      # default for every deployment

    [routes.chat]
    fallbacks = ["chat-backup"]               # routes tried after this one's deployments
    fallback_on = []                          # non-retryable reasons that fall back here too
    organizations = []                        # empty: every organization may call it

    [[routes.chat.deployments]]
    name = "openai-a"
    provider = "openai"                       # a model_endpoint_type (not a local server type)
    model = "gpt-4o-mini"
    base_url = "https://api.openai.com/v1"    # empty: the provider's configured base URL
    keys = ["OPENAI_API_KEY", "OPENAI_API_KEY_2"]   # environment variable NAMES, or:
    # key = "OPENAI_API_KEY"  /  byok = "my-provider" (the caller's organization's provider)
    weight = 3
    context_window = 128000
    requests_per_minute = 500
    tokens_per_minute = 200000
    timeout_seconds = 30                      # unary: one attempt; stream: its first event
    cooldown_seconds = 10

Every error names the line it is about and never quotes a key: the file holds variable names
only, a value that is not an upper-case variable name is never echoed (it may be a pasted key),
and a key that is one of the server's provider keys may only go to that provider's base URL.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from llmgateway.v1 import chat_pb2

from server.auth.endpoints import InvalidEndpoint, key_allowed_for, normalize_url
from server.config import Settings
from server.core.keys import PLACEHOLDER_API_KEY, server_key
from server.providers.base import UpstreamTarget
from server.providers.registry import PROVIDERS, provider_for

MAX_FILE_BYTES = 1024 * 1024
MAX_ROUTES = 1000
MAX_DEPLOYMENTS = 64
MAX_KEYS = 16
MAX_COOLDOWN = 24 * 3600.0
DEFAULT_COOLDOWN = 5.0
# Reasons a route may add to the fallback triggers (`fallback_on`); the retryable classes always are.
FALLBACK_ON_REASONS = frozenset(
    {"UPSTREAM_REJECTED", "UPSTREAM_AUTH_FAILED", "MODEL_NOT_FOUND", "NOT_FOUND", "UPSTREAM_BAD_RESPONSE"}
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_VARIABLE = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")
_TOP_KEYS = frozenset({"cooldown_seconds", "routes"})
_ROUTE_KEYS = frozenset({"deployments", "fallbacks", "fallback_on", "organizations", "cooldown_seconds"})
_DEPLOYMENT_KEYS = frozenset(
    {
        "name",
        "provider",
        "model",
        "base_url",
        "key",
        "keys",
        "byok",
        "weight",
        "context_window",
        "requests_per_minute",
        "tokens_per_minute",
        "timeout_seconds",
        "cooldown_seconds",
    }
)
# Settings secret -> the base URL it may be sent to ("" : never sent upstream).
_SECRET_BASES = {
    "openai_api_key": "openai_base_url",
    "openrouter_api_key": "openrouter_base_url",
    "anthropic_api_key": "anthropic_base_url",
    "gemini_api_key": "google_ai_base_url",
    "groq_api_key": "groq_base_url",
    "deepseek_api_key": "deepseek_base_url",
    "azure_api_key": "azure_base_url",
    "local_api_key": "local_base_url",
    "encryption_key": "",
    "encryption_key_previous": "",
}


class RoutesFileError(ValueError):
    """The routes file cannot be used; the message names the file and line, never a key."""

    def __init__(self, path: str, line: int | None, problem: str) -> None:
        where = f"{path}, line {line}" if line else path
        super().__init__(f"routes file {where}: {problem}")
        self.line = line


@dataclass(frozen=True, slots=True)
class Key:
    """One key of a deployment: its variable's name (shown) and value (never shown)."""

    variable: str
    target: UpstreamTarget = field(repr=False)
    unit: str = ""  # its name in the router's health (`route/deployment#VARIABLE`)


@dataclass(frozen=True, slots=True)
class Deployment:
    route: str
    name: str
    provider: str  # model_endpoint_type
    model: str
    base_url: str  # canonical; "" for the provider's configured base URL
    # "keys": file keys (targets prebuilt); "byok": the caller's organization's provider `byok`;
    # "server": the usual server-key rules (`resolve_target`); "keyless": the placeholder key.
    mode: str
    keys: tuple[Key, ...]
    byok: str
    weight: float
    context_window: int
    requests_per_minute: int
    tokens_per_minute: int
    timeout: float | None
    cooldown: float
    line: int
    config: chat_pb2.LLMConfig = field(repr=False, compare=False)
    keyless_target: UpstreamTarget | None = field(default=None, repr=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.route}/{self.name}"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    deployments: tuple[Deployment, ...]
    fallbacks: tuple[str, ...]
    fallback_on: frozenset[str]
    organizations: frozenset[str]  # empty: every organization
    line: int

    def allows(self, organization_id: str) -> bool:
        return not self.organizations or organization_id in self.organizations


@dataclass(frozen=True, slots=True)
class RouteTable:
    routes: Mapping[str, Route]
    path: str = ""

    @property
    def variables(self) -> frozenset[str]:
        return frozenset(k.variable for r in self.routes.values() for d in r.deployments for k in d.keys)


EMPTY = RouteTable({})


# -- line map: tomllib keeps no positions, so the headers and keys are found in the text ---------

_KEY_TEXT = r'(?:[A-Za-z0-9_-]+|"[^"\n]*"|\'[^\'\n]*\')'
_ROUTE_HEADER = re.compile(rf"^\s*\[\s*routes\s*\.\s*({_KEY_TEXT})\s*\]\s*(?:#.*)?$")
_DEPLOYMENT_HEADER = re.compile(
    rf"^\s*\[\[\s*routes\s*\.\s*({_KEY_TEXT})\s*\.\s*deployments\s*\]\]\s*(?:#.*)?$"
)
_ASSIGNMENT = re.compile(rf"^\s*({_KEY_TEXT})\s*=")
_ANY_HEADER = re.compile(r"^\s*\[")


def _unquote(text: str) -> str:
    return text[1:-1] if text[:1] in "\"'" else text


@dataclass(slots=True)
class _Lines:
    routes: dict[str, int] = field(default_factory=dict)
    deployments: dict[str, list[int]] = field(default_factory=dict)
    # (route, deployment index or -1 for the route table, key) -> line
    keys: dict[tuple[str, int, str], int] = field(default_factory=dict)

    @classmethod
    def scan(cls, text: str) -> _Lines:
        lines = cls()
        where: tuple[str, int] | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if m := _ROUTE_HEADER.match(line):
                route = _unquote(m.group(1))
                lines.routes.setdefault(route, number)
                where = (route, -1)
            elif m := _DEPLOYMENT_HEADER.match(line):
                route = _unquote(m.group(1))
                found = lines.deployments.setdefault(route, [])
                found.append(number)
                where = (route, len(found) - 1)
            elif _ANY_HEADER.match(line):
                where = None
            elif where is not None and (m := _ASSIGNMENT.match(line)):
                lines.keys.setdefault((*where, _unquote(m.group(1))), number)
        return lines

    def route(self, name: str) -> int | None:
        return self.routes.get(name)

    def deployment(self, route: str, index: int, key: str | None = None) -> int | None:
        if key is not None and (line := self.keys.get((route, index, key))):
            return line
        found = self.deployments.get(route, [])
        return found[index] if index < len(found) else self.route(route)

    def route_key(self, route: str, key: str) -> int | None:
        return self.keys.get((route, -1, key)) or self.route(route)


# -- loading -----------------------------------------------------------------------------------


def load_routes(path: str, *, settings: Settings, environ: Mapping[str, str]) -> RouteTable:
    """Read and check the routes file; RoutesFileError (naming the line) when it cannot be used."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise RoutesFileError(path, None, f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise RoutesFileError(path, None, f"is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RoutesFileError(path, line, "is not UTF-8") from None
    return parse_routes(text, path=path, settings=settings, environ=environ)


def parse_routes(text: str, *, path: str, settings: Settings, environ: Mapping[str, str]) -> RouteTable:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's messages say "(at line L, column C)" or "(at end of document)" and never
        # quote a value.
        line = len(text.rstrip("\n").split("\n")) if "end of document" in str(exc) else None
        raise RoutesFileError(path, line, f"is not valid TOML: {exc}") from None
    return _Loader(path, _Lines.scan(text), settings, environ).table(data)


class _Loader:
    def __init__(self, path: str, lines: _Lines, settings: Settings, environ: Mapping[str, str]) -> None:
        self.path = path
        self.lines = lines
        self.settings = settings
        self.environ = environ
        self.secret_bases = {
            getattr(settings, name): base for name, base in _SECRET_BASES.items() if getattr(settings, name)
        }

    def fail(self, line: int | None, problem: str) -> RoutesFileError:
        return RoutesFileError(self.path, line, problem)

    def table(self, data: dict[str, Any]) -> RouteTable:
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            raise self.fail(None, f"unknown top-level setting(s) {', '.join(map(repr, unknown))}")
        cooldown = self.seconds(data.get("cooldown_seconds", DEFAULT_COOLDOWN), None, "cooldown_seconds")
        routes_data = data.get("routes", {})
        if not isinstance(routes_data, dict):
            raise self.fail(None, "`routes` must be a table of routes ([routes.NAME])")
        if len(routes_data) > MAX_ROUTES:
            raise self.fail(None, f"has more than {MAX_ROUTES} routes")
        routes = {name: self.route(name, value, cooldown) for name, value in routes_data.items()}
        for route in routes.values():
            for target in route.fallbacks:
                if target not in routes:
                    raise self.fail(
                        self.lines.route_key(route.name, "fallbacks"),
                        f"route {route.name!r} falls back to {target!r}, which is not a route of this file",
                    )
        self.check_cycles(routes)
        return RouteTable(routes, self.path)

    def check_cycles(self, routes: dict[str, Route]) -> None:
        state: dict[str, int] = {}  # 1: on the path, 2: done

        def visit(name: str, path: list[str]) -> None:
            state[name] = 1
            for target in routes[name].fallbacks:
                if state.get(target) == 1:
                    cycle = " -> ".join([*path[path.index(target) :], target])
                    raise self.fail(
                        self.lines.route_key(name, "fallbacks"), f"fallback routes form a cycle: {cycle}"
                    )
                if state.get(target) is None:
                    visit(target, [*path, target])
            state[name] = 2

        for name in routes:
            if state.get(name) is None:
                visit(name, [name])

    def route(self, name: str, data: object, cooldown: float) -> Route:
        line = self.lines.route(name)
        if not _NAME.fullmatch(name):
            raise self.fail(
                line, "a route name is 1-128 letters, digits or . _ : / - (starting with a letter or digit)"
            )
        if not isinstance(data, dict):
            raise self.fail(line, f"route {name!r} must be a table")
        unknown = sorted(set(data) - _ROUTE_KEYS)
        if unknown:
            raise self.fail(line, f"route {name!r}: unknown setting(s) {', '.join(map(repr, unknown))}")
        cooldown = self.seconds(
            data.get("cooldown_seconds", cooldown),
            self.lines.route_key(name, "cooldown_seconds"),
            "cooldown_seconds",
        )
        deployments_data = data.get("deployments", [])
        if not isinstance(deployments_data, list) or not deployments_data:
            raise self.fail(line, f"route {name!r} has no deployments ([[routes.{name}.deployments]])")
        if len(deployments_data) > MAX_DEPLOYMENTS:
            raise self.fail(line, f"route {name!r} has more than {MAX_DEPLOYMENTS} deployments")
        deployments = tuple(self.deployment(name, i, d, cooldown) for i, d in enumerate(deployments_data))
        seen: set[str] = set()
        for i, deployment in enumerate(deployments):
            if deployment.name in seen:
                raise self.fail(
                    self.lines.deployment(name, i, "name"),
                    f"route {name!r} has two deployments named {deployment.name!r} (give each a `name`)",
                )
            seen.add(deployment.name)
        fallbacks = self.strings(
            data.get("fallbacks", []), self.lines.route_key(name, "fallbacks"), "fallbacks"
        )
        fallback_on = self.strings(
            data.get("fallback_on", []), self.lines.route_key(name, "fallback_on"), "fallback_on"
        )
        bad = sorted(set(fallback_on) - FALLBACK_ON_REASONS)
        if bad:
            raise self.fail(
                self.lines.route_key(name, "fallback_on"),
                f"route {name!r}: fallback_on takes {', '.join(sorted(FALLBACK_ON_REASONS))}, "
                f"not {', '.join(bad)}",
            )
        organizations = self.strings(
            data.get("organizations", []), self.lines.route_key(name, "organizations"), "organizations"
        )
        return Route(
            name, deployments, fallbacks, frozenset(fallback_on), frozenset(organizations), line or 0
        )

    def deployment(self, route: str, index: int, data: object, cooldown: float) -> Deployment:
        line = self.lines.deployment(route, index)
        where = f"route {route!r}, deployment {index + 1}"
        if not isinstance(data, dict):
            raise self.fail(line, f"{where} must be a table")

        def at(key: str) -> int | None:
            return self.lines.deployment(route, index, key)

        unknown = sorted(set(data) - _DEPLOYMENT_KEYS)
        if unknown:
            raise self.fail(line, f"{where}: unknown setting(s) {', '.join(map(repr, unknown))}")
        provider = data.get("provider")
        if not isinstance(provider, str) or provider not in PROVIDERS:
            raise self.fail(
                at("provider"), f"{where}: provider must be one of {', '.join(sorted(PROVIDERS))}"
            )
        model = data.get("model")
        if not isinstance(model, str) or not model.strip() or len(model) > 256:
            raise self.fail(at("model"), f"{where}: model is required (a string of at most 256 characters)")
        name = data.get("name", f"{provider}:{model}")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise self.fail(at("name"), f"{where}: a name is 1-128 letters, digits or . _ : / -")
        where = f"route {route!r}, deployment {name!r}"
        weight = self.weight(data.get("weight", 1), at("weight"), where)
        context_window = self.count(
            data.get("context_window", 0), at("context_window"), where, "context_window"
        )
        rpm = self.count(
            data.get("requests_per_minute", 0), at("requests_per_minute"), where, "requests_per_minute"
        )
        tpm = self.count(
            data.get("tokens_per_minute", 0), at("tokens_per_minute"), where, "tokens_per_minute"
        )
        timeout: float | None = None
        if "timeout_seconds" in data:
            timeout = self.seconds(data["timeout_seconds"], at("timeout_seconds"), "timeout_seconds")
            if timeout <= 0:
                raise self.fail(at("timeout_seconds"), f"{where}: timeout_seconds must be positive")
        cooldown = self.seconds(
            data.get("cooldown_seconds", cooldown), at("cooldown_seconds"), "cooldown_seconds"
        )

        base_url = data.get("base_url", "")
        if not isinstance(base_url, str):
            raise self.fail(at("base_url"), f"{where}: base_url must be a string")
        if base_url:
            try:
                normalized = normalize_url(base_url)
            except InvalidEndpoint as exc:
                raise self.fail(at("base_url"), f"{where}: base_url is not usable: {exc}") from None
            if normalized.forbidden:
                raise self.fail(
                    at("base_url"), f"{where}: base_url is a link-local or cloud-metadata address"
                )
            if normalized.query:
                # A query is where a pasted key would ride along into traces; keys go in variables.
                raise self.fail(at("base_url"), f"{where}: base_url must not have a query string")
            base_url = normalized.canonical.rstrip("/")
        dialect = provider_for(provider, self.settings)
        configured = server_key(provider).base_url(self.settings).rstrip("/")

        byok = data.get("byok", "")
        if not isinstance(byok, str):
            raise self.fail(at("byok"), f"{where}: byok must be a provider name")
        variables, keys_line = self.variables(data, at, where)
        keys: tuple[Key, ...] = ()
        keyless: UpstreamTarget | None = None
        if byok:
            if variables or base_url:
                raise self.fail(
                    at("byok"),
                    f"{where}: a byok deployment takes its base URL and key from the organization's provider "
                    "(no base_url, key or keys)",
                )
            mode = "byok"
        elif variables:
            mode = "keys"
            destination = base_url or configured
            if not destination:
                raise self.fail(
                    line, f"{where}: base_url is required ({provider} has no configured base URL)"
                )
            keys = tuple(
                replace(
                    self.key(v, destination, dialect, provider, keys_line, where), unit=f"{route}/{name}#{v}"
                )
                for v in variables
            )
        elif not base_url or (configured and key_allowed_for(base_url, configured)):
            mode = "server"
        else:
            mode = "keyless"  # a keyless endpoint of the operator's (a vLLM or proxy): placeholder key
            keyless = UpstreamTarget(
                base_url, dialect.auth_headers(PLACEHOLDER_API_KEY), provider, private_ok=True
            )

        config = chat_pb2.LLMConfig(
            model=model,
            model_endpoint_type=provider,
            model_endpoint=base_url if mode != "keys" else (base_url or configured),
            context_window=context_window,
            provider_name=byok,
            provider_category=chat_pb2.PROVIDER_CATEGORY_BYOK if byok else chat_pb2.PROVIDER_CATEGORY_BASE,
        )
        return Deployment(
            route=route,
            name=name,
            provider=provider,
            model=model,
            base_url=base_url,
            mode=mode,
            keys=keys,
            byok=byok,
            weight=weight,
            context_window=context_window,
            requests_per_minute=rpm,
            tokens_per_minute=tpm,
            timeout=timeout,
            cooldown=cooldown,
            line=line or 0,
            config=config,
            keyless_target=keyless,
        )

    def variables(self, data: dict[str, Any], at: Any, where: str) -> tuple[list[str], int | None]:
        if "key" in data and "keys" in data:
            raise self.fail(at("keys"), f"{where}: give key or keys, not both")
        if "key" in data:
            values, line = [data["key"]], at("key")
        else:
            values, line = data.get("keys", []), at("keys")
        if not isinstance(values, list) or len(values) > MAX_KEYS:
            raise self.fail(line, f"{where}: keys is a list of at most {MAX_KEYS} variable names")
        names: list[str] = []
        for number, value in enumerate(values, start=1):
            # Never echo the value: an operator may have pasted a key where its variable's name goes.
            if not isinstance(value, str) or not _VARIABLE.fullmatch(value):
                raise self.fail(
                    line,
                    f"{where}: key {number} is not an environment variable name (upper-case letters, "
                    "digits, underscores); the file names the variable holding a key, never the key "
                    "(value not shown)",
                )
            if value in names:
                raise self.fail(line, f"{where}: variable {value} is listed twice")
            names.append(value)
        return names, line

    def key(
        self, variable: str, destination: str, dialect: Any, provider: str, line: int | None, where: str
    ) -> Key:
        value = self.environ.get(variable, "")
        if not value:
            raise self.fail(line, f"{where}: variable {variable} is not set or empty")
        if value in self.secret_bases:
            # A server key goes only to its own base URL, whatever variable the file names it by.
            home = getattr(self.settings, self.secret_bases[value]) if self.secret_bases[value] else ""
            if not home or not key_allowed_for(destination, home):
                raise self.fail(
                    line,
                    f"{where}: variable {variable} holds a key the server keeps for another base URL; "
                    "a server key is only sent to its own base URL",
                )
        target = UpstreamTarget(
            destination, dialect.auth_headers(value), provider, secrets=(value,), private_ok=True
        )
        return Key(variable, target)

    def weight(self, value: object, line: int | None, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(line, f"{where}: weight must be a number")
        weight = float(value)
        if not math.isfinite(weight) or weight <= 0 or weight > 1e12:
            raise self.fail(line, f"{where}: weight must be a positive number of at most 1e12")
        if weight < 1e-9:
            raise self.fail(line, f"{where}: weight must be at least 1e-9 (scale all weights of the route)")
        return weight

    def count(self, value: object, line: int | None, where: str, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**31 - 1:
            raise self.fail(line, f"{where}: {key} must be a whole number from 0 to 2147483647")
        return value

    def seconds(self, value: object, line: int | None, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(line, f"{key} must be a number of seconds")
        seconds = float(value)
        if not math.isfinite(seconds) or not 0 <= seconds <= MAX_COOLDOWN:
            raise self.fail(line, f"{key} must be between 0 and {MAX_COOLDOWN:g} seconds")
        return seconds

    def strings(self, value: object, line: int | None, key: str) -> tuple[str, ...]:
        if (
            not isinstance(value, list)
            or not all(isinstance(v, str) and v for v in value)
            or len(value) > 1000
        ):
            raise self.fail(line, f"{key} must be a list of names")
        return tuple(value)
