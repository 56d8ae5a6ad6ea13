"""Domain types shared by the engine and the front-ends: small, frozen, typed, platform-free.

Money is integer micro-dollars everywhere (1 BFL credit = $0.01 = 10,000 micro-dollars); local GPU time is integer
milliseconds. Nothing here does I/O.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from fractions import Fraction
from typing import Any, Literal

MICROS_PER_DOLLAR = 1_000_000
MICROS_PER_CREDIT = 10_000

MAX_SEED = 2**32 - 1  # FLUX seeds are unsigned 32-bit, on the API and on the GPU lane

# The size each aspect ratio stands for: about one megapixel, inside BFL's side limits below, so a local worker
# warmed on these buckets never meets a new shape and never recompiles in service.
ASPECT_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "9:16": (768, 1344),
    "4:3": (1152, 896),
    "3:4": (896, 1152),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "21:9": (1440, 608),
    "9:21": (608, 1440),
}


@dataclass(frozen=True, slots=True)
class ImageFormat:
    """A format a result image comes in: its name (as BFL's `output_format` spells it), MIME type and file
    extension."""

    name: str
    mime: str
    extension: str


IMAGE_FORMATS = (
    ImageFormat("png", "image/png", "png"),
    ImageFormat("jpeg", "image/jpeg", "jpg"),
    ImageFormat("webp", "image/webp", "webp"),
)
PNG = IMAGE_FORMATS[0]


def image_format(value: str) -> ImageFormat | None:
    """The format that a name, a MIME type or a file extension stands for; None for any other."""
    value = value.lower()
    return next((f for f in IMAGE_FORMATS if value in (f.name, f.mime, f.extension)), None)


# ---- the BFL API's limits: the one source for validation, the BFL client and the chat commands' option ranges ----

BFL_SIDE_MIN = 256  # width and height in pixels on the endpoints that take them...
BFL_SIDE_MAX = 1440
BFL_SIDE_MULTIPLE = 32  # ...in multiples of this
BFL_STEPS_MIN = 1  # steps, on the endpoints that take them
BFL_STEPS_MAX = 50
BFL_GUIDANCE_MIN = 1.5  # guidance, on the endpoints that take it
BFL_GUIDANCE_MAX = 5.0
BFL_WIDEST = Fraction(21, 9)  # aspect ratios, on the endpoints that take one
BFL_TALLEST = Fraction(9, 21)


@dataclass(frozen=True, slots=True)
class EndpointLimits:
    """What one BFL endpoint takes: a width and height or an aspect ratio, and which of steps, guidance and an
    input image (each within the limits above)."""

    sizing: Literal["pixels", "aspect"]
    steps: bool = False
    guidance: bool = False
    input_image: bool = False  # edits it by instruction (Kontext): the image is required
    image_prompt: bool = False  # takes an image to guide a new one (image-guided generation, variations)


BFL_ENDPOINTS: Mapping[str, EndpointLimits] = {
    "flux-dev": EndpointLimits("pixels", steps=True, guidance=True),
    "flux-pro-1.1": EndpointLimits("pixels", image_prompt=True),
    "flux-pro-1.1-ultra": EndpointLimits("aspect", image_prompt=True),
    "flux-kontext-pro": EndpointLimits("aspect", input_image=True),
    "flux-kontext-max": EndpointLimits("aspect", input_image=True),
}


def credits_to_micros(credits: float | int | str | Decimal) -> int:
    """BFL bills in credits (1 credit = $0.01); convert exactly, never through binary floating point."""
    value = Decimal(str(credits)) * MICROS_PER_CREDIT
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def dollars_to_micros(dollars: float | int | str | Decimal) -> int:
    value = Decimal(str(dollars)) * MICROS_PER_DOLLAR
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def format_usd(micros: int) -> str:
    """$0.04, $12.50, $0.0025: cents always shown, sub-cent digits only when they are not zero."""
    sign = "-" if micros < 0 else ""
    dollars = Decimal(abs(micros)) / MICROS_PER_DOLLAR
    text = f"{dollars:.6f}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"{sign}${whole}.{fraction.ljust(2, '0')}"


def format_duration(seconds: float) -> str:
    """A wait or a run as people say it: '12 s' under 90 s, '4 min' under 90 min, else '2 h'.

    Seconds round up, so a wait is never shown shorter than it is; minutes and hours round to the nearest.
    """
    if seconds < 90:
        return f"{math.ceil(seconds)} s"
    if seconds < 90 * 60:
        return f"{math.floor(seconds / 60 + 0.5)} min"
    return f"{math.floor(seconds / 3600 + 0.5)} h"


def new_job_id(prefix: str = "j") -> str:
    """Short enough to type, time-ordered, unguessable: 'j' + 8 base-36 digits of milliseconds + 8 random hex digits.

    8 digits wrap only after 89 years, and 32 random bits make two ids of one millisecond collide once in about
    4 billion pairs (6 + 4 digits would wrap monthly and collide every few minutes at 1,000 jobs/s).
    """
    stamp = int(time.time() * 1000) % 36**8
    digits = ""
    for _ in range(8):
        stamp, rest = divmod(stamp, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[rest] + digits
    return f"{prefix}{digits}{secrets.token_hex(4)}"


def new_appeal_id() -> str:
    """An appeal's id: shaped as a job's, with 'a' first so the two are never mistaken for each other."""
    return new_job_id("a")


class Task(StrEnum):
    """What a job makes of its input image, if it has one."""

    GENERATE = "generate"  # a new image from the prompt (guided by the input image, where one is given)
    EDIT = "edit"  # the input image changed as the prompt (an instruction) says: Kontext
    VARY = "vary"  # a variation of the input image (a result), `strength` from 0 (the same) to 1 (unrelated)


class Mode(StrEnum):
    AUTO = "auto"
    FAST = "fast"  # the API first
    RELAX = "relax"  # the local GPU only


class Platform(StrEnum):
    CONSOLE = "console"
    DISCORD = "discord"
    SLACK = "slack"


class BackendKind(StrEnum):
    LOCAL = "local"
    API = "api"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class Resource(StrEnum):
    """What a ledger line counts. Each resource has one calendar period for its limits."""

    IMAGES = "images"  # per day
    GPU_MS = "gpu_ms"  # per day
    USD_MICROS = "usd_micros"  # per month

    @property
    def period(self) -> Period:
        return Period.MONTH if self is Resource.USD_MICROS else Period.DAY


class Period(StrEnum):
    DAY = "day"
    MONTH = "month"


class FailureReason(StrEnum):
    OOM = "oom"
    CRASH = "crash"
    TIMEOUT = "timeout"
    HUNG = "hung"
    HOST_LOST = "host_lost"  # a remote GPU host stopped answering for a job it held (heartbeat or lease ended)
    MODERATED = "moderated"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    BAD_REQUEST = "bad_request"
    OUT_OF_CREDITS = "out_of_credits"
    AUTH = "auth"
    TASK_NOT_FOUND = "task_not_found"
    DOWNLOAD_FAILED = "download_failed"
    INTERRUPTED = "interrupted"
    INTERNAL = "internal"
    IMAGE_REMOVED = "image_removed"  # made, but deleted from the store (Delete, retention) before it was delivered


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """What the user asked for, after the adapter parsed it. Unset options take the model's defaults."""

    prompt: str
    model: str
    width: int | None = None
    height: int | None = None
    aspect_ratio: str | None = None  # "16:9"; turned into width/height (or sent as-is to ultra/kontext)
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    mode: Mode = Mode.AUTO
    task: Task = Task.GENERATE
    input_image: bytes | None = None  # as downloaded by the adapter: the engine checks it before anything else
    strength: float | None = None  # VARY: how far from the input (config's subtle or strong when unset)
    style: str | None = None  # a [styles.NAME] preset; None: the user's default style, if any, else none


@dataclass(frozen=True, slots=True)
class Requester:
    """Who asked, in platform-neutral terms. `user_key` is the identity that quotas and jobs key on."""

    platform: Platform
    user_id: str
    guild_id: str | None = None  # Discord guild or Slack workspace (team id)
    channel_id: str | None = None
    roles: tuple[str, ...] = ()
    is_admin: bool = False
    display_name: str | None = None
    age_restricted: bool = False  # the channel is for adults (Discord's age-restricted flag, [review] Slack channels)

    @property
    def user_key(self) -> str:
        # Slack user ids are only unique within a workspace; Discord and console ids are global to the platform.
        if self.platform is Platform.SLACK:
            return f"slack:{self.guild_id}:{self.user_id}"
        return f"{self.platform.value}:{self.user_id}"

    @property
    def guild_key(self) -> str | None:
        return f"{self.platform.value}:{self.guild_id}" if self.guild_id else None


@dataclass(frozen=True, slots=True)
class ResolvedRequest:
    """An ImageRequest with every option filled in and checked against the model's limits."""

    prompt: str
    model: str
    width: int
    height: int
    aspect_ratio: str
    steps: int
    guidance: float | None
    seed: int
    mode: Mode
    task: Task = Task.GENERATE
    input_image: str | None = None  # the sha256 of the stored input (engine/inputs.py)
    strength: float | None = None
    style: str | None = None  # the [styles.NAME] it runs with (its adapters, if any, on the GPU lane)
    # The style's template filled with the prompt; empty when there is no style. `prompt` stays the user's text.
    styled_prompt: str = ""

    @property
    def for_model(self) -> str:
        """The text the model receives: the style's template around the user's prompt, or the prompt as typed."""
        return self.styled_prompt or self.prompt

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1_000_000


@dataclass(frozen=True, slots=True)
class BackendStatus:
    """What the router knows of one backend at the moment of a decision, for a new job of one shape.

    `wait_s` is the time until that job would start (the running jobs' remaining time and the jobs ahead of it,
    spread over the lane's slots), `run_s` its own generation time; `eta_s`, the time until its image, is their sum.
    """

    kind: BackendKind
    healthy: bool
    paused: bool = False
    wait_s: float = 0.0
    in_flight: int = 0
    capacity: int = 1
    detail: str = ""
    run_s: float = 0.0
    ahead: int = 0  # queued jobs that would start before it
    serves_model: bool = True  # False: no worker of this lane runs the job's model (an edit model without weights)

    @property
    def eta_s(self) -> float:
        return self.wait_s + self.run_s

    @property
    def available(self) -> bool:
        return self.healthy and not self.paused


@dataclass(frozen=True, slots=True)
class BudgetRoom:
    """How much the requester may still spend: the smallest room across every limit that applies (None = no limit)."""

    api_micros: int | None
    gpu_ms: int | None
    images: int | None
    api_budget: str | None = None  # the name of a shared budget (server's, whole bot's) that leaves api_micros


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What this bot can offer right now, so advice in messages fits it (never "use the GPU" on a bot without one)."""

    has_local: bool  # a GPU lane is configured and routing may use it
    local_paused: bool  # ...but an admin has paused it
    has_api: bool  # the BFL API is configured (with a key) and routing may use it
    api_paused: bool  # ...but an admin has paused it

    @property
    def local_usable(self) -> bool:
        return self.has_local and not self.local_paused

    @property
    def api_usable(self) -> bool:
        return self.has_api and not self.api_paused


@dataclass(frozen=True, slots=True)
class RouteDecision:
    backend: BackendKind
    reason: str
    estimated_cost_micros: int = 0  # API only; local jobs cost GPU time, not money
    estimated_gpu_ms: int = 0  # local only
    eta_s: float = 0.0  # seconds until the image: wait_s + the job's own run
    wait_s: float = 0.0  # seconds until the job starts


@dataclass(frozen=True, slots=True)
class ResumeToken:
    """How to continue a job handed to something remote (BFL: its task), stored with the job before any wait.

    `state` is the backend's own JSON, opaque to the store and the scheduler. `billed_micros` is what the remote
    bills for the job whatever happens from now on, and `billing` says so for people ("BFL bills its task 1f2e"):
    so a job whose backend is gone after a restart still ends with its charge posted and explained.
    """

    state: str
    billed_micros: int = 0
    billing: str = ""

    def to_json(self) -> str:
        """The stored form: the state nested as JSON, so that an operator can read it with SQLite's json_extract."""
        stored = {"state": json.loads(self.state), "billed_micros": self.billed_micros, "billing": self.billing}
        return json.dumps(stored, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ResumeToken:
        """The token stored as `text`; ValueError when it is not one."""
        stored = json.loads(text)
        if not isinstance(stored, dict) or "state" not in stored:
            raise ValueError(f"not a resume token: {text[:80]!r}")
        billed, billing = stored.get("billed_micros", 0), stored.get("billing", "")
        if not isinstance(billed, int) or isinstance(billed, bool) or not isinstance(billing, str):
            raise ValueError(f"not a resume token: {text[:80]!r}")
        return cls(json.dumps(stored["state"], separators=(",", ":")), billed, billing)


@dataclass(frozen=True, slots=True)
class BackendJob:
    """What a backend is handed: the job id (for logs), the resolved request and, after a restart, its token."""

    job_id: str
    request: ResolvedRequest
    resume: ResumeToken | None = None
    attempt: int = 1  # which run of the job this is (1 for the first): a remote tells a retry from a repeat by it
    input_image: bytes | None = None  # the stored input (request.input_image names it), read for the backend


# ---- events a backend yields while it works on a job ----


@dataclass(frozen=True, slots=True)
class Started:
    backend: BackendKind
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Submitted:
    """Something remote accepted the job (it may now bill for it); the token continues it after a restart."""

    resume: ResumeToken


@dataclass(frozen=True, slots=True)
class Progress:
    step: int
    total: int
    preview_png: bytes | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    image: bytes
    mime: str
    seed: int
    cost_micros: int = 0
    gpu_ms: int = 0


@dataclass(frozen=True, slots=True)
class Failed:
    reason: FailureReason
    detail: str
    charged_micros: int = 0  # what the provider bills for this failure (a timed-out BFL task still costs)
    retryable: bool = False
    gpu_ms: int = 0


BackendEvent = Started | Submitted | Progress | Finished | Failed


@dataclass(frozen=True, slots=True)
class GpuHostView:
    """One GPU host of the lane as its latest heartbeat tells it, for doctor and the admin views."""

    name: str
    version: str
    models: tuple[str, ...]
    slots: int
    busy: int
    recycles: int
    compatible: bool  # speaks this bot's protocol version; an incompatible host gets no jobs


@dataclass(frozen=True, slots=True)
class GpuLaneReport:
    """What the NATS server holds of the GPU lane: `problem` when it cannot be reached (then nothing else is
    known), the lane's streams and buckets that are not there yet, and the hosts whose heartbeats are."""

    url: str
    problem: str | None = None
    missing: tuple[str, ...] = ()
    hosts: tuple[GpuHostView, ...] = ()


# ---- events the engine sends to front-ends ----


@dataclass(frozen=True, slots=True)
class JobQueued:
    job_id: str
    position: int  # queued jobs of its lane that start before it
    eta_s: float  # seconds until the image (wait_s + its own run)
    route: RouteDecision
    wait_s: float = 0.0  # seconds until it starts: the same wait as the route's reason


@dataclass(frozen=True, slots=True)
class JobWaiting:
    """A queued job's place and ETA after the queue moved (the engine throttles these)."""

    job_id: str
    position: int
    wait_s: float
    eta_s: float


@dataclass(frozen=True, slots=True)
class JobRerouted:
    job_id: str
    route: RouteDecision
    after: FailureReason


@dataclass(frozen=True, slots=True)
class JobStarted:
    job_id: str
    backend: BackendKind


@dataclass(frozen=True, slots=True)
class JobProgress:
    job_id: str
    step: int
    total: int
    preview_png: bytes | None = None


@dataclass(frozen=True, slots=True)
class JobDone:
    job_id: str
    image: bytes
    mime: str
    seed: int
    backend: BackendKind
    cost_micros: int
    seconds: float


@dataclass(frozen=True, slots=True)
class JobFailed:
    job_id: str
    reason: FailureReason
    detail: str
    charged_micros: int


@dataclass(frozen=True, slots=True)
class JobCancelled:
    job_id: str
    charged_micros: int


@dataclass(frozen=True, slots=True)
class JobHeld:
    """The image was made (and charged) but waits for an admin's review before anyone sees it; `reason` is in
    general terms, for the requester."""

    job_id: str
    reason: str
    charged_micros: int


@dataclass(frozen=True, slots=True)
class JobRejected:
    """An admin rejected a held image: it is deleted, never shown; what it cost stays charged (it was made)."""

    job_id: str
    reason: str
    charged_micros: int


JobEvent = (
    JobQueued
    | JobWaiting
    | JobRerouted
    | JobStarted
    | JobProgress
    | JobDone
    | JobFailed
    | JobCancelled
    | JobHeld
    | JobRejected
)
TERMINAL_EVENTS = (JobDone, JobFailed, JobCancelled, JobHeld, JobRejected)


class Review(StrEnum):
    """A done job's review: none needed (delivered as it is), held for an admin, or decided."""

    NONE = ""
    HELD = "held"
    APPROVED = "approved"
    REJECTED = "rejected"


@dataclass(slots=True)
class Job:
    """A job as stored. Mutable only inside the scheduler and store; everyone else gets copies from the store."""

    id: str
    requester: Requester
    request: ResolvedRequest
    state: JobState
    backend: BackendKind
    reason: str
    created_at: float
    attempts: int = 0
    local_attempts: int = 0
    estimated_cost_micros: int = 0
    estimated_gpu_ms: int = 0
    resume: ResumeToken | None = None  # set once the job's backend has handed it to something remote
    started_at: float | None = None
    finished_at: float | None = None
    failure_reason: FailureReason | None = None
    error: str | None = None
    cost_micros: int = 0
    result_path: str | None = None
    delivered: bool = False
    review: Review = Review.NONE
    review_reason: str | None = None  # why it was held, in general terms (for the requester)
    review_detail: str | None = None  # and exactly (for the admins)
    taken_down: str | None = None  # the reason, once an admin took its image down everywhere it was posted


@dataclass(frozen=True, slots=True)
class ReportChart:
    """The admin report: a short summary of the last 30 days and the PNG chart it describes."""

    summary: str
    png: bytes
    last_day: date


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A user as stored: their roles seen last, a ban, an admin's limit overrides and their own defaults."""

    user_key: str
    display_name: str | None
    roles: tuple[str, ...]
    banned: bool
    overrides: dict[str, Any]
    settings: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Posting:
    """One place a job's image was posted: a Discord message, or a Slack message and its file."""

    job_id: str
    platform: Platform
    channel_id: str
    message_id: str | None = None  # Discord: the message id; Slack: the message ts
    file_id: str | None = None  # Slack: the uploaded file


@dataclass(frozen=True, slots=True)
class StyleServing:
    """A configured style, and where its LoRA adapters are loaded now (`/admin styles`)."""

    name: str
    display_name: str
    adapters: str  # "sha256:... x0.8, ..."; "" for a template-only style, which runs anywhere
    # "in-host worker 0 (1 slot)", "GPU host gpu-a (2 slots)"; None where this process has no GPU lane (the CLI)
    serving: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class StyleCheck:
    """`flux-bot admin styles check` for one style: its files and hashes, then a test render on the GPU lane."""

    name: str
    problems: tuple[str, ...]  # a missing file, a wrong hash: empty when every adapter checked out
    job_id: str | None = None  # the test render, when the files were fine
    rendered: str = ""  # how the render ended: "done in 12.3 s", or why it did not


class AppealState(StrEnum):
    """A prompt the policy refused: appealable (nobody appealed yet), waiting for an admin, or decided."""

    REFUSED = "refused"
    PENDING = "pending"
    ALLOWED = "allowed"
    DENIED = "denied"


@dataclass(frozen=True, slots=True)
class Appeal:
    """A refusal of the prompt policy that the requester may appeal; an admin who allows it runs the request for
    them (charged as any job). `request` is what they asked, its input image (if any) stored as `input_image`."""

    id: str
    requester: Requester
    request: ImageRequest
    rule: str
    matched: str | None
    state: AppealState
    created_at: float
    input_image: str | None = None  # the sha256 of the stored input, for an edit or a guided image
    decided_by: str | None = None
    reason: str | None = None  # a denial's reason, for the requester
    job_id: str | None = None  # the job an allowed appeal ran


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """A stored audit line, as `flux-bot admin audit` prints it."""

    at: float
    actor: str
    action: str
    subject: str | None
    job_id: str | None
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One line of the audit log: who did what, to whom or which job, with details."""

    actor: str
    action: str
    subject: str | None = None
    job_id: str | None = None
    detail: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class SpendRow:
    """One user's use of one backend in a month: images made, money posted, money still pending."""

    user_key: str
    backend: str
    images: int
    usd_micros: int
    pending_usd_micros: int
