"""The price table: US dollars per million tokens, per (provider, model), with lookup rules.

The table ships as `prices.json` next to this module (each entry names its source and the date
it was read); `LLMGW_PRICES_FILE` names a file of the same shape whose entries are added, or
replace the shipped entry of the same (provider, model).

Prices are parsed with `Decimal` and held as integer pico-dollars (1e-12 USD) per token: a
price per million tokens with at most 6 fractional digits is a whole number of pico-dollars per
token, so every cost is an exact integer sum (no float anywhere). A price with more digits, a
negative one, an absurd one (over $100,000 per million tokens) or a missing field makes the
file refused at start-up, naming the entry.

Lookup of a model name, first match wins (no general prefix matching: `o3-pro` must never get
`o3`'s price, nor `gpt-4o-mini-realtime` `gpt-4o-mini`'s):
  1. the exact name (`gpt-4o-2024-05-13` has its own, older price);
  2. Gemini's `models/` prefix dropped;
  3. a date suffix dropped: `-2024-08-06`, `-20250514`, and `-latest`;
  4. a fine-tuned OpenAI name `ft:<base>:<org>:<name>:<id>` -> the entry `ft:<base>` (base
     date-stripped as in 3), since fine-tuned models have their own prices.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

SHIPPED = Path(__file__).with_name("prices.json")
PICO_PER_DOLLAR = 10**12
# Pico-dollars per token of $1 per million tokens.
_PICO_PER_MILLION = Decimal(10**6)
_MAX_PRICE = Decimal(100_000)  # per million tokens: anything above is a typo, not a price
_DATE_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|latest)$")
_PRICE_FIELDS = ("input", "cached_input", "cache_write_5m", "cache_write_1h", "output", "reasoning")
_ENTRY_FIELDS = frozenset(
    (*_PRICE_FIELDS, "provider", "model", "source", "date", "note", "long_context_threshold", "long_context")
)


class PriceFileError(ValueError):
    """A price file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class Rates:
    """Pico-dollars per token of each kind."""

    input: int
    cached_input: int
    cache_write_5m: int
    cache_write_1h: int
    output: int
    reasoning: int


@dataclass(frozen=True, slots=True)
class Price:
    """One model's prices; `long_context` applies when the prompt has more than
    `long_context_threshold` tokens (Gemini 2.5 Pro's second tier)."""

    provider: str
    model: str
    rates: Rates
    source: str
    date: str
    long_context_threshold: int = 0
    long_context: Rates | None = None

    def rates_for(self, prompt_tokens: int) -> Rates:
        if self.long_context is not None and prompt_tokens > self.long_context_threshold:
            return self.long_context
        return self.rates


