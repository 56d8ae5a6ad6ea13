"""The admin report from a database seeded through the real engine: exact numbers per day, the text, the PNG."""

from __future__ import annotations

import io
import math
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from PIL import Image

from engine.models import BackendKind, FailureReason, JobCancelled
from engine.report import NO_DATA, Report, build_report, draw, p95, render_png, summary_text
from tests.conftest import SettingsFactory, user, wait_terminal
from tests.engine.clocked import ClockedJobs, Outcome

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.fixture
async def jobs() -> AsyncIterator[ClockedJobs]:
    harness = ClockedJobs()
    yield harness
    await harness.close()


def at(day: str, hour: int, minute: int = 0) -> datetime:
    return datetime.fromisoformat(day).replace(hour=hour, minute=minute, tzinfo=UTC)


def only(days: int, values: dict[int, int | float]) -> tuple[int | float | None, ...]:
    return tuple(values.get(i, 0) for i in range(days))


async def test_report_numbers_per_day(jobs: ClockedJobs, make_settings: SettingsFactory) -> None:
    settings = make_settings(limits={"global_api_usd_per_month": "1.00"}, tiers={"default": {}})
    engine = await jobs.open(settings)
    # The day before the window: counted nowhere (and in October, so not in this month's spend either).
    await jobs.run(engine, at("2026-10-27", 20), "pro", Outcome(10, cost_micros=40_000))
    # Day 0: an API image and an API timeout the provider still bills.
    await jobs.run(engine, at("2026-10-28", 10), "pro", Outcome(12, cost_micros=40_000))
    await jobs.run(engine, at("2026-10-28", 11), "ultra", Outcome(300, FailureReason.TIMEOUT, charged_micros=60_000))
    # Day 4: 20 local images taking 1..20 s, 5 failures, 1 cancellation (which is not a failure).
    for seconds in range(1, 21):
        await jobs.run(engine, at("2026-11-01", 9, seconds), "schnell", Outcome(seconds))
    for n in range(5):
        await jobs.run(engine, at("2026-11-01", 15, n), "schnell", Outcome(2, FailureReason.BAD_REQUEST))
    local = jobs.backends[BackendKind.LOCAL]
    local.started_event.clear()
    hung = await jobs.submit(engine, at("2026-11-01", 16), "schnell", Outcome(1, hang=True))
    await local.started_event.wait()  # running on the backend: the cancel stops it there
    await engine.cancel(user(), hung)
    assert isinstance(await wait_terminal(engine, hung), JobCancelled)
    # Day 29 (today): a local job submitted late yesterday that ended after midnight counts today, by its end.
    await jobs.run(engine, at("2026-11-25", 23, 30), "schnell", Outcome(3600))
    await jobs.run(engine, at("2026-11-26", 11), "pro", Outcome(20, cost_micros=40_000))

    jobs.clock.now = NOW.timestamp()
    report = await build_report(engine._store, settings, engine._quota.periods())

    assert report.days == tuple(date(2026, 10, 28) + timedelta(days=n) for n in range(30))
    assert (report.timezone, report.month) == ("UTC", "2026-11")
    assert report.spend_micros == {BackendKind.LOCAL: only(30, {}), BackendKind.API: only(30, {0: 100_000, 29: 40_000})}
    assert report.images == {BackendKind.LOCAL: only(30, {4: 20, 29: 1}), BackendKind.API: only(30, {0: 1, 29: 1})}
    assert report.failed == only(30, {0: 1, 4: 5})
    assert report.ended == only(30, {0: 2, 4: 25, 29: 2})
    assert report.cancelled == only(30, {4: 1})
    assert report.p95_s == tuple({0: 12.0, 4: 19.0, 29: 3600.0}.get(i) for i in range(30))
    assert report.period_p95_s == 20.0  # 23 latencies: 1..20, 12, 20, 3600; the 22nd smallest
    assert (report.month_spend_micros, report.cap_micros) == (40_000, 1_000_000)
    assert report.failure_rate_pct[0] == 50.0 and report.failure_rate_pct[4] == 20.0
    assert report.failure_rate_pct[1] is None
    assert report.busiest_day == (date(2026, 11, 1), 20)

    assert summary_text(report).splitlines() == [
        "flux-bot, last 30 days: 2026-10-28 to 2026-11-26 (UTC)",
        "API spend in 2026-11: $0.04 of the $1.00 monthly cap (4%).",
        "Images: 23 (local GPU 21, BFL API 2); API spend over the period: $0.14.",
        "Failures: 6 of 29 jobs (20.7%); p95 submit-to-image time: 20 s.",
        "Busiest day: 2026-11-01 (Sun) with 20 images.",
    ]
    png = render_png(report)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (1200, 800)
        assert image.text["Software"] == "flux-bot"


