"""Platform-neutral texts: progress bar, ETA, quota summary, and one friendly message per error type.

Every message a user sees after a failure says what happened, whether they were charged, and what to do next.
No traceback or internal detail ever reaches a chat user; the log has them, keyed by job id.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from engine.config import StyleSettings
from engine.errors import (
    BackendUnavailable,
    ConfigError,
    EngineError,
    InvalidRequest,
    JobNotFound,
    NotAllowed,
    PolicyBlocked,
    QuotaExceeded,
)
from engine.models import (
    Appeal,
    AppealState,
    AuditRecord,
    BackendKind,
    Capabilities,
    FailureReason,
    Job,
    JobCancelled,
    JobDone,
    JobEvent,
    JobFailed,
    JobHeld,
    JobProgress,
    JobQueued,
    JobRejected,
    JobRerouted,
    JobStarted,
    JobState,
    JobWaiting,
    Resource,
    StyleCheck,
    StyleServing,
    format_duration,
    format_usd,
)
from engine.service import Alert, FailureAlert, QuotaView, SpendAlert, SpendRow

log = logging.getLogger(__name__)

# How a front-end shows user text (a prompt) inside a text of its own: escaped for its platform's markup, so the
# words show as typed and cannot mention anyone or format the message. The texts here are otherwise plain.
UserText = Callable[[str], str]

NOT_CHARGED = "You were not charged."
DEMO_NOTE = "[demo model: random weights, this image is noise]"
INTERNAL_ERROR = "Something went wrong inside flux-bot; it has been logged. Try again, or tell an admin."


def plain(text: str) -> str:
    """UserText for plain-text output (console, CLI): the text as it is."""
    return text


# Direction controls (marks, embeddings, overrides, isolates): in a prompt they could reorder the bot's own words
# after it (a right-to-left override would show "$0.04" as "40.0$").
_BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def shown(text: str, safe: UserText) -> str:
    """User text inside one of our texts: escaped by the front-end's `safe` and, when it holds direction controls,
    wrapped in a first-strong isolate (U+2068 ... U+2069), which ends their effect where the user's text ends."""
    if _BIDI_CONTROLS.search(text):
        text = f"\u2068{text}\u2069"
    return safe(text)


def progress_bar(step: int, total: int, width: int = 20) -> str:
    total = max(total, 1)
    filled = min(width, round(width * step / total))
    return f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total}"


def charged_text(micros: int) -> str:
    return NOT_CHARGED if micros <= 0 else f"You were charged {format_usd(micros)}."


def backend_name(kind: BackendKind) -> str:
    return "the local GPU" if kind is BackendKind.LOCAL else "the BFL API"


def amount(resource: Resource | str, value: int) -> str:
    resource = Resource(resource)
    if resource is Resource.USD_MICROS:
        return format_usd(value)
    if resource is Resource.GPU_MS:
        return f"{value / 1000:.0f} GPU-seconds"
    return f"{value} image{'s' if value != 1 else ''}"


def when(moment: datetime | None) -> str:
    if moment is None:
        return ""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


_FAILURES = {
    FailureReason.OOM: "the GPU ran out of memory",
    FailureReason.CRASH: "the GPU worker crashed",
    FailureReason.TIMEOUT: "it took too long",
    FailureReason.HUNG: "the GPU worker stopped responding",
    FailureReason.HOST_LOST: "the GPU host working on it went offline",
    FailureReason.MODERATED: "the image service's safety filter refused this prompt or image",
    FailureReason.RATE_LIMITED: "the image API is busy",
    FailureReason.SERVER_ERROR: "the image API had an error",
    FailureReason.BAD_REQUEST: "the image API did not accept these settings",
    FailureReason.OUT_OF_CREDITS: "this bot's BFL account is out of credits",
    FailureReason.AUTH: "this bot's BFL API key was refused",
    FailureReason.TASK_NOT_FOUND: "the image API lost the task",
    FailureReason.DOWNLOAD_FAILED: "the finished image could not be downloaded in time",
    FailureReason.INTERRUPTED: "flux-bot restarted while it was working on it",
    FailureReason.INTERNAL: "something went wrong inside flux-bot",
    FailureReason.IMAGE_REMOVED: "its image was made but is no longer stored here (deleted, or past this server's"
    " retention), so it cannot be shown",
}

_ADVICE = {
    FailureReason.MODERATED: "Rephrase the prompt and try again.",
    FailureReason.BAD_REQUEST: "Try other settings (size, steps, guidance).",
    FailureReason.IMAGE_REMOVED: "Ask again with /imagine to make a new one.",
}
# The API itself cannot serve anyone until an admin acts: the GPU lane is the way round it, where there is one.
_ADMIN_MUST_FIX = (FailureReason.OUT_OF_CREDITS, FailureReason.AUTH)
_RELAX = "mode=relax for the free local GPU"


