"""Cost arithmetic: integer nano-dollars, exact, rounded up once."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.money import MoneyError, Price, nanos_to_usd, usd_to_nanos


def test_usd_to_nanos_is_exact() -> None:
    assert usd_to_nanos("0.15") == 150_000_000
    assert usd_to_nanos(0.15) == 150_000_000  # YAML floats go through their repr
    assert usd_to_nanos(Decimal("0.0375")) == 37_500_000
    assert usd_to_nanos(5) == 5_000_000_000
    with pytest.raises(MoneyError):
        usd_to_nanos("0.0000000001")  # below one nano-dollar
    with pytest.raises(MoneyError):
        usd_to_nanos("abc")
    with pytest.raises(MoneyError):
        usd_to_nanos(True)


def test_nanos_to_usd() -> None:
    assert nanos_to_usd(0) == "0.000000000"
    assert nanos_to_usd(1) == "0.000000001"
    assert nanos_to_usd(1_500_000_000) == "1.500000000"
    assert nanos_to_usd(-26_700) == "-0.000026700"


def test_prompt_cached_reasoning_completion() -> None:
    # gpt-4o-like: $2.50 input, $1.25 cached input, $10 output per 1M tokens
    p = Price.from_usd_per_million("2.50", "10.00", "1.25")
    # 1000 prompt tokens of which 400 cached, 300 completion tokens of which 100 reasoning:
    # reasoning is part of completion and priced as output.
    cost = p.cost(prompt_tokens=1000, completion_tokens=300, cached_prompt_tokens=400)
    expected = Decimal(600) * Decimal("2.50") + Decimal(400) * Decimal("1.25") + Decimal(300) * 10
    assert cost == int(expected * 1000)  # USD/1M tokens -> nanos per token = x1000
    assert cost == 5_000_000  # $0.005
    # embeddings are priced on input only
    e = Price.from_usd_per_million("0.02", "0")
    assert e.cost(prompt_tokens=12345) == 246_900


def test_rounding_up_once() -> None:
    p = Price.from_usd_per_million("0.0375", "0.15")  # 37.5 nanos per input token
    assert p.cost(prompt_tokens=1) == 38  # 37.5 rounds up
    assert p.cost(prompt_tokens=2) == 75  # not 38 + 38
    assert p.cost(prompt_tokens=0, completion_tokens=0) == 0


def test_cached_tokens_are_clamped_to_prompt() -> None:
    p = Price.from_usd_per_million("1", "2", "0.5")
    assert p.cost(prompt_tokens=10, cached_prompt_tokens=50) == p.cost(10, 0, 10)


@given(
    st.integers(0, 10**7),
    st.integers(0, 10**6),
    st.integers(0, 100_000),
    st.integers(0, 100_000),
    st.integers(0, 100_000),
)
def test_cost_matches_exact_decimal(
    prompt: int, completion: int, p_in: int, p_out: int, p_cached: int
) -> None:
    price = Price(input=p_in * 1000, cached_input=p_cached * 1000, output=p_out * 1000)
    cached = prompt // 3
    exact = (
        Decimal(prompt - cached) * price.input
        + Decimal(cached) * price.cached_input
        + Decimal(completion) * price.output
    ) / 1_000_000
    cost = price.cost(prompt, completion, cached)
    assert cost == int(exact.to_integral_value(rounding="ROUND_CEILING"))


@given(st.integers(0, 10**12), st.integers(0, 10**6))
def test_max_output_for_is_the_largest_that_fits(budget: int, prompt: int) -> None:
    price = Price.from_usd_per_million("2.5", "10")
    n = price.max_output_for(budget, prompt)
    if n > 0:
        assert price.cost(prompt, n) <= budget
    assert price.cost(prompt, n + 1) > budget or price.cost(prompt, 0) > budget
