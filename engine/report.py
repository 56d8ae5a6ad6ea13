"""The admin report: spend, images, failures and latency per calendar day over the last 30 days, as numbers, a PNG
chart and a few lines of text.

Days are calendar days in the configured time zone, like the quota periods: money counts on its ledger day (the day
the quotas count it), a job on the day it ended. A cancellation is the user's choice, so the failure rate is failed /
(done + failed). Latency is end to end, submit to image, for jobs that made one.

Every threshold is drawn in its panel's own unit: the monthly cap and the spend alerts against the month-to-date
spend (not against a day's), and the failure alert's rate against the worst hour of each day, measured as the alert
measures it (the hour before each failure, counted only with enough ended jobs), not against the daily rate.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import TYPE_CHECKING

from engine.config import Settings, dollars
from engine.ledger import Periods
from engine.models import BackendKind, JobState, format_duration, format_usd
from engine.store import EndedJob, Store

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_DAYS = 30
ALERT_WINDOW_S = 3600  # engine/alerts.py FAILURE_WINDOW_S: the failure alert looks at the last hour
NO_DATA = "no data yet"
BACKEND_LABELS = {BackendKind.LOCAL: "local GPU", BackendKind.API: "BFL API"}
BACKEND_COLOURS = {BackendKind.LOCAL: "#4c72b0", BackendKind.API: "#dd8452"}


@dataclass(frozen=True, slots=True)
class Report:
    """One value per day in `days` (oldest first) for every series."""

    days: tuple[date, ...]
    timezone: str
    month: str  # the current month, which the cap applies to
    spend_micros: Mapping[BackendKind, tuple[int, ...]]  # money posted, by backend
    month_to_date_micros: tuple[int, ...]  # money posted in the day's calendar month up to and including the day
    images: Mapping[BackendKind, tuple[int, ...]]  # images made, by backend
    failed: tuple[int, ...]
    ended: tuple[int, ...]  # done + failed
    cancelled: tuple[int, ...]
    worst_hour_pct: tuple[float | None, ...]  # the highest rate the failure alert saw that day; None: it never counted
    p95_s: tuple[float | None, ...]  # None: no image that day
    period_p95_s: float | None
    month_spend_micros: int
    cap_micros: int | None
    spend_alert_percents: tuple[int, ...]
    failure_alert_rate: float
    failure_alert_min_jobs: int

    @property
    def first_day(self) -> date:
        return self.days[0]

    @property
    def last_day(self) -> date:
        return self.days[-1]

    @property
    def images_per_day(self) -> tuple[int, ...]:
        return tuple(map(sum, zip(*self.images.values(), strict=True)))

    @property
    def failure_rate_pct(self) -> tuple[float | None, ...]:
        return tuple(
            None if ended == 0 else 100 * failed / ended for failed, ended in zip(self.failed, self.ended, strict=True)
        )

    def total_spend(self, backend: BackendKind | None = None) -> int:
        series = self.spend_micros.values() if backend is None else [self.spend_micros[backend]]
        return sum(map(sum, series))

    def total_images(self, backend: BackendKind | None = None) -> int:
        series = self.images.values() if backend is None else [self.images[backend]]
        return sum(map(sum, series))

    @property
    def busiest_day(self) -> tuple[date, int] | None:
        """The day with the most images (the latest of equal ones); None when no image was made."""
        per_day = self.images_per_day
        best = max(range(len(per_day)), key=lambda i: (per_day[i], i))
        return None if per_day[best] == 0 else (self.days[best], per_day[best])


def worst_hours(jobs: Sequence[EndedJob], min_jobs: int) -> list[tuple[float, float]]:
    """(moment, failed % of the hour before it) at each failure whose hour had at least `min_jobs` done + failed.

    This is what the failure alert compares with its threshold each time a job fails. `jobs` are oldest first.
    """
    counted = [(job.finished_at, job.state is JobState.FAILED) for job in jobs if job.state is not JobState.CANCELLED]
    rates: list[tuple[float, float]] = []
    start, failed_in_window = 0, 0
    for end, (moment, failed) in enumerate(counted):
        failed_in_window += failed
        while counted[start][0] < moment - ALERT_WINDOW_S:
            failed_in_window -= counted[start][1]
            start += 1
        ended = end - start + 1
        if failed and ended >= min_jobs:
            rates.append((moment, 100 * failed_in_window / ended))
    return rates


def p95(samples: Sequence[float]) -> float | None:
    """Nearest-rank 95th percentile: a value that was actually measured, no interpolation."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