def failed_text(event: JobFailed, capabilities: Capabilities | None = None) -> str:
    """`capabilities` (Engine.capabilities()) lets the advice offer only what this bot has; None offers neither lane."""
    what = _FAILURES.get(event.reason, "it failed")
    if event.reason in _ADMIN_MUST_FIX:
        advice = f"Tell an admin; meanwhile, try {_RELAX}." if _local(capabilities) else "Tell an admin."
    else:
        advice = _ADVICE.get(event.reason, "Try again in a minute; if it keeps failing, tell an admin.")
    return f"Job {event.job_id} failed: {what}. {charged_text(event.charged_micros)} {advice}"


def cancelled_text(event: JobCancelled) -> str:
    if event.charged_micros > 0:
        # Also after a failover: a billed API attempt (a timeout) stays paid when the retry is cancelled.
        return (
            f"Job {event.job_id} cancelled. You were charged {format_usd(event.charged_micros)}: the image API had "
            "accepted it, and BFL bills a task it accepted."
        )
    return f"Job {event.job_id} cancelled. {NOT_CHARGED}"


def held_text(event: JobHeld) -> str:
    made = "the image was made, so it counts as made"
    cost = (
        f"{made}: {format_usd(event.charged_micros)} for the image API"
        if event.charged_micros
        else (f"{made}: the GPU time it used counts against your GPU time today")
    )
    return (
        f"Job {event.job_id} is held for review by this server's admins ({event.reason}); you will hear from"
        f" it here once one has looked at it. {cost[0].upper()}{cost[1:]}."
    )


def rejected_text(event: JobRejected) -> str:
    charge = (
        f" It was made, so it still cost {format_usd(event.charged_micros)}."
        if event.charged_micros
        else " It was made on this server's GPU, so its GPU time still counts."
    )
    return f"An admin rejected the image of job {event.job_id} ({event.reason}): it has been deleted.{charge}"


def ended_text(event: JobEvent, capabilities: Capabilities | None = None) -> str:
    """What the user is told when a job ends without an image to show (or as a plain line when it has one)."""
    if isinstance(event, JobFailed):
        return failed_text(event, capabilities)
    if isinstance(event, JobCancelled):
        return cancelled_text(event)
    if isinstance(event, JobHeld):
        return held_text(event)
    if isinstance(event, JobRejected):
        return rejected_text(event)
    return event_line(event)


def _local(capabilities: Capabilities | None) -> bool:
    return capabilities is not None and capabilities.local_usable


def _api(capabilities: Capabilities | None) -> bool:
    return capabilities is not None and capabilities.api_usable


def queued_text(event: JobQueued, model_display: str, moved: JobWaiting | None = None) -> str:
    """The queued note; once the queue has `moved`, with the new place and ETA and without the route's reason,
    which quotes the wait at submit: one message never shows two different waits."""
    route = event.route
    where = backend_name(route.backend)
    position, eta = (moved.position, moved.eta_s) if moved else (event.position, event.eta_s)
    cost = (
        f"estimated cost {format_usd(route.estimated_cost_micros)}"
        if route.backend is BackendKind.API
        else "free (local GPU)"
    )
    note = f"Job {event.job_id}: {model_display} on {where}, {_place(position)}, ETA {format_duration(eta)}, {cost}."
    return note if moved else f"{note} Why: {route.reason}"


def _place(position: int) -> str:
    return "next in line" if position == 0 else f"position {position + 1} in the queue"


def done_caption(job: Job, event: JobDone, model_display: str, safe: UserText, *, demo: bool = False) -> str:
    """`demo`: the engine's local backend runs the demo model (`Engine.demo`)."""
    cost = "free" if event.cost_micros <= 0 else format_usd(event.cost_micros)
    prompt = job.request.prompt if len(job.request.prompt) <= 300 else job.request.prompt[:297] + "..."
    return (
        f'"{shown(prompt, safe)}" — {model_display}, seed {event.seed}, {job.request.width}x{job.request.height}, '
        f"{backend_name(event.backend)}, {format_duration(event.seconds)}, {cost}"
        f" (job {job.id}){demo_note(event, demo)}"
    )


def demo_note(event: JobDone, demo: bool) -> str:
    """Said with every image the demo model made, so that nobody takes the noise for a broken bot."""
    return " " + DEMO_NOTE if demo and event.backend is BackendKind.LOCAL else ""


