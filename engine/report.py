"""The admin report: spend, images, failures and latency per calendar day over the last 30 days, as numbers, a PNG
chart and a few lines of text.

Days are calendar days in the configured time zone, like the quota periods: money counts on its ledger day (the day
the quotas count it), a job on the day it ended. A cancellation is the user's choice, so the failure rate is failed /
(done + failed). Latency is end to end, submit to image, for jobs that made one.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

from engine.config import Settings, dollars
from engine.models import BackendKind, JobState, format_usd
from engine.quota import Periods
from engine.store import Store

REPORT_DAYS = 30
BACKEND_LABELS = {BackendKind.LOCAL: "local GPU", BackendKind.API: "BFL API"}
BACKEND_COLOURS = {BackendKind.LOCAL: "#4c72b0", BackendKind.API: "#dd8452"}


@dataclass(frozen=True, slots=True)
class Report:
    """One value per day in `days` (oldest first) for every series."""

    days: tuple[date, ...]
    timezone: str
    month: str  # the current month, which the cap applies to
    spend_micros: Mapping[BackendKind, tuple[int, ...]]  # money posted, by backend
    images: Mapping[BackendKind, tuple[int, ...]]  # images made, by backend
    failed: tuple[int, ...]
    ended: tuple[int, ...]  # done + failed
    cancelled: tuple[int, ...]
    p95_s: tuple[float | None, ...]  # None: no image that day
    period_p95_s: float | None
    month_spend_micros: int
    cap_micros: int | None
    failure_alert_rate: float

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
    for line in await store.posted_spend_by_day(day_list[0].isoformat(), last.isoformat()):
        spend[line.backend][index[date.fromisoformat(line.day)]] += line.usd_micros

    images = {kind: [0] * days for kind in BackendKind}
    failed, ended, cancelled = [0] * days, [0] * days, [0] * days
    latencies: list[list[float]] = [[] for _ in range(days)]
    for job in await store.ended_jobs(since, until):
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
        images={kind: tuple(values) for kind, values in images.items()},
        failed=tuple(failed),
        ended=tuple(ended),
        cancelled=tuple(cancelled),
        p95_s=tuple(p95(day) for day in latencies),
        period_p95_s=p95([s for day in latencies for s in day]),
        month_spend_micros=await store.posted_spend(periods.month),
        cap_micros=dollars(settings.limits.global_api_usd_per_month),
        failure_alert_rate=settings.ops.failure_alert_rate,
    )


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 90 else f"{value / 60:.1f} min"


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
    latency = "no images" if report.period_p95_s is None else _seconds(report.period_p95_s)
    lines.append(f"Failures: {failed:,} of {ended:,} jobs ({rate}); p95 submit-to-image time: {latency}.")
    busiest = report.busiest_day
    if busiest is not None:
        day, count = busiest
        lines.append(f"Busiest day: {day} ({day:%a}) with {count:,} images.")
    return "\n".join(lines)


def render_png(report: Report) -> bytes:
    """One 1200x800 PNG with four panels sharing the date axis. CPU-bound (~0.5 s): call it in a thread."""
    # Imported here, not at the top: matplotlib costs a noticeable start-up time that only the report needs.
    # Figure + FigureCanvasAgg, never pyplot: no global figure state, safe to use from a worker thread.
    import matplotlib.dates as mdates
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

    figure = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself: savefig below renders with Agg whatever the default backend
    (spend_ax, images_ax), (failures_ax, latency_ax) = figure.subplots(2, 2, sharex=True)
    figure.suptitle(
        f"flux-bot — last {len(report.days)} days: {report.first_day:%d %b %Y} to {report.last_day:%d %b %Y}"
        f" ({report.timezone})",
        fontsize=14,
        fontweight="bold",
    )
    x = np.array(report.days, dtype="datetime64[D]")

    def stacked(ax: Axes, series: dict[BackendKind, list[float]], legend_title: str) -> None:
        bottom = [0.0] * len(x)
        for kind, values in series.items():
            ax.bar(x, values, bottom=bottom, width=0.8, color=BACKEND_COLOURS[kind], label=BACKEND_LABELS[kind])
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_ylim(0, max(max(bottom) * 1.3, 1.0))  # headroom for the legend above the tallest bar
        ax.legend(title=legend_title, loc="upper left", ncols=len(series))

    spent = [kind for kind in BackendKind if any(report.spend_micros[kind])] or [BackendKind.API]
    stacked(spend_ax, {kind: [m / 1_000_000 for m in report.spend_micros[kind]] for kind in spent}, "backend")
    spend_ax.set_title(f"API spend per day by backend (total {format_usd(report.total_spend())})")
    spend_ax.set_ylabel("US dollars per day")
    spend_ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"${value:,.2f}"))

    stacked(images_ax, {kind: [float(n) for n in report.images[kind]] for kind in BackendKind}, "made on")
    images_ax.set_title(f"Images per day (total {report.total_images():,})")
    images_ax.set_ylabel("images per day")
    images_ax.yaxis.set_major_locator(MaxNLocator(integer=True))

    rates = [math.nan if rate is None else rate for rate in report.failure_rate_pct]
    threshold = 100 * report.failure_alert_rate
    failures_ax.plot(x, rates, marker="o", color="#c44e52", label="failed / (done + failed)")
    failures_ax.axhline(threshold, color="grey", linestyle="--", label="alert threshold (per hour)")
    failures_ax.set_title("Failure rate per day")
    failures_ax.set_ylabel("% of ended jobs that failed")
    failures_ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    failures_ax.set_ylim(0, max([threshold, 1.0, *(r for r in rates if not math.isnan(r))]) * 1.35)

    latencies = [math.nan if value is None else value for value in report.p95_s]
    latency_ax.plot(x, latencies, marker="o", color="#55a868", label="p95, submit to image")
    latency_ax.set_title("End-to-end latency per day (95th percentile)")
    latency_ax.set_ylabel("seconds")
    latency_ax.set_ylim(0, max([1.0, *(v for v in latencies if not math.isnan(v))]) * 1.3)

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
        ax.legend(loc="upper left", ncols=2)
        if not any(report.ended):
            ax.text(0.5, 0.5, "no jobs ended in this period", transform=ax.transAxes, ha="center", color="grey")

    out = io.BytesIO()
    figure.savefig(out, format="png", metadata={"Software": "flux-bot", "Title": f"flux-bot report {report.last_day}"})
    return out.getvalue()