async def build_report(store: Store, settings: Settings, periods: Periods, days: int = REPORT_DAYS) -> Report:
    """The `days` calendar days ending today (`periods.day`, in the configured zone)."""
    zone = settings.bot.zone
    last = date.fromisoformat(periods.day)
    day_list = tuple(last - timedelta(days=n) for n in range(days - 1, -1, -1))
    index = {day: i for i, day in enumerate(day_list)}
    since = datetime.combine(day_list[0], time(), zone).timestamp()
    until = datetime.combine(last + timedelta(days=1), time(), zone).timestamp()

    spend = {kind: [0] * days for kind in BackendKind}
    by_day: dict[date, int] = {}
    # From the 1st of the first day's month, so the month-to-date line starts from that month's real total.
    for line in await store.posted_spend_by_day(day_list[0].replace(day=1).isoformat(), last.isoformat()):
        day = date.fromisoformat(line.day)
        by_day[day] = by_day.get(day, 0) + line.usd_micros
        if day in index:
            spend[line.backend][index[day]] += line.usd_micros
    month_to_date = []
    for day in day_list:
        first = day.replace(day=1)
        month_to_date.append(sum(amount for spent, amount in by_day.items() if first <= spent <= day))

    images = {kind: [0] * days for kind in BackendKind}
    failed, ended, cancelled = [0] * days, [0] * days, [0] * days
    latencies: list[list[float]] = [[] for _ in range(days)]
    # From an hour earlier: the first day's early failures are judged on the hour before them, as the alert did.
    ended_jobs = await store.ended_jobs(since - ALERT_WINDOW_S, until)
    worst: list[float | None] = [None] * days
    for moment, rate in worst_hours(ended_jobs, settings.ops.failure_alert_min_jobs):
        day_of = datetime.fromtimestamp(moment, zone).date()
        if day_of in index:
            i = index[day_of]
            worst[i] = max(rate, worst[i] or 0.0)
    for job in ended_jobs:
        if job.finished_at < since:
            continue
        i = index[datetime.fromtimestamp(job.finished_at, zone).date()]
        if job.state is JobState.DONE:
            images[job.backend][i] += 1
            ended[i] += 1
            latencies[i].append(job.finished_at - job.created_at)
        elif job.state is JobState.FAILED:
            failed[i] += 1
            ended[i] += 1
        else:
            cancelled[i] += 1

    return Report(
        days=day_list,
        timezone=settings.bot.timezone,
        month=periods.month,
        spend_micros={kind: tuple(values) for kind, values in spend.items()},
        month_to_date_micros=tuple(month_to_date),
        images={kind: tuple(values) for kind, values in images.items()},
        failed=tuple(failed),
        ended=tuple(ended),
        cancelled=tuple(cancelled),
        worst_hour_pct=tuple(worst),
        p95_s=tuple(p95(day) for day in latencies),
        period_p95_s=p95([s for day in latencies for s in day]),
        month_spend_micros=await store.posted_spend(periods.month),
        cap_micros=dollars(settings.limits.global_api_usd_per_month),
        spend_alert_percents=settings.ops.spend_alert_percents,
        failure_alert_rate=settings.ops.failure_alert_rate,
        failure_alert_min_jobs=settings.ops.failure_alert_min_jobs,
    )


