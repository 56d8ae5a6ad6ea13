"""Admins' amounts: whatever text is typed, the parser returns a bounded amount or one InvalidRequest."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import InvalidRequest
from engine.quota import MAXIMUM, MIN_MONEY_MICROS, Quota, parse_amount

SQLITE_MAX = 2**63 - 1
# The stored scale of each unit: GPU time is kept in milliseconds, money in micro-dollars.
STORED_SCALE = {"images": 1, "seconds": 1000, "jobs": 1, "dollars": 1}

numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.floats().map(repr),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e3", "1_000", " 7 ", "+5", "$", "$.5", "0x10", "٣"]),
    st.text(max_size=12),
)


@given(unit=st.sampled_from(sorted(MAXIMUM)), text=numbers)
def test_any_text_gives_a_bounded_amount_or_one_clear_refusal(unit: str, text: str) -> None:
    try:
        value = parse_amount(unit, text, "the amount")
    except InvalidRequest as exc:
        assert exc.problem and "\n" not in exc.problem
        return
    assert 0 <= value * STORED_SCALE[unit] <= SQLITE_MAX
    limit = MAXIMUM[unit] * (1_000_000 if unit == "dollars" else 1)
    assert value <= limit
    if unit == "dollars":
        assert value == 0 or value >= MIN_MONEY_MICROS
        assert Decimal(text.strip().removeprefix("$")) * 1_000_000 == value  # exact, never rounded
    else:
        assert value == int(text.strip())


@pytest.mark.parametrize(
    ("resource", "text", "stored"),
    [("images", "5", 5), ("gpu-seconds", "600", 600_000), ("usd", "$2.50", 2_500_000), ("usd", "0.025", 25_000)],
)
def test_grants_are_stored_in_the_ledger_units(resource: str, text: str, stored: int) -> None:
    assert Quota.parse_grant(resource, text)[1] == stored
