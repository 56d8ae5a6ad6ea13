"""Platform-neutral command handlers: typed arguments in, engine calls, texts out.

Adapters (console, Discord, Slack, the admin CLI) parse their platform's input into these calls and deliver the
texts; nothing here knows a platform. Errors are raised as EngineError for the adapter to render with
render.error_message, so every front-end says the same thing about the same failure.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from bot import render
from engine.errors import InvalidRequest, refuses_a_charge
from engine.models import (
    ASPECT_SIZES,
    Appeal,
    BackendKind,
    ImageRequest,
    Job,
    JobCancelled,
    JobQueued,
    Mode,
    Requester,
    Task,
    format_usd,
)
from engine.service import Engine, parse_grant

log = logging.getLogger(__name__)

IMAGINE_OPTIONS = ("model", "aspect", "steps", "guidance", "seed", "mode", "width", "height", "style")
NO_STYLE = "none"  # style=none: no style, even where the user's /settings name one
ADMIN_USAGE = (
    "admin commands: quota show USER | quota set USER LIMIT VALUE | quota grant USER images|gpu-seconds|usd AMOUNT"
    " | quota reset USER | spend [YYYY-MM] | credits | pause local|api | resume local|api | ban USER | unban USER"
    " | jobs | cancel JOB | report | review [list] | review approve JOB | review reject|reject-and-ban JOB REASON"
    " | review allow APPEAL | review deny APPEAL REASON | takedown JOB REASON | styles [list|reload|check]"
    " | audit [--since YYYY-MM-DD] [--action NAME]"
)

# Removes a job's image everywhere it was posted and answers with what was removed (bot.takedown, which holds the
# chat platforms' clients; given by whoever has their tokens, so the CLI imports them only for a take-down).
TakeDown = Callable[[Requester, str, str], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class ChartReply:
    """`admin report`'s answer: a short summary and the PNG chart it describes."""

    text: str
    png: bytes
    filename: str


@dataclass(frozen=True, slots=True)
class ImagineArgs:
    prompt: str
    options: dict[str, str]


def same_options(job: Job, seed: int | None) -> dict[str, str]:
    """The options of an earlier job, for Reroll, Vary and Edit prompt (which change only the seed or prompt).

    seed None leaves the seed out, so the new job draws a random one.
    """
    r = job.request
    options = {"model": r.model, "steps": str(r.steps), "mode": r.mode.value}
    if (r.width, r.height) == ASPECT_SIZES.get(r.aspect_ratio):
        options["aspect"] = r.aspect_ratio
    else:  # a width and height the user asked for (Slack, the console)
        options |= {"width": str(r.width), "height": str(r.height)}
    if r.guidance is not None:
        options["guidance"] = str(r.guidance)
    if seed is not None:
        options["seed"] = str(seed)
    return options


class Variation(StrEnum):
    """The result buttons' two variations of an image: how far the new one may move from it."""

    SUBTLE = "subtle"
    STRONG = "strong"


def parse_int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise InvalidRequest(f"{name} must be a whole number, not {value!r}", field=name) from exc


def parse_float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError as exc:
        raise InvalidRequest(f"{name} must be a number, not {value!r}", field=name) from exc


# Other spellings of an option name; Midjourney users type `--ar 16:9`.
OPTION_ALIASES = {"ar": "aspect", "aspect-ratio": "aspect", "aspect_ratio": "aspect"}
_OPTION_NAMES = {name: name for name in IMAGINE_OPTIONS} | OPTION_ALIASES
# A token that names an option: `--name`, `--name=value` or `name=value`. Any other token is prompt text. Phones
# with smart punctuation turn "--" into an em or en dash, so "—ar 16:9" is a flag too (as Midjourney reads it).
_FLAG = re.compile(r"(?:--|[\u2013\u2014])(?P<name>[^\s=]+)(?:=(?P<value>.*))?", re.DOTALL)
_ASSIGN = re.compile(r"(?P<name>[^\s=-][^\s=]*)=(?P<value>.*)", re.DOTALL)
_TOKEN = re.compile(r"\S+")
_MENTION = re.compile(r"<@!?([A-Za-z0-9]+)(?:\|[^>]*)?>")  # Discord <@123> / <@!123>, Slack <@U123|name>


