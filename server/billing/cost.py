"""The cost of one call from its normalized usage, exactly, in integer pico-dollars (1e-12 USD).

The normalized usage (`server.core.completion.usage_from_json`) counts, for every provider:
prompt_tokens = uncached input + cache reads (`cached_tokens`) + cache writes
(`cache_write_tokens`, of which `cache_write_1h_tokens` went to Anthropic's 1-hour cache);
completion_tokens includes `reasoning_tokens`. So each prompt token is charged once, at the
price of its kind (a cache read at the cached price and not again at the input price, a cache
write at its write price), and each completion token once (reasoning at the reasoning price,
which is the output price unless the table says otherwise).

A usage whose parts do not add up (more cached than prompt tokens, a negative count) is not
priced: a made-up cost would be worse than "unpriced".
"""

from __future__ import annotations

from decimal import Decimal

from server.billing.prices import PICO_PER_DOLLAR, Price

_DIGITS = 12  # fractional digits of a pico-dollar amount in dollars


def cost_pico(
    price: Price,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    cache_write_tokens: int = 0,
    cache_write_1h_tokens: int = 0,
    reasoning_tokens: int = 0,
) -> int | None:
    """The call's cost in pico-dollars; None when the counts are inconsistent."""
    return cost_of(
        price, prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens, cache_write_1h_tokens,
        reasoning_tokens,
    )  # fmt: skip


def cost_of(
    price: Price,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    cache_write_tokens: int,
    cache_write_1h_tokens: int,
    reasoning_tokens: int,
) -> int | None:
    """`cost_pico` with positional arguments (every answer is priced: no keyword parsing)."""
    if (
        prompt_tokens < 0
        or completion_tokens < 0
        or cached_tokens < 0
        or cache_write_1h_tokens < 0
        or reasoning_tokens < 0
        or cache_write_1h_tokens > cache_write_tokens  # also refuses cache_write_tokens < 0
    ):
        return None
    uncached = prompt_tokens - cached_tokens - cache_write_tokens
    answer = completion_tokens - reasoning_tokens
    if uncached < 0 or answer < 0:
        return None
    r = price.rates_for(prompt_tokens)
    return (
        uncached * r.input
        + cached_tokens * r.cached_input
        + (cache_write_tokens - cache_write_1h_tokens) * r.cache_write_5m
        + cache_write_1h_tokens * r.cache_write_1h
        + answer * r.output
        + reasoning_tokens * r.reasoning
    )


def dollars(pico: int) -> str:
    """Pico-dollars as an exact decimal string of dollars: 1234500000 -> "0.0012345", 0 -> "0"."""
    # Nearly every call costs less than a dollar: the general path's whole == 0, written directly
    # (every answer is priced; "%012d" costs ~1,000 instructions less than the f-string's spec).
    if 0 < pico < PICO_PER_DOLLAR:
        return ("0.%012d" % pico).rstrip("0")  # noqa: UP031
    if pico < 0:
        return "-" + dollars(-pico)
    whole, fraction = divmod(pico, PICO_PER_DOLLAR)
    if fraction:
        return f"{whole}.{fraction:012d}".rstrip("0")
    return str(whole)


def parse_dollars(text: str) -> int:
    """A decimal string of dollars ("25.50") as pico-dollars; ValueError if not exact or not a number."""
    # The form `dollars` writes (every settle parses one): digits, maybe a fraction; anything
    # else (a sign, spaces, ".5", a bad one) takes the general path below, which checks it all.
    whole, dot, fraction = text.partition(".")
    if (
        text.isascii()
        and whole.isdigit()
        and len(whole) <= 15
        and len(fraction) <= _DIGITS
        and (fraction.isdigit() or not fraction)
    ):
        return int(whole) * PICO_PER_DOLLAR + (int(fraction.ljust(_DIGITS, "0")) if fraction else 0)
    return _parse_dollars(text)


def _parse_dollars(text: str) -> int:
    value = text.strip()
    if not value.isascii():
        raise ValueError(f"{text!r} is not a decimal amount of dollars")
    sign = 1
    if value.startswith("-"):
        sign, value = -1, value[1:]
    whole, _, fraction = value.partition(".")
    if not whole.isdigit() and not (whole == "" and fraction):
        raise ValueError(f"{text!r} is not a decimal amount of dollars")
    if fraction and not fraction.isdigit():
        raise ValueError(f"{text!r} is not a decimal amount of dollars")
    if len(fraction) > _DIGITS:
        raise ValueError(f"{text!r} has more than {_DIGITS} fractional digits")
    if len(whole) > 15:  # a trillion dollars and more: not an amount anyone bills
        raise ValueError(f"{text!r} is too large")
    return sign * (int(whole or "0") * PICO_PER_DOLLAR + int(fraction.ljust(_DIGITS, "0") or "0"))


def dollars_of_decimal(value: Decimal) -> str:
    """A stored exact Decimal of dollars (PostgreSQL numeric) in the canonical form of `dollars`."""
    return dollars(int(value.scaleb(_DIGITS).to_integral_value()))