async def test_days_are_calendar_days_of_the_configured_zone(jobs: ClockedJobs, make_settings: SettingsFactory) -> None:
    settings = make_settings(bot={"timezone": "Europe/Berlin"}, tiers={"default": {}})
    engine = await jobs.open(settings)
    # 23:20 UTC on the 25th is 00:20 on the 26th in Berlin: the money, the image and the day all belong to the 26th.
    await jobs.run(engine, at("2026-11-25", 23, 20), "pro", Outcome(600, cost_micros=40_000))
    report = await build_report(engine._store, settings, engine._quota.periods())
    assert report.last_day == date(2026, 11, 26) and report.timezone == "Europe/Berlin"
    assert report.spend_micros[BackendKind.API][-1] == 40_000 and report.images[BackendKind.API][-1] == 1
    assert datetime.fromtimestamp(jobs.clock.now, ZoneInfo("Europe/Berlin")).date() == date(2026, 11, 26)


async def test_an_empty_database_still_gives_a_report(jobs: ClockedJobs, make_settings: SettingsFactory) -> None:
    settings = make_settings()
    engine = await jobs.open(settings)
    jobs.clock.now = NOW.timestamp()
    report = await build_report(engine._store, settings, engine._quota.periods())
    assert report.total_images() == 0 and report.busiest_day is None and report.period_p95_s is None
    text = summary_text(report)
    assert "no monthly cap is set" in text and "Failures: 0 of 0 jobs (no jobs ended)" in text
    assert "Busiest day" not in text
    with Image.open(io.BytesIO(render_png(report))) as image:
        assert image.size == (1200, 800)


def test_p95_is_nearest_rank() -> None:
    assert p95([]) is None
    assert p95([7.0]) == 7.0
    assert p95([float(n) for n in range(1, 101)]) == 95.0
    assert p95([3.0, 1.0, 2.0]) == 3.0


def test_the_report_type_keeps_its_series_aligned() -> None:
    days = (date(2026, 11, 1), date(2026, 11, 2))
    report = Report(
        days=days,
        timezone="UTC",
        month="2026-11",
        spend_micros={BackendKind.LOCAL: (0, 0), BackendKind.API: (10, 30)},
        month_to_date_micros=(10, 40),
        images={BackendKind.LOCAL: (2, 0), BackendKind.API: (1, 3)},
        failed=(1, 0),
        ended=(4, 3),
        cancelled=(0, 0),
        worst_hour_pct=(None, None),
        p95_s=(1.0, 2.0),
        period_p95_s=2.0,
        month_spend_micros=40,
        cap_micros=None,
        spend_alert_percents=(50, 80, 100),
        failure_alert_rate=0.2,
        failure_alert_min_jobs=10,
    )
    assert report.images_per_day == (3, 3) and report.busiest_day == (date(2026, 11, 2), 3)  # the later of a tie
    assert report.total_spend() == 40 and report.total_spend(BackendKind.LOCAL) == 0
    assert report.failure_rate_pct == (25.0, 0.0)


def drawn(report: Report) -> dict[str, dict[str, object]]:
    """What each panel shows, by its title's first words: its texts and its labelled lines' y values."""
    panels: dict[str, dict[str, object]] = {}
    figure = draw(report)
    main_axes = [ax for ax in figure.axes if ax.get_title()]
    for ax in main_axes:
        twins = [other for other in figure.axes if not other.get_title() and other.bbox.bounds == ax.bbox.bounds]
        lines = {
            str(line.get_label()): [float(y) for y in line.get_ydata()]  # type: ignore[union-attr]
            for axis in (ax, *twins)
            for line in axis.get_lines()
            if not str(line.get_label()).startswith("_")
        }
        panels[ax.get_title().split(" ")[0]] = {"texts": [t.get_text() for t in ax.texts], "lines": lines}
    return panels


