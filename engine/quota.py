"""Limits and budgets: which limits apply to a requester, what a job reserves, and how reservations end.

The money rules (DESIGN.md): integer micro-dollars; reserve -> settle | void; spend = posted + pending; a
reservation that would cross any limit fails inside the same transaction (the store checks `LimitCheck`s under
`BEGIN IMMEDIATE`); periods reset by the calendar in the configured time zone, so no cron is needed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from engine.config import Settings, TierSettings, dollars
from engine.errors import InvalidRequest
from engine.ledger import Close, LimitCheck, OpenReservation, Periods, Reservation, Scope, UsageKey, periods_at
from engine.models import (
    MICROS_PER_DOLLAR,
    AuditEntry,
    BackendKind,
    BudgetRoom,
    Failed,
    Finished,
    Platform,
    Requester,
    Resource,
    RouteDecision,
    UserRecord,
)
from engine.store import Store

# The per-user limits an admin can override, with the unit each is set in.
OVERRIDABLE = {
    "images_per_day": "images",
    "gpu_seconds_per_day": "seconds",
    "api_usd_per_month": "dollars",
    "concurrent_jobs": "jobs",
}

# The most an admin may set or grant at once, per unit: far beyond any community's use, and far below SQLite's
# signed 64-bit integers once stored (GPU time as milliseconds, money as micro-dollars), so no typo can overflow.
MAXIMUM = {
    "images": 1_000_000,  # images per day
    "seconds": 8_640_000,  # GPU-seconds per day: 100 GPUs busy around the clock
    "dollars": 100_000,  # dollars per month (a limit) or at once (a grant)
    "jobs": 1_000,  # jobs at once
}
MIN_MONEY_MICROS = 10_000  # $0.01, one BFL credit: the smallest non-zero amount of money an admin can give
_WHOLE = re.compile(r"([0-9]+)")  # ASCII digits only: no signs, exponents, underscores, NaN or infinities
_MONEY = re.compile(r"\$?([0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_GRANTS = {
    "images": (Resource.IMAGES, "images"),
    "gpu-seconds": (Resource.GPU_MS, "seconds"),
    "gpu_seconds": (Resource.GPU_MS, "seconds"),
    "seconds": (Resource.GPU_MS, "seconds"),
    "usd": (Resource.USD_MICROS, "dollars"),
    "dollars": (Resource.USD_MICROS, "dollars"),
    "$": (Resource.USD_MICROS, "dollars"),
}
_UNIT_OF = {Resource.IMAGES: "images", Resource.GPU_MS: "seconds", Resource.USD_MICROS: "dollars"}


@dataclass(frozen=True, slots=True)
class Limits:
    """One user's effective limits (None = unlimited), after tier and admin overrides."""

    tier: str
    images_per_day: int | None
    gpu_ms_per_day: int | None
    api_micros_per_month: int | None
    concurrent_jobs: int | None


@dataclass(frozen=True, slots=True)
class UsageLine:
    name: str
    resource: Resource
    used: int
    limit: int | None
    resets_at: datetime

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)


@dataclass(frozen=True, slots=True)
class QuotaView:
    user_key: str
    limits: Limits
    lines: tuple[UsageLine, ...]
    banned: bool
    seen: bool | None = None  # for admins: has this user ever used the bot (None: not asked, the user's own view)


@dataclass(frozen=True, slots=True)
class Standing:
    """A requester's stored user, limits and what each limit has used, read at one moment (one read).

    For a submit's pre-check and the router's budget rule only: the reserving transaction checks every limit again.
    """

    record: UserRecord | None
    limits: Limits
    periods: Periods
    checks: tuple[LimitCheck, ...]
    used: Mapping[UsageKey, int]  # at least every check's (scope, resource, period)

    def used_by(self, check: LimitCheck) -> int:
        return self.used[(check.scope, check.resource, check.period_key)]

    def ensure_room(self, resource: Resource, amount: int) -> None:
        """QuotaExceeded, with the limit and its reset time, when `amount` would not fit."""
        if amount == 0:
            return
        for check in self.checks:
            if check.resource is resource and (refusal := check.refusal(self.used_by(check), amount)) is not None:
                raise refusal

    def room(self) -> BudgetRoom:
        """The smallest room left across every limit, per resource, for the router's budget rule."""
        room: dict[Resource, int | None] = dict.fromkeys(Resource)
        api_budget: str | None = None
        for check in self.checks:
            left = max(0, check.limit - self.used_by(check))
            current = room[check.resource]
            if current is None or left < current:
                room[check.resource] = left
                if check.resource is Resource.USD_MICROS:
                    api_budget = None if check.scope.kind == "user" else check.name
        return BudgetRoom(
            api_micros=room[Resource.USD_MICROS],
            gpu_ms=room[Resource.GPU_MS],
            images=room[Resource.IMAGES],
            api_budget=api_budget,
        )