def event_line(event: JobEvent, capabilities: Capabilities | None = None) -> str:
    """One line per event, for the console and logs (`capabilities` fits a failure's advice, see failed_text)."""
    match event:
        case JobQueued():
            return (
                f"[{event.job_id}] queued on {event.route.backend.value}: position {event.position + 1}, "
                f"ETA {format_duration(event.eta_s)} — {event.route.reason}"
            )
        case JobWaiting():
            return f"[{event.job_id}] now {_place(event.position)}, ETA {format_duration(event.eta_s)}"
        case JobRerouted():
            return (
                f"[{event.job_id}] rerouted to {event.route.backend.value} after {event.after.value}: "
                f"{event.route.reason}"
            )
        case JobStarted():
            return f"[{event.job_id}] started on {backend_name(event.backend)}"
        case JobProgress():
            preview = " (preview)" if event.preview_png else ""
            return f"[{event.job_id}] {progress_bar(event.step, event.total)}{preview}"
        case JobDone():
            cost = "free" if event.cost_micros <= 0 else format_usd(event.cost_micros)
            return f"[{event.job_id}] done on {event.backend.value} in {format_duration(event.seconds)}, {cost}"
        case JobFailed():
            return f"[{event.job_id}] {failed_text(event, capabilities)}"
        case JobCancelled():
            return f"[{event.job_id}] {cancelled_text(event)}"
        case JobHeld():
            return f"[{event.job_id}] {held_text(event)}"
        case JobRejected():
            return f"[{event.job_id}] {rejected_text(event)}"
    raise TypeError(f"unknown event {event!r}")


APPEAL_OFFER = "If this prompt should be allowed, appeal: an admin will read it and can run it for you."
APPEAL_FILED = (
    "Your appeal went to the admins with your prompt. If one allows it, the image is made and posted here, and"
    " charged as any of your images; until then nothing is charged."
)


def appeal_caption(appeal: Appeal, safe: UserText) -> str:
    """What the admins read about an appeal: who (as text, never a mention), the prompt as typed, which rule."""
    requester = appeal.requester
    who = f"{shown(requester.display_name or requester.user_id, safe)} ({requester.user_key})"
    rule = f'the blocked word "{shown(appeal.matched, safe)}"' if appeal.matched else appeal.rule
    image = " (with an image to work from)" if appeal.input_image else ""
    return (
        f"Appeal {appeal.id}: {who} asks to run a refused prompt{image} with {appeal.request.model}.\n"
        f'Prompt: "{shown(appeal.request.prompt, safe)}"\nRefused for: {rule}.\n'
        "Allowing runs it once for them, charged as usual."
    )


def appeal_decided_text(appeal: Appeal, actor: str) -> str:
    """The review channel's line once an admin decided; `actor` is already shown safely."""
    if appeal.state is AppealState.ALLOWED:
        return f"Appeal {appeal.id}: allowed by {actor}; job {appeal.job_id} runs for {appeal.requester.user_key}."
    return f"Appeal {appeal.id}: kept refused by {actor} ({appeal.reason})."


def appeal_outcome_text(appeal: Appeal, safe: UserText) -> str:
    """For the requester, where they asked."""
    who = shown(appeal.requester.display_name or appeal.requester.user_id, safe)
    if appeal.state is AppealState.ALLOWED:
        return f"An admin allowed the appeal of {who}: job {appeal.job_id} is being made and will be posted here."
    return (
        f"An admin read the appeal of {who} and kept the prompt refused ({shown(appeal.reason or '', safe)})."
        f" {NOT_CHARGED}"
    )


def appeals_text(appeals: list[Appeal], safe: UserText) -> str:
    return "\n".join(
        f"{a.id} {a.requester.user_key} appeals: {a.matched or a.rule}: {shown(a.request.prompt[:60], safe)}"
        for a in appeals
    )


def audit_text(records: list[AuditRecord], timezone: str) -> str:
    """One line per audit record, newest first: when, who, what, to whom or which job, and its details."""
    if not records:
        return "No audit lines match."
    zone = ZoneInfo(timezone)
    lines = []
    for record in records:
        when = datetime.fromtimestamp(record.at, zone).strftime("%Y-%m-%d %H:%M:%S")
        parts = [when, record.actor, record.action]
        if record.subject:
            parts.append(record.subject)
        if record.job_id:
            parts.append(f"job {record.job_id}")
        if record.detail:
            parts.append(", ".join(f"{key}={value}" for key, value in sorted(record.detail.items())))
        lines.append(" ".join(parts))
    return "\n".join(lines)


