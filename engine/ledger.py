"""The money vocabulary: whose use a limit counts, what a job reserves and how it closes, and the calendar periods.

Amounts are integers in each resource's unit (images, GPU milliseconds, micro-dollars). The ledger is append-only:
a `reserve` line is pending until one `settle` (posted, at the actual amount) or `void` line closes it; `grant`
lines are an admin's extra allowance for one user. The store keeps a running total per (scope, resource, period)
in the same transaction as each line, so a limit check reads one row however long the month has been.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from enum import StrEnum

from engine.errors import QuotaExceeded
from engine.models import BackendKind, Period, Resource


class ScopeKind(StrEnum):
    USER = "user"
    GUILD = "guild"  # a Discord server or a Slack workspace
    GLOBAL = "global"  # the whole bot


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose usage a limit counts: one user, one guild/workspace, or everyone (key None)."""

    kind: ScopeKind
    key: str | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ScopeKind(self.kind))

    @classmethod
    def user(cls, user_key: str) -> Scope:
        return cls(ScopeKind.USER, user_key)

    @classmethod
    def guild(cls, guild_key: str) -> Scope:
        return cls(ScopeKind.GUILD, guild_key)

    @classmethod
    def everyone(cls) -> Scope:
        return cls(ScopeKind.GLOBAL, None)


def scopes_of(user_key: str, guild_key: str | None) -> list[Scope]:
    """Every scope one ledger line of this user counts in: theirs, their guild's (if any), everyone's."""
    return [Scope.user(user_key), *([Scope.guild(guild_key)] if guild_key else []), Scope.everyone()]


# Whose use, of what, in which period ("2026-11-26" or "2026-11", matching the resource's period).
UsageKey = tuple[Scope, Resource, str]


@dataclass(frozen=True, slots=True)
class Periods:
    """Today's and this month's keys in the configured zone, and when each ends."""

    day: str
    month: str
    day_resets_at: datetime
    month_resets_at: datetime

    def key(self, resource: Resource) -> str:
        return period_key(resource, self.day, self.month)

    def resets_at(self, resource: Resource) -> datetime:
        return self.month_resets_at if resource.period is Period.MONTH else self.day_resets_at


def periods_at(now: float, zone: tzinfo) -> Periods:
    """The day and month that `now` falls in, in `zone`, with the moments they end."""
    local = datetime.fromtimestamp(now, zone)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    next_day = (midnight + timedelta(days=1, hours=2)).replace(hour=0)  # DST-safe: land inside the next day
    first = midnight.replace(day=1)
    next_month = (first + timedelta(days=32)).replace(day=1)
    return Periods(local.strftime("%Y-%m-%d"), local.strftime("%Y-%m"), next_day, next_month)


def period_key(resource: Resource, day: str, month: str) -> str:
    """Which of a ledger line's two period keys its resource's limits count in."""
    return month if resource.period is Period.MONTH else day


@dataclass(frozen=True, slots=True)
class LimitCheck:
    """One limit that a reservation must stay within, checked inside the reserving transaction."""

    name: str  # user-facing name: "images per day", "API budget this month", ...
    scope: Scope
    resource: Resource
    period_key: str  # "2026-11-26" or "2026-11", matching resource.period
    limit: int
    resets_at: float | None

    def refusal(self, used: int, amount: int) -> QuotaExceeded | None:
        """The refusal when `amount` more on top of `used` would cross this limit, else None."""
        if used + amount <= self.limit:
            return None
        return QuotaExceeded(
            self.name,
            unit=self.resource.value,
            limit_value=self.limit,
            remaining=max(0, self.limit - used),
            resets_at=None if self.resets_at is None else datetime.fromtimestamp(self.resets_at, UTC),
            scope=self.scope.kind.value,
        )


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one route of a job holds until it ends, counted in its day and month."""

    resource: Resource
    amount: int
    backend: BackendKind | None
    day: str
    month: str


@dataclass(frozen=True, slots=True)
class OpenReservation:
    """A reservation not yet settled or voided (its ledger line id)."""

    id: int
    resource: Resource
    amount: int
    backend: BackendKind | None


@dataclass(frozen=True, slots=True)
class Close:
    """How one open reservation ends: settled at `amount` or voided (amount None)."""

    reservation_id: int
    amount: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Totals:
    """One (scope, resource, period)'s running total: `posted + pending - granted` is what its limits count."""

    posted: int = 0
    pending: int = 0
    granted: int = 0

    @property
    def used(self) -> int:
        return self.posted + self.pending - self.granted


@dataclass(frozen=True, slots=True)
class TotalsDifference:
    """A running total that does not match what the ledger's lines add up to (found by Store.verify_totals)."""

    scope: Scope
    resource: Resource
    period: str
    stored: Totals
    from_ledger: Totals

    def __str__(self) -> str:
        who = self.scope.kind.value + (f" {self.scope.key}" if self.scope.key else "")
        return f"{who}, {self.resource.value}, {self.period}: stored {self.stored}, the ledger says {self.from_ledger}"