def _pico(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PriceFileError(f'{where}: a price is a decimal string such as "2.50", not {value!r}')
    try:
        price = Decimal(value)
    except InvalidOperation:
        raise PriceFileError(f"{where}: {value!r} is not a decimal number") from None
    if not price.is_finite() or price < 0 or price > _MAX_PRICE:
        raise PriceFileError(f"{where}: {value!r} is not a price between 0 and {_MAX_PRICE} per million")
    pico = price * _PICO_PER_MILLION
    if pico != pico.to_integral_value():
        raise PriceFileError(f"{where}: {value!r} has more than 6 fractional digits")
    return int(pico)


def _rates(entry: Mapping[str, Any], where: str, base: Rates | None = None) -> Rates:
    def get(name: str, default: int | None) -> int:
        if name in entry and entry[name] is not None:
            return _pico(entry[name], f"{where}.{name}")
        if default is None:
            raise PriceFileError(f"{where}: missing {name}")
        return default

    input_ = get("input", base.input if base else None)
    output = get("output", base.output if base else None)
    cache_write_5m = get("cache_write_5m", base.cache_write_5m if base else input_)
    return Rates(
        input=input_,
        # No discount stated: reads cost what input costs (charging less would under-bill).
        cached_input=get("cached_input", base.cached_input if base else input_),
        cache_write_5m=cache_write_5m,
        cache_write_1h=get("cache_write_1h", base.cache_write_1h if base else cache_write_5m),
        output=output,
        reasoning=get("reasoning", base.reasoning if base else output),
    )


def parse_entry(entry: object, where: str) -> Price:
    if not isinstance(entry, dict):
        raise PriceFileError(f"{where}: an entry is an object")
    provider, model = entry.get("provider"), entry.get("model")
    if not isinstance(provider, str) or not provider or not isinstance(model, str) or not model:
        raise PriceFileError(f"{where}: provider and model are non-empty strings")
    where = f"{where} ({provider}/{model})"
    unknown = set(entry) - _ENTRY_FIELDS
    if unknown:
        raise PriceFileError(f"{where}: unknown fields {', '.join(sorted(unknown))}")
    source, date = entry.get("source"), entry.get("date")
    if not isinstance(source, str) or not source or not isinstance(date, str) or not date:
        raise PriceFileError(f"{where}: every price names its source and date")
    rates = _rates(entry, where)
    threshold = entry.get("long_context_threshold", 0)
    long = entry.get("long_context")
    if (long is None) != (threshold == 0):
        raise PriceFileError(f"{where}: long_context and long_context_threshold go together")
    long_rates = None
    if long is not None:
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold <= 0:
            raise PriceFileError(f"{where}: long_context_threshold is a positive token count")
        if not isinstance(long, dict):
            raise PriceFileError(f"{where}: long_context is an object of prices")
        long_rates = _rates(long, f"{where}.long_context", base=rates)
    return Price(provider, model, rates, source, date, threshold, long_rates)


def _entries(document: object, where: str) -> list[Price]:
    if not isinstance(document, dict) or not isinstance(document.get("models"), list):
        raise PriceFileError(f'{where}: expected an object with a "models" list')
    return [parse_entry(entry, f"{where}: models[{i}]") for i, entry in enumerate(document["models"])]


def load_file(path: str | Path) -> list[Price]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PriceFileError(f"price file {path}: {exc.strerror or exc}") from None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise PriceFileError(f"price file {path}: not JSON ({exc})") from None
    return _entries(document, f"price file {path}")


class PriceTable:
    """Prices by (provider, model) with the lookup rules of the module docstring."""

    def __init__(self, prices: list[Price]) -> None:
        self._prices: dict[tuple[str, str], Price] = {}
        for price in prices:
            self._prices[(price.provider, price.model)] = price  # later entries win
        self._found: dict[tuple[str, str], Price | None] = {}

    @classmethod
    def load(cls, override_file: str = "") -> PriceTable:
        """The shipped table, plus (replacing same-named entries) `override_file`'s."""
        prices = load_file(SHIPPED)
        if override_file:
            prices += load_file(override_file)
        return cls(prices)

    def __len__(self) -> int:
        return len(self._prices)

    def find(self, provider: str, model: str) -> Price | None:
        key = (provider, model)
        try:
            return self._found[key]
        except KeyError:
            pass
        found = self._lookup(provider, model)
        if len(self._found) >= 4096:  # model names come from callers: bound the memo
            self._found.clear()
        self._found[key] = found
        return found

    def _lookup(self, provider: str, model: str) -> Price | None:
        prices = self._prices
        for name in _candidates(model):
            price = prices.get((provider, name))
            if price is not None:
                return price
        return None


def _candidates(model: str) -> list[str]:
    names = [model]
    if model.startswith("models/"):
        model = model.removeprefix("models/")
        names.append(model)
    undated = _DATE_SUFFIX.sub("", model)
    if undated != model:
        names.append(undated)
    if model.startswith("ft:"):
        base = model[3:].split(":", 1)[0]
        names.append("ft:" + base)
        names.append("ft:" + _DATE_SUFFIX.sub("", base))
    return names