def parse_imagine_text(text: str) -> ImagineArgs:
    """'a red cat --ar 16:9 steps=20' -> the prompt and the options, for the console and Slack alike.

    Options are only the known names (IMAGINE_OPTIONS and OPTION_ALIASES, any case) written `--name value`,
    `--name=value` or `name=value`, anywhere in the text. Everything else is the user's own words and is kept
    exactly as typed: quotes, apostrophes, `--` and `=` in other words, unicode, and the spacing between words
    (an option takes the whitespace before it with it; only the ends are trimmed). An option given twice, a known
    option without a value, and width or height together with an aspect ratio are errors.
    """
    try:
        return _split_options(text)
    except InvalidRequest as exc:
        exc.charge_possible = True  # a refused /imagine: the user wants to know that it cost nothing
        raise


def _split_options(text: str) -> ImagineArgs:
    tokens = list(_TOKEN.finditer(text))
    options: dict[str, str] = {}
    written: dict[str, str] = {}  # option -> how the user wrote it, for the error messages
    removed: list[tuple[int, int]] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        found = _option(token.group())
        if found is None:
            continue
        name, value, flag = found
        end = token.end()
        if value is None:
            following = tokens[index] if index < len(tokens) else None
            if following is None or following.group().startswith("--") or _option(following.group()):
                raise InvalidRequest(f"{token.group()} needs a value, e.g. {flag} {_EXAMPLES[name]}", field=name)
            value, end = following.group(), following.end()
            index += 1
        if not value:
            raise InvalidRequest(f"{token.group()} needs a value, e.g. {flag}={_EXAMPLES[name]}", field=name)
        shown = text[token.start() : end]
        if name in options:
            raise InvalidRequest(f"{name} is given twice ({written[name]!r} and {shown!r}); give it once", field=name)
        options[name], written[name] = value, shown
        removed.append((token.start(), end))
    sized = [written[name] for name in ("width", "height") if name in options]
    if sized and "aspect" in options:
        raise InvalidRequest(
            f"give an aspect ratio or a width and height, not both ({written['aspect']!r} and {sized[0]!r})",
            field="aspect",
        )
    return ImagineArgs(_without(text, removed), options)


_EXAMPLES = {
    "model": "dev",
    "aspect": "16:9",
    "steps": "28",
    "guidance": "3.5",
    "seed": "7",
    "mode": "relax",
    "width": "1024",
    "height": "768",
}


def _option(token: str) -> tuple[str, str | None, str] | None:
    """(option, value or None when it is the next token, the flag as the user should write it), or None."""
    if match := _FLAG.fullmatch(token):
        name = _OPTION_NAMES.get(match["name"].lower())
        return None if name is None else (name, match["value"], f"--{match['name']}")
    if match := _ASSIGN.fullmatch(token):
        name = _OPTION_NAMES.get(match["name"].lower())
        return None if name is None else (name, match["value"], match["name"])
    return None


def _without(text: str, spans: list[tuple[int, int]]) -> str:
    """The text with the spans cut out, each with the whitespace that separated it from the words before it."""
    kept: list[str] = []
    position = 0
    for start, end in spans:
        cut = start
        while cut > position and text[cut - 1].isspace():
            cut -= 1
        kept.append(text[position:cut])
        position = end
    kept.append(text[position:])
    return "".join(kept).strip()