class Quota:
    def __init__(self, store: Store, settings: Settings, clock: Callable[[], float]) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock

    # ---- what applies ----

    def periods(self, now: float | None = None) -> Periods:
        return periods_at(self._clock() if now is None else now, self._settings.bot.zone)

    def tier_for(self, requester: Requester) -> tuple[str, TierSettings]:
        """The first tier (in config order) one of whose roles the requester has, else the default tier."""
        roles = set(requester.roles)
        for name, tier in self._settings.tiers.items():
            if name != "default" and roles.intersection(tier.roles):
                return name, tier
        return "default", self._settings.tiers["default"]

    async def limits_for(self, requester: Requester) -> Limits:
        return self.limits_from(requester, await self._store.get_user(requester.user_key))

    def limits_from(self, requester: Requester, record: UserRecord | None) -> Limits:
        """The limits for the requester's tier with the admin's overrides in `record` (their stored user)."""
        tier_name, tier = self.tier_for(requester)
        overrides: dict[str, Any] = record.overrides if record else {}

        def pick(field: str, tier_value: Any) -> Any:
            return overrides.get(field, tier_value)

        gpu_seconds = pick("gpu_seconds_per_day", tier.gpu_seconds_per_day)
        api_micros = (
            overrides["api_usd_per_month"] if "api_usd_per_month" in overrides else dollars(tier.api_usd_per_month)
        )
        return Limits(
            tier=tier_name + (" (with admin overrides)" if overrides else ""),
            images_per_day=pick("images_per_day", tier.images_per_day),
            gpu_ms_per_day=None if gpu_seconds is None else int(gpu_seconds) * 1000,
            api_micros_per_month=api_micros,
            concurrent_jobs=pick("concurrent_jobs", tier.concurrent_jobs),
        )

    def checks(self, requester: Requester, limits: Limits, periods: Periods) -> list[LimitCheck]:
        user = Scope.user(requester.user_key)
        wanted: list[tuple[str, Scope, Resource, int | None]] = [
            ("your images per day", user, Resource.IMAGES, limits.images_per_day),
            ("your GPU time per day", user, Resource.GPU_MS, limits.gpu_ms_per_day),
            ("your API budget this month", user, Resource.USD_MICROS, limits.api_micros_per_month),
            *self._shared_budgets(requester),
        ]
        return [
            LimitCheck(name, scope, resource, periods.key(resource), limit, periods.resets_at(resource).timestamp())
            for name, scope, resource, limit in wanted
            if limit is not None
        ]

    def _shared_budgets(self, requester: Requester) -> list[tuple[str, Scope, Resource, int | None]]:
        """The API budgets shared with others: the whole bot's and the requester's server's (None = unlimited)."""
        limits = self._settings.limits
        shared: list[tuple[str, Scope, Resource, int | None]] = [
            ("the whole bot's API budget this month (shared by everyone)", Scope.everyone(), Resource.USD_MICROS,
             dollars(limits.global_api_usd_per_month)),
        ]  # fmt: skip
        if requester.guild_key:
            place = "workspace" if requester.platform is Platform.SLACK else "server"
            shared.append(
                (
                    f"this {place}'s API budget this month (shared by its members)",
                    Scope.guild(requester.guild_key),
                    Resource.USD_MICROS,
                    dollars(limits.guild_api_usd_per_month),
                )
            )
        return shared

    async def standing(self, requester: Requester) -> Standing:
        """The requester's stored user, limits and the use of each limit, in one read."""
        periods = self.periods()
        # The user's limits depend on their stored overrides, which this same read fetches: so read their own use
        # of every resource, and the use of every shared budget that is set.
        user = Scope.user(requester.user_key)
        keys: list[UsageKey] = [(user, resource, periods.key(resource)) for resource in Resource]
        keys += [
            (scope, resource, periods.key(resource))
            for _, scope, resource, limit in self._shared_budgets(requester)
            if limit is not None
        ]
        record, used = await self._store.user_and_usages(requester.user_key, keys)
        limits = self.limits_from(requester, record)
        checks = tuple(self.checks(requester, limits, periods))
        return Standing(record, limits, periods, checks, dict(zip(keys, used, strict=True)))

    async def room(self, requester: Requester) -> BudgetRoom:
        """The smallest room left across every limit, per resource, for the router's budget rule."""
        return (await self.standing(requester)).room()

    # ---- what a job reserves and how it ends ----

    def reservations(self, decision: RouteDecision, periods: Periods, *, with_image: bool) -> list[Reservation]:
        """The image is reserved once per job; the route-specific cost once per route taken."""
        out: list[Reservation] = []
        if with_image:
            out.append(Reservation(Resource.IMAGES, 1, decision.backend, periods.day, periods.month))
        if decision.backend is BackendKind.API:
            out.append(
                Reservation(
                    Resource.USD_MICROS,
                    decision.estimated_cost_micros,
                    decision.backend,
                    periods.day,
                    periods.month,
                )
            )
        else:
            out.append(
                Reservation(Resource.GPU_MS, decision.estimated_gpu_ms, decision.backend, periods.day, periods.month)
            )
        return out

    @staticmethod
    def closes_for_success(open_: list[OpenReservation], finished: Finished) -> list[Close]:
        actual = {
            Resource.IMAGES: 1,
            Resource.GPU_MS: finished.gpu_ms,
            Resource.USD_MICROS: finished.cost_micros,
        }
        return [Close(r.id, actual[r.resource], "done") for r in open_]

    @staticmethod
    def closes_for_attempt(open_: list[OpenReservation], failed: Failed | None, *, keep_image: bool) -> list[Close]:
        """End one route's reservations after a failed or interrupted attempt.

        What the provider bills (a timed-out BFL task) is posted with its reason; our own failures and queue time
        are never charged, so GPU time is voided.
        """
        closes: list[Close] = []
        reason = f"failed: {failed.reason.value}" if failed else "interrupted"
        for r in open_:
            if r.resource is Resource.IMAGES:
                if not keep_image:
                    closes.append(Close(r.id, None, reason))
            elif r.resource is Resource.USD_MICROS and failed is not None and failed.charged_micros > 0:
                closes.append(Close(r.id, failed.charged_micros, f"billed by the provider: {failed.reason.value}"))
            else:
                closes.append(Close(r.id, None, reason))
        return closes

    @staticmethod
    def closes_for_cancel(open_: list[OpenReservation], billed_micros: int) -> list[Close]:
        closes = []
        for r in open_:
            if r.resource is Resource.USD_MICROS and billed_micros > 0:
                closes.append(Close(r.id, billed_micros, "cancelled after the API accepted the task"))
            else:
                closes.append(Close(r.id, None, "cancelled"))
        return closes

    # ---- views and admin operations ----

    async def view(self, requester: Requester) -> QuotaView:
        record = await self._store.get_user(requester.user_key)
        limits = self.limits_from(requester, record)
        periods = self.periods()
        user = Scope.user(requester.user_key)
        shown = (
            ("images today", Resource.IMAGES, limits.images_per_day),
            ("GPU time today", Resource.GPU_MS, limits.gpu_ms_per_day),
            ("API spend this month", Resource.USD_MICROS, limits.api_micros_per_month),
        )
        used = await self._store.usages([(user, resource, periods.key(resource)) for _, resource, _ in shown])
        lines = tuple(
            UsageLine(name, resource, so_far, limit, periods.resets_at(resource))
            for (name, resource, limit), so_far in zip(shown, used, strict=True)
        )
        return QuotaView(requester.user_key, limits, lines, bool(record and record.banned))

    async def seen(self, user_key: str) -> bool:
        """Has this user ever used the bot (a job, or settings of their own)? An admin's typo names nobody."""
        record = await self._store.get_user(user_key)
        if record is not None and record.settings:
            return True
        return bool(await self._store.jobs(user_key=user_key, limit=1))

    async def set_limit(self, user_key: str, field: str, value: str, actor: str) -> None:
        """An admin override of one limit; value 'none' removes the limit, 'tier' returns to the tier's value."""
        if field not in OVERRIDABLE:
            raise InvalidRequest(f"unknown limit {field!r}; use one of: {', '.join(OVERRIDABLE)}", field="limit")
        record = await self._store.get_user(user_key)
        overrides = dict(record.overrides) if record else {}
        if value.lower() == "tier":
            overrides.pop(field, None)
        else:
            overrides[field] = _parse_limit(field, value)
        await self._store.update_user(
            user_key,
            overrides=overrides,
            audit=AuditEntry(actor, "quota.set", user_key, detail={"field": field, "value": value}),
        )

    @staticmethod
    def parse_grant(resource: str, text: str) -> tuple[Resource, int]:
        """`images 5`, `gpu-seconds 600`, `usd 2.50` -> the resource and its stored amount, or InvalidRequest."""
        if resource.lower() not in _GRANTS:
            raise InvalidRequest(f"grant images, gpu-seconds or usd, not {resource!r}", field="resource")
        kind, unit = _GRANTS[resource.lower()]
        amount = parse_amount(unit, text, "a grant")
        if amount == 0:
            least = "$0.01" if unit == "dollars" else f"1 {'GPU-second' if unit == 'seconds' else 'image'}"
            raise InvalidRequest(f"a grant must be at least {least}", field="amount")
        return kind, amount * 1000 if kind is Resource.GPU_MS else amount

    async def grant(self, user_key: str, resource: Resource, amount: int, actor: str) -> None:
        """Extra allowance for this period only (images or GPU ms today, micro-dollars this month)."""
        unit = _UNIT_OF[resource]
        largest = MAXIMUM[unit] * {"seconds": 1000, "dollars": MICROS_PER_DOLLAR}.get(unit, 1)
        if not 0 < amount <= largest:
            raise InvalidRequest(f"a grant must be from 1 to {largest} {resource.value}", field="amount")
        periods = self.periods()
        await self._store.grant(
            user_key,
            resource,
            amount,
            periods.day,
            periods.month,
            f"granted by {actor}",
            AuditEntry(actor, "quota.grant", user_key, detail={"resource": resource.value, "amount": amount}),
        )

    async def reset(self, user_key: str, actor: str) -> None:
        """Start the user's current periods afresh: a grant equal to what they have used so far."""
        periods = self.periods()
        user = Scope.user(user_key)
        used_by_resource = await self._store.usages([(user, resource, periods.key(resource)) for resource in Resource])
        for resource, used in zip(Resource, used_by_resource, strict=True):
            if used > 0:
                await self._store.grant(
                    user_key,
                    resource,
                    used,
                    periods.day,
                    periods.month,
                    f"reset by {actor}",
                    AuditEntry(actor, "quota.reset", user_key, detail={"resource": resource.value, "amount": used}),
                )