def quota_text(view: QuotaView) -> str:
    lines = [
        f"Quota for {view.user_key} (tier: {view.limits.tier})"
        + (" — BANNED" if view.banned else "")
        + (" — has never used this bot" if view.seen is False else "")
    ]
    for line in view.lines:
        if line.limit is None:
            lines.append(f"  {line.name}: {amount(line.resource, line.used)} used, no limit")
        else:
            used = format_usd(line.used) if line.resource is Resource.USD_MICROS else amount(line.resource, line.used)
            used = used.split(" ")[0]  # the unit is said once, with the limit: "3 of 50 images"
            lines.append(
                f"  {line.name}: {used} of {amount(line.resource, line.limit)} used, "
                f"{amount(line.resource, line.remaining or 0)} left, resets {when(line.resets_at)}"
            )
    if view.limits.concurrent_jobs is not None:
        lines.append(f"  jobs at once: up to {view.limits.concurrent_jobs}")
    return "\n".join(lines)


def spend_text(month: str, rows: list[SpendRow]) -> str:
    if not rows:
        return f"No spending recorded for {month}."
    total = sum(r.usd_micros for r in rows)
    pending = sum(r.pending_usd_micros for r in rows)
    lines = [f"Spend for {month}: {format_usd(total)} posted, {format_usd(pending)} pending"]
    for row in rows:
        lines.append(
            f"  {row.user_key} on {row.backend}: {row.images} images, {format_usd(row.usd_micros)}"
            + (f" (+{format_usd(row.pending_usd_micros)} pending)" if row.pending_usd_micros else "")
        )
    return "\n".join(lines)


def alert_text(alert: Alert) -> str:
    """An alert for the admin channel: what crossed which line, with the numbers and where to look next."""
    match alert:
        case SpendAlert():
            return (
                f"flux-bot alert: API spend in {alert.month} has passed {alert.percent}% of the monthly cap: "
                f"{format_usd(alert.spent_micros)} of {format_usd(alert.cap_micros)}. "
                "See `admin spend` and `admin report`."
            )
        case FailureAlert():
            return (
                f"flux-bot alert: {alert.failed} of the {alert.ended} jobs that ended in the last "
                f"{'hour' if alert.window_s == 3600 else format_duration(alert.window_s)} failed "
                f"({100 * alert.failed / alert.ended:.0f}%, alert threshold "
                f"{100 * alert.threshold:.0f}%). See `admin jobs`, `admin report` and the log."
            )
    raise TypeError(f"unknown alert {alert!r}")


def styles_text(styles: Mapping[str, StyleSettings], models: Mapping[str, str]) -> str:
    """/styles: each style an admin set up, what it does and where it runs (`models`: name -> display name)."""
    if not styles:
        return "No styles are set up on this server; an admin adds them as [styles.NAME] in config.toml."
    lines = ["Styles (style=NAME, or /settings style NAME to make one your default):"]
    for name, style in styles.items():
        runs = ", ".join(models.get(model, model) for model in style.models) if style.models else "any model"
        where = f"GPU lane only ({len(style.adapters)} LoRA adapter{'s' if len(style.adapters) != 1 else ''})"
        about = f": {style.description}" if style.description else ""
        lines.append(
            f"- {name}: {style.display_name}{about}. Runs with {runs}; {where if style.gpu_only else 'any lane'}."
        )
        if style.sample_image:
            lines.append(f"  sample: {style.sample_image}")
    return "\n".join(lines)


def style_report_text(styles: list[StyleServing]) -> str:
    """`/admin styles`: each style's adapters and the GPU slots that have them loaded now."""
    if not styles:
        return "No styles are configured ([styles.NAME] in config.toml)."
    lines = []
    for style in styles:
        if not style.adapters:
            lines.append(f"{style.name} ({style.display_name}): a template, no adapters: runs on any lane")
            continue
        if style.serving is None:
            where = "ask the running bot (/admin styles in chat) which GPU slots have it"
        else:
            where = "served by " + ", ".join(style.serving) if style.serving else "NOT loaded on any GPU slot now"
        lines.append(f"{style.name} ({style.display_name}): {style.adapters}; {where}")
    return "\n".join(lines)


def style_checks_text(checks: list[StyleCheck]) -> str:
    """`flux-bot admin styles check`: per style with adapters, its files and hashes, then its test render."""
    if not checks:
        return "No style has LoRA adapters: nothing to check."
    lines = []
    for check in checks:
        if check.problems:
            lines += [f"{check.name}: FAILED", *(f"  - {problem}" for problem in check.problems)]
        else:
            render = f"test render job {check.job_id}: {check.rendered}" if check.job_id else check.rendered
            lines.append(f"{check.name}: files and sha256 ok; {render}")
    return "\n".join(lines)