def summary_text(report: Report) -> str:
    """A few lines for the chat answer and the CLI, next to the chart."""
    lines = [
        f"flux-bot, last {len(report.days)} days: {report.first_day} to {report.last_day} ({report.timezone})",
    ]
    spent = format_usd(report.month_spend_micros)
    if report.cap_micros:
        share = 100 * report.month_spend_micros / report.cap_micros
        lines.append(
            f"API spend in {report.month}: {spent} of the {format_usd(report.cap_micros)} monthly cap ({share:.0f}%)."
        )
    else:
        lines.append(f"API spend in {report.month}: {spent} (no monthly cap is set).")
    by_backend = ", ".join(f"{BACKEND_LABELS[kind]} {report.total_images(kind):,}" for kind in BackendKind)
    lines.append(
        f"Images: {report.total_images():,} ({by_backend}); API spend over the period: "
        f"{format_usd(report.total_spend())}."
    )
    failed, ended = sum(report.failed), sum(report.ended)
    rate = f"{100 * failed / ended:.1f}%" if ended else "no jobs ended"
    latency = "no images" if report.period_p95_s is None else format_duration(report.period_p95_s)
    lines.append(f"Failures: {failed:,} of {ended:,} jobs ({rate}); p95 submit-to-image time: {latency}.")
    busiest = report.busiest_day
    if busiest is not None:
        day, count = busiest
        lines.append(f"Busiest day: {day} ({day:%a}) with {count:,} images.")
    return "\n".join(lines)


def render_png(report: Report) -> bytes:
    """One 1200x800 PNG with four panels sharing the date axis. CPU-bound (~0.5 s): call it in a thread."""
    figure = draw(report)
    out = io.BytesIO()
    figure.savefig(out, format="png", metadata={"Software": "flux-bot", "Title": f"flux-bot report {report.last_day}"})
    return out.getvalue()