def _parse_limit(field: str, value: str) -> int | None:
    """Overrides are stored in the unit the limit is named in, except dollars, which become micro-dollars."""
    if value.lower() in ("none", "unlimited"):
        return None
    parsed = parse_amount(OVERRIDABLE[field], value, field)
    if field == "concurrent_jobs" and parsed == 0:
        raise InvalidRequest("concurrent_jobs must be at least 1 (ban the user to stop them)", field=field)
    return parsed


def parse_amount(unit: str, text: str, what: str) -> int:
    """An admin's amount in `unit` (images, seconds, jobs: whole numbers; dollars: to the micro-dollar, returned as
    micro-dollars), from 0 to MAXIMUM[unit]; anything else (NaN, infinities, signs, exponents, overflow, a non-zero
    amount of money under $0.01) is one InvalidRequest naming the problem."""
    raw = text.strip()
    pattern = _MONEY if unit == "dollars" else _WHOLE
    if raw.startswith("-") and pattern.fullmatch(raw[1:]):
        raise InvalidRequest(f"{what} cannot be negative (got {text})", field="amount")
    match = pattern.fullmatch(raw)
    if match is None:
        kind = "an amount of dollars, such as 2 or 0.50" if unit == "dollars" else f"a whole number of {unit}"
        raise InvalidRequest(f"{what} must be {kind}, not {text!r}", field="amount")
    # Decimal reads any length exactly (int() refuses past 4,300 digits), so a long typo is simply too much.
    value = Decimal(match.group(1))
    if value > MAXIMUM[unit]:
        shown = f"${value}" if unit == "dollars" else f"{value} {unit}"
        raise InvalidRequest(f"{what}: {shown} is more than the maximum of {_maximum(unit)}", field="amount")
    if unit != "dollars":
        return int(value)
    micros = value * MICROS_PER_DOLLAR
    if micros != micros.to_integral_value():
        raise InvalidRequest(f"{what}: ${value} is finer than a micro-dollar ($0.000001)", field="amount")
    if 0 < micros < MIN_MONEY_MICROS:
        raise InvalidRequest(f"{what}: ${value} is less than $0.01, the smallest amount of money", field="amount")
    return int(micros)


def _maximum(unit: str) -> str:
    return f"${MAXIMUM[unit]:,}" if unit == "dollars" else f"{MAXIMUM[unit]:,} {unit}"