class Commands:
    """`safe` is how the front-end shows user text (prompts) inside its own texts; see render.UserText."""

    def __init__(
        self, engine: Engine, safe: render.UserText = render.plain, *, take_down: TakeDown | None = None
    ) -> None:
        self.engine = engine
        self.safe = safe
        self.take_down = take_down

    def model_display(self, name: str) -> str:
        model = self.engine.settings.models.get(name)
        return model.display_name if model else name

    @refuses_a_charge
    async def imagine(
        self, requester: Requester, prompt: str, options: dict[str, str], *, image: bytes | None = None
    ) -> JobQueued:
        """Submit, filling unset options from the user's /settings, then the server's defaults; with `image`, a new
        image guided by it (with an edit model: that image edited as the prompt says)."""
        defaults = await self.engine.user_settings(requester)
        style_name = (options.get("style") or defaults.get("style") or NO_STYLE).lower()
        style = self.engine.settings.styles.get(style_name)
        # What was asked now comes first, then the style's own defaults, then the user's /settings, then the server's.
        model = (
            options.get("model")
            or (style.model if style else None)
            or defaults.get("model")
            or self.engine.settings.routing.default_model
        )
        mode_text = options.get("mode") or defaults.get("mode") or Mode.AUTO.value
        try:
            mode = Mode(mode_text.lower())
        except ValueError as exc:
            raise InvalidRequest(f"mode must be auto, fast or relax, not {mode_text!r}", field="mode") from exc
        sized = "width" in options or "height" in options
        style_aspect = style.aspect if style else None
        style_steps = style.steps if style else None
        style_guidance = style.guidance if style else None
        request = ImageRequest(
            prompt=prompt,
            model=model.lower(),
            width=parse_int("width", options["width"]) if "width" in options else None,
            height=parse_int("height", options["height"]) if "height" in options else None,
            # A width and height asked for now outrank the aspect ratio of the style or of /settings.
            aspect_ratio=options.get("aspect") or (None if sized else style_aspect or defaults.get("aspect")),
            steps=parse_int("steps", options["steps"]) if "steps" in options else style_steps,
            guidance=parse_float("guidance", options["guidance"]) if "guidance" in options else style_guidance,
            seed=parse_int("seed", options["seed"]) if "seed" in options else None,
            mode=mode,
            input_image=image,
            style=None if style_name == NO_STYLE else style_name,
        )
        return await self.engine.submit(requester, request)

    @refuses_a_charge
    async def edit(
        self, requester: Requester, image: bytes, instruction: str, options: dict[str, str] | None = None
    ) -> JobQueued:
        """Edit `image` as the instruction says, on the server's edit model unless the options name another."""
        options = dict(options or {})
        model = (options.get("model") or self.engine.settings.images.edit_model).lower()
        if model not in self.engine.settings.models:
            raise InvalidRequest(
                "image edits are not set up on this bot (no edit model among its models): ask an admin", field="model"
            )
        mode_text = options.get("mode") or Mode.AUTO.value
        try:
            mode = Mode(mode_text.lower())
        except ValueError as exc:
            raise InvalidRequest(f"mode must be auto, fast or relax, not {mode_text!r}", field="mode") from exc
        request = ImageRequest(
            prompt=instruction,
            model=model,
            aspect_ratio=options.get("aspect"),
            steps=parse_int("steps", options["steps"]) if "steps" in options else None,
            guidance=parse_float("guidance", options["guidance"]) if "guidance" in options else None,
            seed=parse_int("seed", options["seed"]) if "seed" in options else None,
            mode=mode,
            task=Task.EDIT,
            input_image=image,
        )
        return await self.engine.submit(requester, request)

    # ---- the buttons under a result: Reroll, Vary, Edit prompt, Delete ----
    # A result's parameters are public in its message, so anyone who sees it may make it again; only the person who
    # asked for it (or an admin) may delete it.

    async def reroll(self, job_id: str) -> ImagineArgs:
        """The job's prompt and options with a new random seed."""
        job = await self.engine.get_job(job_id)
        return ImagineArgs(job.request.prompt, same_options(job, None))

    @refuses_a_charge
    async def vary(self, requester: Requester, job_id: str, variation: Variation) -> JobQueued:
        """A variation of this job's image: image to image from it (the GPU lane) or an image-prompt request (the
        API), with the same prompt and model and a new seed, as near to it as the variation says."""
        job = await self.engine.get_job(job_id)
        image = await self.engine.result_image(job_id)
        images = self.engine.settings.images
        strength = images.vary_subtle_strength if variation is Variation.SUBTLE else images.vary_strong_strength
        options = same_options(job, None)
        request = ImageRequest(
            prompt=job.request.prompt,
            model=job.request.model,
            aspect_ratio=options.get("aspect"),
            steps=job.request.steps,
            guidance=job.request.guidance,
            mode=job.request.mode,
            task=Task.VARY,
            input_image=image,
            strength=strength,
        )
        return await self.engine.submit(requester, request)

    @refuses_a_charge
    async def edit_result(self, requester: Requester, job_id: str, instruction: str) -> JobQueued:
        """The Edit button: this job's image, edited as the instruction says."""
        image = await self.engine.result_image(job_id)
        return await self.edit(requester, image, instruction)

    async def edited_prompt(self, job_id: str, prompt: str) -> ImagineArgs:
        """A new prompt with the job's own seed and options."""
        job = await self.engine.get_job(job_id)
        return ImagineArgs(prompt, same_options(job, job.request.seed))

    async def deletable(self, requester: Requester, job_id: str) -> Job:
        """The job under a Delete button, when this requester may delete its result; NotAllowed otherwise."""
        job = await self.engine.get_job(job_id)
        self.engine.ensure_may_delete(requester, job)
        return job

    async def quota(self, requester: Requester) -> str:
        return render.quota_text(await self.engine.quota_view(requester))

    async def cancel(self, requester: Requester, job_id: str) -> JobCancelled:
        if not job_id.strip():
            raise InvalidRequest("say which job to cancel: /cancel JOB_ID (see /queue)", field="job")
        return await self.engine.cancel(requester, job_id)

    async def queue(self, requester: Requester) -> str:
        summary = await self.engine.queue(requester)
        lines = [
            "Queue: "
            + ", ".join(
                f"{render.backend_name(kind)} {summary.queued[kind]} waiting / {summary.running[kind]} running"
                for kind in BackendKind
            )
        ]
        if summary.mine:
            lines.append("Your jobs:")
            lines += [
                f"  {job.id} {job.state.value} on {job.backend.value}: "
                f"{render.shown(job.request.prompt[:60], self.safe)}"
                for job in summary.mine
            ]
        else:
            lines.append("You have no jobs waiting or running.")
        return "\n".join(lines)

    async def job(self, requester: Requester, job_id: str) -> str:
        job = await self.engine.job(requester, job_id)
        style = self.engine.settings.styles.get(job.request.style) if job.request.style else None
        return render.job_text(job, self.model_display(job.request.model), self.safe, style)

    @refuses_a_charge
    async def decide_appeal(self, actor: Requester, appeal_id: str, allow: bool, reason: str = "") -> Appeal:
        """An admin's Allow and run (the request runs for its requester) or Keep refused (with `reason`, told to the
        requester), from any front-end."""
        if allow:
            appeal, queued = await self.engine.allow_appeal(actor, appeal_id)
            log.info("appeal %s allowed by %s: job %s", appeal.id, actor.user_key, queued.job_id)
        else:
            appeal = await self.engine.deny_appeal(actor, appeal_id, reason)
            log.info("appeal %s kept refused by %s", appeal.id, actor.user_key)
        return appeal

    def styles(self) -> str:
        models = {name: model.display_name for name, model in self.engine.settings.models.items()}
        return render.styles_text(self.engine.settings.styles, models)

    async def settings(self, requester: Requester, name: str | None, value: str | None) -> str:
        if name and value:
            current = await self.engine.set_user_setting(requester, name.lower(), value.lower())
        elif name or value:
            raise InvalidRequest("use /settings NAME VALUE, e.g. /settings model dev")
        else:
            current = await self.engine.user_settings(requester)
        shown = ", ".join(f"{k}={v}" for k, v in sorted(current.items())) or "none (server defaults)"
        return f"Your defaults: {shown}"

    async def report(self, requester: Requester) -> ChartReply:
        """The last 30 days as a PNG chart and a short summary."""
        chart = await self.engine.report(requester)
        return ChartReply(chart.summary, chart.png, f"flux-bot-report-{chart.last_day}.png")

    async def admin(self, requester: Requester, text: str) -> str:
        """The admin commands as text, shared by the console, Slack and the CLI (`report`, a chart, is separate)."""
        try:
            words = shlex.split(text)
        except ValueError as exc:
            raise InvalidRequest(f"could not read that command ({exc}); {ADMIN_USAGE}") from exc
        self.engine.require_admin(requester, words[0] if words else "admin")
        if not words:
            raise InvalidRequest(ADMIN_USAGE)
        engine = self.engine
        # Command words are case-insensitive; user ids are not (Slack's are upper case).
        keywords = 2 if words[0].lower() == "quota" else 1
        match [w.lower() if i < keywords else w for i, w in enumerate(words)]:
            case ["quota", "show", user]:
                return render.quota_text(await engine.admin_quota_show(requester, self._user(requester, user)))
            case ["quota", "set", user, limit, value]:
                view = await engine.admin_quota_set(requester, self._user(requester, user), limit.lower(), value)
                ahead = "" if view.seen else " It applies from their first request."
                return f"Limit set.{ahead}\n" + render.quota_text(view)
            case ["quota", "grant", user, resource, value]:
                kind, amount = parse_grant(resource, value)
                view = await engine.admin_quota_grant(requester, self._user(requester, user), kind, amount)
                return f"Granted {render.amount(kind, amount)}.\n" + render.quota_text(view)
            case ["quota", "reset", user]:
                view = await engine.admin_quota_reset(requester, self._user(requester, user))
                return "Usage for the current periods reset.\n" + render.quota_text(view)
            case ["spend"] | ["spend", _]:
                month = words[1] if len(words) > 1 else None
                if month is not None and not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", month):
                    raise InvalidRequest(f"month must look like 2026-11, not {month!r}", field="month")
                shown_month, rows = await engine.admin_spend(requester, month)
                return render.spend_text(shown_month, rows)
            case ["credits"]:
                return f"BFL credits left: {format_usd(await engine.admin_credits(requester))}"
            case ["pause", kind] | ["resume", kind]:
                backend = _backend(kind)
                await engine.admin_pause(requester, backend, words[0].lower() == "pause")
                state = "paused" if words[0].lower() == "pause" else "resumed"
                return f"Routing to {render.backend_name(backend)} {state}."
            case ["ban", user] | ["unban", user]:
                banned = words[0].lower() == "ban"
                key = self._user(requester, user)
                seen = await engine.admin_ban(requester, key, banned)
                ahead = "" if seen else f" {key} has not used this bot yet: the ban applies from their first request."
                return f"{key} {'banned' if banned else 'unbanned'}.{ahead}"
            case ["jobs"]:
                jobs = await engine.admin_jobs(requester)
                if not jobs:
                    return "No jobs waiting or running."
                return "\n".join(
                    f"{j.id} {j.state.value} {j.backend.value} {j.requester.user_key}: "
                    f"{render.shown(j.request.prompt[:60], self.safe)}"
                    for j in jobs
                )
            case ["cancel", job_id]:
                cancelled = await engine.cancel(requester, job_id)
                return render.cancelled_text(cancelled)
            case ["review"] | ["review", "list"]:
                held = await engine.held_jobs(requester)
                appeals = await engine.pending_appeals(requester)
                if not held and not appeals:
                    return "No images are held for review and no appeals wait."
                lines = [
                    f"{j.id} {j.requester.user_key} held: {j.review_detail or j.review_reason}: "
                    f"{render.shown(j.request.prompt[:60], self.safe)}"
                    for j in held
                ]
                return "\n".join([*lines, render.appeals_text(appeals, self.safe)] if appeals else lines)
            case ["review", "allow", appeal_id]:
                appeal = await self.decide_appeal(requester, appeal_id, True)
                return (
                    f"Appeal {appeal.id} allowed: job {appeal.job_id} runs for {appeal.requester.user_key}, charged"
                    " as usual, and is posted where they asked."
                )
            case ["review", "deny", appeal_id, *reason]:
                appeal = await self.decide_appeal(requester, appeal_id, False, " ".join(reason))
                return f"Appeal {appeal.id} kept refused ({appeal.reason})."
            case ["styles"] | ["styles", "list"]:
                return render.style_report_text(engine.style_report(requester))
            case ["styles", "reload"]:
                return await engine.reload_styles(requester)
            case ["styles", "check"]:
                return render.style_checks_text(await engine.check_styles(requester))
            case ["takedown", job_id, *reason]:
                if self.take_down is None:
                    raise InvalidRequest("take-downs are not available here: use flux-bot admin takedown", field="job")
                return await self.take_down(requester, job_id, " ".join(reason))
            case ["review", "approve", job_id]:
                job = await engine.approve(requester, job_id)
                return f"Job {job.id} approved: its image goes to {job.requester.user_key} where it was asked for."
            case ["review", ("reject" | "reject-and-ban") as verdict, job_id, *reason]:
                ban = verdict == "reject-and-ban"
                job = await engine.reject(requester, job_id, " ".join(reason), ban=ban)
                ban_note = f" {job.requester.user_key} is banned." if ban else ""
                return f"Job {job.id} rejected: its image is deleted and {job.requester.user_key} is told.{ban_note}"
            case ["audit", *filters]:
                since, action = _audit_filters(filters)
                records = await engine.audit_log(requester, since=since, action=action)
                return render.audit_text(records, self.engine.settings.bot.timezone)
        raise InvalidRequest(f"unknown or incomplete admin command {text.strip()!r}; {ADMIN_USAGE}")

    @staticmethod
    def _user(requester: Requester, user: str) -> str:
        """'alice' (or a mention) means a user of the admin's own platform; 'discord:123' names one explicitly.

        The key is only shaped here; the engine checks it (platform, ids) before anything is written.
        """
        user = user.strip()
        if mention := _MENTION.fullmatch(user):
            user = mention.group(1)
        user = user.lstrip("@")
        if not user:
            raise InvalidRequest("name a user", field="user")
        if ":" in user:
            return user
        if requester.guild_id and requester.platform.value == "slack":
            return f"slack:{requester.guild_id}:{user}"
        return f"{requester.platform.value}:{user}"


def _audit_filters(words: list[str]) -> tuple[float | None, str | None]:
    """`--since 2026-12-01` (UTC midnight) and `--action review` (a name or a family of names)."""
    since: float | None = None
    action: str | None = None
    rest = list(words)
    while rest:
        flag = rest.pop(0)
        if flag not in ("--since", "--action") or not rest:
            raise InvalidRequest(f"audit takes --since YYYY-MM-DD and --action NAME, not {flag!r}", field="audit")
        value = rest.pop(0)
        if flag == "--action":
            action = value
            continue
        try:
            since = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
        except ValueError as exc:
            raise InvalidRequest(f"--since must look like 2026-12-01, not {value!r}", field="since") from exc
    return since, action


def _backend(text: str) -> BackendKind:
    try:
        return BackendKind(text.lower())
    except ValueError as exc:
        raise InvalidRequest(f"say local or api, not {text!r}", field="backend") from exc