def job_text(job: Job, model_display: str, safe: UserText, style: StyleSettings | None = None) -> str:
    r = job.request
    lines = [
        f"Job {job.id}: {job.state.value} — {model_display} on {backend_name(job.backend)}",
        f"  prompt: {shown(r.prompt, safe)}",
    ]
    if r.style:
        adapters = f"; adapters {style.adapters_text()}" if style and style.adapters else ""
        lines.append(f"  style: {r.style}{adapters}")
    lines += [
        f"  size {r.width}x{r.height} ({r.aspect_ratio}), steps {r.steps}, "
        + (f"guidance {r.guidance}, " if r.guidance is not None else "")
        + f"seed {r.seed}, mode {r.mode.value}",
        f"  route: {job.reason}",
        f"  attempts: {job.attempts}, cost: {format_usd(job.cost_micros)}",
    ]
    if job.error:
        lines.append(f"  error: {shown(job.error, safe)}")  # it can quote what a provider answered about the prompt
    if job.state is JobState.DONE and job.result_path is None:
        lines.append("  image: no longer stored (deleted, or past this server's retention)")
    return "\n".join(lines)


def error_message(exc: EngineError, capabilities: Capabilities | None = None) -> str:
    """The one friendly message for each error type; `capabilities` (Engine.capabilities()) fits the advice.

    Whether the user was charged is said only where a charge was possible (`exc.charge_possible`: a refused
    /imagine), never after an admin typo or an unknown job. None of these errors costs anything.
    """
    charge = f" {NOT_CHARGED}" if exc.charge_possible else ""
    match exc:
        case InvalidRequest():
            return f"That request can't be made: {exc.problem}.{charge}"
        case PolicyBlocked():
            return f"That prompt was not accepted by this server's rules: {exc.detail}.{charge}"
        case QuotaExceeded() if exc.unit == "jobs":
            many = f"{exc.limit_value} job{'s' if exc.limit_value != 1 else ''}"
            return (
                f"You already have {many} waiting or running, as many as you may have at once.{charge} "
                f"{_quota_advice(exc, capabilities)}"
            )
        case QuotaExceeded():
            resets = f" It resets {when(exc.resets_at)}." if exc.resets_at else ""
            left = (
                amount(exc.unit, exc.remaining)
                if exc.unit in {r.value for r in Resource}
                else f"{exc.remaining} {exc.unit}"
            )
            return f"That would go over {exc.limit} ({left} left).{resets}{charge} {_quota_advice(exc, capabilities)}"
        case BackendUnavailable() if exc.charge_possible:
            return f"No image backend can take this now: {exc.reason}.{charge}"
        case BackendUnavailable():  # an admin view (the BFL balance), not a job
            return f"{exc.reason[:1].upper()}{exc.reason[1:]}."
        case JobNotFound():
            return f"No job {exc.job_id!r} of yours was found. Use /queue to see your jobs."
        case NotAllowed():
            return f"You can't do that: {exc.reason}.{charge}"
        case ConfigError():
            return f"flux-bot is misconfigured ({exc.field}); tell an admin."
    return INTERNAL_ERROR


def _quota_advice(exc: QuotaExceeded, capabilities: Capabilities | None) -> str:
    """What helps against this limit on this bot: the other lane only where it exists, isn't paused, and is spared."""
    if exc.unit == "jobs":
        return "Wait for one of your jobs to finish (see /queue), or cancel one."
    if exc.unit == Resource.USD_MICROS.value:
        relax = [f"use {_RELAX}"] if _local(capabilities) else []
        if exc.scope != "user":
            choices = [*relax, "wait for the reset", "ask an admin to raise it"]
            return f"It is a shared budget, not your own: {_either(choices)}"
        return _either([*relax, "wait for the reset", "ask an admin for more"], capital=True)
    if exc.unit == Resource.GPU_MS.value:
        fast = ["use mode=fast for the image API"] if _api(capabilities) else []
        return _either([*fast, "wait for the reset", "ask an admin for more GPU time"], capital=True)
    return "Wait for the reset, or ask an admin for a higher limit."


def _either(options: list[str], *, capital: bool = False) -> str:
    """'a, b, or c.' (capital: 'A, b, or c.')"""
    text = f"{', '.join(options[:-1])}, or {options[-1]}." if len(options) > 1 else f"{options[0]}."
    return text[:1].upper() + text[1:] if capital else text