def draw(report: Report) -> Figure:
    """The report's figure: spend, images, failure rate and latency per day; what render_png saves."""
    # Imported here, not at the top: matplotlib costs a noticeable start-up time that only the report needs.
    # Figure + FigureCanvasAgg, never pyplot: no global figure state, safe to use from a worker thread.
    import matplotlib.dates as mdates
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

    figure = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself: savefig renders with Agg whatever the default backend
    (spend_ax, images_ax), (failures_ax, latency_ax) = figure.subplots(2, 2, sharex=True)
    figure.suptitle(
        f"flux-bot — last {len(report.days)} days: {report.first_day:%d %b %Y} to {report.last_day:%d %b %Y}"
        f" ({report.timezone})",
        fontsize=14,
        fontweight="bold",
    )
    x = np.array(report.days, dtype="datetime64[D]")
    dollars_axis = FuncFormatter(lambda value, _: f"${value:,.2f}")

    def stacked(ax: Axes, series: dict[BackendKind, list[float]], legend_title: str) -> None:
        bottom = [0.0] * len(x)
        for kind, values in series.items():
            ax.bar(x, values, bottom=bottom, width=0.8, color=BACKEND_COLOURS[kind], label=BACKEND_LABELS[kind])
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_ylim(0, max(max(bottom) * 1.3, 1.0))  # headroom for the legend above the tallest bar
        ax.legend(title=legend_title, loc="upper left", ncols=len(series))

    def no_data(ax: Axes) -> None:
        ax.text(0.5, 0.5, NO_DATA, transform=ax.transAxes, ha="center", va="center", color="grey", fontsize=13)

    spent = [kind for kind in BackendKind if any(report.spend_micros[kind])] or [BackendKind.API]
    stacked(spend_ax, {kind: [m / 1_000_000 for m in report.spend_micros[kind]] for kind in spent}, "backend")
    spend_ax.set_title(f"API spend per day by backend (total {format_usd(report.total_spend())})")
    spend_ax.set_ylabel("US dollars per day")
    spend_ax.yaxis.set_major_formatter(dollars_axis)
    if report.cap_micros:
        # The cap is a month's money: drawn against the month-to-date total on its own axis, not against a day's.
        month_ax = spend_ax.twinx()
        to_date = [m / 1_000_000 for m in report.month_to_date_micros]
        cap = report.cap_micros / 1_000_000
        month_ax.plot(x, to_date, color="#8172b3", drawstyle="steps-mid", label="spent this month, to date")
        month_ax.axhline(cap, color="#c44e52", linestyle="--", label=f"monthly cap {format_usd(report.cap_micros)}")
        shares = sorted(p for p in set(report.spend_alert_percents) if p < 100)
        for n, percent in enumerate(shares):
            label = f"spend alerts at {', '.join(f'{p}%' for p in shares)} of the cap" if n == 0 else None
            month_ax.axhline(cap * percent / 100, color="#c44e52", linestyle=":", linewidth=0.8, label=label)
        month_ax.set_ylim(0, max(cap, *to_date) * 1.3)
        month_ax.set_ylabel("US dollars this month")
        month_ax.yaxis.set_major_formatter(dollars_axis)
        month_ax.legend(loc="upper right", fontsize="small")
    if not report.total_spend():
        no_data(spend_ax)

    stacked(images_ax, {kind: [float(n) for n in report.images[kind]] for kind in BackendKind}, "made on")
    images_ax.set_title(f"Images per day (total {report.total_images():,})")
    images_ax.set_ylabel("images per day")
    images_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if not report.total_images():
        no_data(images_ax)

    rates = [math.nan if rate is None else rate for rate in report.failure_rate_pct]
    worst = [math.nan if rate is None else rate for rate in report.worst_hour_pct]
    threshold = 100 * report.failure_alert_rate
    failures_ax.plot(x, rates, marker="o", color="#c44e52", label="per day: failed / (done + failed)")
    failures_ax.plot(
        x,
        worst,
        marker="^",
        linestyle="none",
        color="#8c1c13",
        label=f"worst hour that day (hours with >= {report.failure_alert_min_jobs} ended jobs)",
    )
    failures_ax.axhline(threshold, color="grey", linestyle="--", label=f"alert threshold: {threshold:g}% of an hour")
    failures_ax.set_title("Failure rate per day, and the worst hour the alert saw")
    failures_ax.set_ylabel("% of ended jobs that failed")
    failures_ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    measured = [r for r in (*rates, *worst) if not math.isnan(r)]
    failures_ax.set_ylim(0, max([threshold, 1.0, *measured]) * 1.35)
    if not any(report.ended):
        no_data(failures_ax)

    latencies = [math.nan if value is None else value for value in report.p95_s]
    latency_ax.plot(x, latencies, marker="o", color="#55a868", label="p95, submit to image")
    latency_ax.set_title("End-to-end latency per day (95th percentile)")
    latency_ax.set_ylabel("seconds")
    latency_ax.set_ylim(0, max([1.0, *(v for v in latencies if not math.isnan(v))]) * 1.3)
    if report.period_p95_s is None:
        no_data(latency_ax)

    margin = timedelta(hours=17)  # the first and last bars whole, with a little air
    for ax in (spend_ax, images_ax, failures_ax, latency_ax):
        # One locator per axis (a locator keeps its axis); matplotlib.dates ships without annotations.
        locator = mdates.AutoDateLocator(minticks=5, maxticks=10)  # type: ignore[no-untyped-call]
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
        ax.set_xlim(
            datetime.combine(report.first_day, time()) - margin, datetime.combine(report.last_day, time()) + margin
        )
        ax.grid(axis="y", alpha=0.3)
    for ax in (failures_ax, latency_ax):
        ax.set_xlabel(f"day ({report.timezone})")
        ax.legend(loc="upper left", ncols=1 if ax is failures_ax else 2, fontsize="small")
    return figure
