"""Money is integer nano-dollars (1e-9 USD) everywhere inside the gateway.

Conversions happen only at the edges: config prices and budgets come in as decimal USD,
headers and JSON go out as decimal strings. Floats never touch an amount.

Prices are held as nano-dollars per 1M tokens, so a price such as $0.0375 / 1M is still
an exact integer (37_500_000). A cost is computed once per request as a single integer
division of the exact sum, rounded up: the tenant is never charged a fraction less than
the tokens cost, and the same usage always costs the same amount.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

NANOS_PER_USD = 1_000_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000
# Lua numbers in Redis are doubles: integers are exact up to 2**53. A budget larger than
# this (about $9M per window) could not be compared exactly, so config refuses it.
MAX_EXACT_NANOS = 2**53


class MoneyError(ValueError):
    """An amount that cannot be represented exactly in nano-dollars."""


def usd_to_nanos(value: str | int | float | Decimal) -> int:
    """Convert a decimal USD amount to integer nano-dollars, refusing any loss of precision.

    Floats are converted through their shortest repr (YAML gives ``0.15``, not
    ``0.1499999…``), so what the operator typed is what is used.
    """
    if isinstance(value, bool):
        raise MoneyError("an amount must be a number, not a boolean")
    try:
        dec = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except (InvalidOperation, ValueError) as exc:
        raise MoneyError(f"{value!r} is not a decimal amount") from exc
    if not dec.is_finite():
        raise MoneyError(f"{value!r} is not a finite amount")
    nanos = dec * NANOS_PER_USD
    if nanos != nanos.to_integral_value():
        raise MoneyError(f"{value!r} has more precision than one nano-dollar (1e-9 USD)")
    return int(nanos)


def nanos_to_usd(nanos: int) -> str:
    """Format nano-dollars as an exact decimal USD string (``"0.000123450"``)."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    return f"{sign}{whole}.{frac:09d}"


def nanos_to_float_usd(nanos: int) -> float:
    """For Prometheus only, whose sample values are floats."""
    return nanos / NANOS_PER_USD


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class Price:
    """A model's price, in nano-dollars per 1M tokens."""

    input: int
    cached_input: int
    output: int

    @classmethod
    def from_usd_per_million(
        cls, input: str | float, output: str | float, cached_input: str | float | None = None
    ) -> Price:
        inp = usd_to_nanos(input)
        return cls(
            input=inp,
            cached_input=inp if cached_input is None else usd_to_nanos(cached_input),
            output=usd_to_nanos(output),
        )

    def cost(
        self, prompt_tokens: int, completion_tokens: int = 0, cached_prompt_tokens: int = 0
    ) -> int:
        """Exact cost in nano-dollars, rounded up once.

        ``prompt_tokens`` includes ``cached_prompt_tokens`` (as in OpenAI's ``usage``);
        reasoning tokens are part of ``completion_tokens`` and priced as output.
        """
        cached = min(max(cached_prompt_tokens, 0), max(prompt_tokens, 0))
        uncached = max(prompt_tokens, 0) - cached
        scaled = (
            uncached * self.input
            + cached * self.cached_input
            + max(completion_tokens, 0) * self.output
        )
        return _ceil_div(scaled, TOKENS_PER_PRICE_UNIT)

    def max_output_for(self, nanos: int, prompt_tokens: int) -> int:
        """The largest number of output tokens whose worst-case cost fits in ``nanos``."""
        if self.output <= 0:
            return 2**31
        room = nanos * TOKENS_PER_PRICE_UNIT - prompt_tokens * self.input
        return max(room // self.output, 0)