async def test_empty_panels_say_no_data_yet(jobs: ClockedJobs, make_settings: SettingsFactory) -> None:
    engine = await jobs.open(make_settings())
    jobs.clock.now = NOW.timestamp()
    panels = drawn(await build_report(engine._store, engine.settings, engine._quota.periods()))
    assert sorted(panels) == ["API", "End-to-end", "Failure", "Images"]
    assert all(panel["texts"] == [NO_DATA] for panel in panels.values()), panels
    # Local images only: the spend panel is still empty, the others are not.
    await jobs.run(engine, at("2026-11-26", 11), "schnell", Outcome(4))
    panels = drawn(await build_report(engine._store, engine.settings, engine._quota.periods()))
    assert {name: panel["texts"] for name, panel in panels.items()} == {
        "API": [NO_DATA],
        "Images": [],
        "Failure": [],
        "End-to-end": [],
    }


async def test_the_cap_and_the_alert_thresholds_are_drawn_in_the_panels_units(
    jobs: ClockedJobs, make_settings: SettingsFactory
) -> None:
    settings = make_settings(limits={"global_api_usd_per_month": "1.00"}, tiers={"default": {}})
    engine = await jobs.open(settings)
    # October's money counts towards October's month-to-date, November starts again from zero.
    await jobs.run(engine, at("2026-10-20", 10), "pro", Outcome(10, cost_micros=300_000))  # before the window
    await jobs.run(engine, at("2026-10-30", 10), "pro", Outcome(10, cost_micros=200_000))
    await jobs.run(engine, at("2026-11-02", 10), "pro", Outcome(10, cost_micros=40_000))
    # 25 Nov: 10 images at night; then 8 images and 4 failures within one hour. The day's rate is 4 of 22; the
    # alert, at each failure, saw the hour before it: 2 of 10, 3 of 11, 4 of 12 (1 of 9 is under the 10 jobs).
    for n in range(10):
        await jobs.run(engine, at("2026-11-25", 2, n), "schnell", Outcome(1))
    for n in range(8):
        await jobs.run(engine, at("2026-11-25", 10, n), "schnell", Outcome(1))
    for n in range(4):
        await jobs.run(engine, at("2026-11-25", 10, 10 + n), "schnell", Outcome(1, FailureReason.BAD_REQUEST))
    jobs.clock.now = NOW.timestamp()
    report = await build_report(engine._store, settings, engine._quota.periods())

    assert report.month_to_date_micros[report.days.index(date(2026, 10, 30))] == 500_000
    assert report.month_to_date_micros[report.days.index(date(2026, 10, 31))] == 500_000
    assert report.month_to_date_micros[report.days.index(date(2026, 11, 1))] == 0
    assert report.month_to_date_micros[-1] == 40_000 == report.month_spend_micros
    day = report.days.index(date(2026, 11, 25))
    assert report.failure_rate_pct[day] == pytest.approx(100 * 4 / 22)
    assert report.worst_hour_pct[day] == pytest.approx(100 * 4 / 12)
    assert [rate for rate in report.worst_hour_pct if rate is not None] == [pytest.approx(100 * 4 / 12)]

    panels = drawn(report)
    spend = panels["API"]["lines"]
    assert isinstance(spend, dict)
    assert spend["monthly cap $1.00"] == [1.0, 1.0]  # dollars a month, on the month-to-date axis
    assert spend["spend alerts at 50%, 80% of the cap"] == [0.5, 0.5]
    assert spend["spent this month, to date"] == [m / 1_000_000 for m in report.month_to_date_micros]
    failures = panels["Failure"]["lines"]
    assert isinstance(failures, dict)
    assert failures["alert threshold: 20% of an hour"] == [20.0, 20.0]
    worst = failures["worst hour that day (hours with >= 10 ended jobs)"]
    assert worst[day] == pytest.approx(100 * 4 / 12) and sum(1 for w in worst if not math.isnan(w)) == 1
    # Without a cap, there is no cap to draw.
    plain = drawn(await build_report(engine._store, make_settings(tiers={"default": {}}), engine._quota.periods()))
    assert isinstance(plain["API"]["lines"], dict) and not any("cap" in name for name in plain["API"]["lines"])
