"""config.toml + environment -> typed, validated settings, loaded once and passed explicitly.

Secrets never come from the file: only from the environment (`Secrets`). Any problem stops start-up with one
`ConfigError` naming the file, the key and the problem.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.errors import ConfigError
from engine.models import BFL_GUIDANCE_MAX, BFL_GUIDANCE_MIN, BFL_STEPS_MAX, credits_to_micros, dollars_to_micros

CONFIG_ENV = "FLUX_BOT_CONFIG"
LOCAL_CONFIG = Path("config.toml")  # in the working directory: the file next to the README, where people edit it
SYSTEM_CONFIG = Path("/etc/flux-bot/config.toml")
DEMO_MODEL = "demo"  # [local] model = "demo": the built-in tiny model with random weights, asked for explicitly
DEFAULT_BFL_URL = "https://api.bfl.ai"
UNIX_PATH_MAX = 107  # bytes of a Unix socket path that fit sockaddr_un's sun_path (108, NUL included)

ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9", "9:21")


# TOML values arrive with their real types, so validation is strict: `true` is not a number, `1` not a boolean,
# "3000" not a port. Three kinds of value have no TOML type of their own and are converted here, strictly too.


def _as_tuple(value: Any) -> Any:
    """A TOML array (a list) for a tuple field; the items are then validated strictly."""
    return tuple(value) if isinstance(value, list) else value


def _as_path(value: Any) -> Any:
    if isinstance(value, str):
        return Path(value)
    if not isinstance(value, Path):
        raise ValueError(f"expected a path in quotes, got {_toml_value(value)}")
    return value


def _as_decimal(value: Any) -> Any:
    """Money and credits: a TOML number, or a decimal string ("2.50") for an exact value."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError(f"expected a number such as 2.50, got {_toml_value(value)}")
    try:
        number = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except InvalidOperation as exc:
        raise ValueError(f"expected a number such as 2.50, got {_toml_value(value)}") from exc
    if not number.is_finite():
        raise ValueError(f"expected a finite number, got {_toml_value(value)}")
    return number


Strings = Annotated[tuple[str, ...], BeforeValidator(_as_tuple)]
Ints = Annotated[tuple[int, ...], BeforeValidator(_as_tuple)]
FilePath = Annotated[Path, BeforeValidator(_as_path)]
FilePaths = Annotated[tuple[FilePath, ...], BeforeValidator(_as_tuple)]
Credits = Annotated[Decimal, BeforeValidator(_as_decimal)]
Dollars = Annotated[Decimal, BeforeValidator(_as_decimal), Field(ge=0, max_digits=12, decimal_places=6)]


class _Section(BaseModel):
    # A typo in config.toml is an error, not a silently ignored key; a value of the wrong type is one too.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class BotSettings(_Section):
    state_dir: FilePath = Path("state")
    database: str = "flux-bot.db"
    timezone: str = "UTC"
    keep_images_days: int = Field(30, ge=0)  # results older than this are deleted from images_dir; 0 = kept forever

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown time zone {value!r} (use an IANA name such as 'UTC' or 'Europe/Berlin')"
            ) from exc
        return value

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def database_path(self) -> Path:
        return self.state_dir / self.database

    @property
    def images_dir(self) -> Path:
        # Results are kept on disk so an image can still be delivered after a restart.
        return self.state_dir / "images"

    @property
    def inputs_dir(self) -> Path:
        """Input images (edits, variations), stored by their sha256 (engine/inputs.py)."""
        return self.state_dir / "inputs"


class AdminSettings(_Section):
    user_ids: Strings = ()
    role_ids: Strings = ()


class RoutingSettings(_Section):
    max_local_wait_s: float = Field(15.0, ge=0)  # measured with bench/routing_sim.py: see PERFORMANCE.md
    commercial: bool = False
    default_model: str = "schnell"
    local_enabled: bool = True
    api_enabled: bool = True


class SchedulerSettings(_Section):
    max_running_per_user: int = Field(1, ge=1)
    local_retries: int = Field(1, ge=0, le=5)


class SlackSettings(_Section):
    """The Slack front-end: HTTP mode's listener (Socket Mode, with SLACK_APP_TOKEN, needs none) and command names."""

    host: str = "127.0.0.1"
    port: int = Field(3000, ge=0, le=65535)
    path: str = "/slack/events"
    workspace_admins: bool = False  # Slack workspace admins and owners (users.info) are flux-bot admins too
    command_imagine: str = "/imagine"
    command_quota: str = "/imagine-quota"
    command_cancel: str = "/imagine-cancel"
    command_admin: str = "/imagine-admin"
    command_queue: str = "/imagine-queue"
    command_job: str = "/imagine-job"
    command_settings: str = "/imagine-settings"
    command_styles: str = "/imagine-styles"


class OpsSettings(_Section):
    """The operator's side: health and metrics endpoint, scheduled backups, alerts to an admin channel."""

    http_host: str = "127.0.0.1"
    http_port: int = Field(9464, ge=0, le=65535)  # 0 = no /healthz and /metrics endpoint
    backup_every_hours: float = Field(24.0, ge=0)  # 0 = no scheduled backups
    backups_keep: int = Field(7, ge=1)
    alert_discord_channel_id: str = ""  # where spend and failure alerts go ("" = none on Discord)
    alert_slack_channel_id: str = ""  # ("" = none on Slack)
    spend_alert_percents: Ints = (50, 80, 100)
    failure_alert_rate: float = Field(0.2, ge=0, le=1)  # failed share of the last hour's ended jobs
    failure_alert_min_jobs: int = Field(10, ge=1)  # ended jobs in the hour before the failure rate counts


class BflSettings(_Section):
    api_url: str = DEFAULT_BFL_URL
    max_concurrency: int = Field(20, ge=1, le=24)
    request_timeout_s: float = Field(30.0, gt=0)
    total_timeout_s: float = Field(120.0, gt=0)  # ~7x the API's mean; a task past it rarely finishes
    poll_interval_s: float = Field(0.5, gt=0)
    poll_max_interval_s: float = Field(5.0, gt=0)
    max_retries: int = Field(3, ge=0, le=10)
    safety_tolerance: int = Field(2, ge=0, le=6)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    seconds_estimate: float = Field(18.0, gt=0)
    task_not_found_grace_s: float = Field(30.0, ge=0)  # "Task not found" this soon after a submit: keep polling


class LocalSettings(_Section):
    """The local FLUX.1 worker(s): one process per GPU, supervised by engine/backends/local/supervisor.py."""

    # A folder or a Hugging Face id. "demo" = the built-in tiny model (random weights); "" = none: the demo model
    # only while nothing real is configured (engine/backends/factory.py), else no local generation.
    model: str = ""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: str = "auto"  # "auto" = cuda when present, else cpu
    gpus: Ints = ()  # one worker per index (CUDA_VISIBLE_DEVICES); empty = one worker on `device`
    resolution_buckets: Strings = (
        "1024x1024",
        "1344x768",
        "768x1344",
        "1152x896",
        "896x1152",
        "1216x832",
        "832x1216",
        "1440x608",
        "608x1440",
    )
    warmup: bool = True
    compile: bool = False
    fp8: bool = False
    fuse_qkv: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    recycle_after_jobs: int = Field(500, ge=1)
    max_reserved_slack_mb: int = Field(4096, ge=0)
    max_rss_growth_mb: int = Field(4096, ge=0)
    job_timeout_s: float = Field(600.0, gt=0)
    step_timeout_s: float = Field(120.0, gt=0)
    start_timeout_s: float = Field(600.0, gt=0)
    # A cancelled job's worker must stop it and answer within this (one step plus a VAE decode on the slowest card
    # here), else it is killed and restarted, which reloads the model.
    cancel_timeout_s: float = Field(10.0, gt=0)
    preview_every: int = Field(4, ge=0)
    # FLUX.1 Kontext [dev] weights (a folder or a Hugging Face id) for edits on the GPU lane: the workers load its
    # transformer beside the model's and share the rest (text encoders, VAE). "" = no local edits (kontext-dev
    # off here); the demo model edits with its own tiny weights.
    kontext_model: str = ""
    # Workers run as their own systemd units (flux-bot-worker@N, `flux-bot worker --listen PATH`): the supervisor
    # attaches to these sockets instead of spawning workers, and the units' own flags choose model and switches.
    worker_sockets: FilePaths = ()

    @field_validator("worker_sockets")
    @classmethod
    def _usable_sockets(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        for path in value:
            if not path.is_absolute():
                raise ValueError(f"{path} is not an absolute path (e.g. /run/flux-bot/gpu0.sock)")
            if len(os.fsencode(path)) > UNIX_PATH_MAX:
                raise ValueError(f"{path} is longer than a Unix socket address allows ({UNIX_PATH_MAX} bytes)")
        if len(set(value)) != len(value):
            raise ValueError("a socket is listed twice")
        return value

    @model_validator(mode="after")
    def _gpus_match_sockets(self) -> LocalSettings:
        # With sockets, `gpus` only says which GPU each socket's worker uses, for the temperature readings.
        if self.worker_sockets and self.gpus and len(self.gpus) != len(self.worker_sockets):
            raise ValueError("gpus must name one GPU per worker socket (or be empty)")
        return self


class ImageSettings(_Section):
    """Input images (engine/inputs.py) and what the result buttons make of a result."""

    max_input_mb: float = Field(20.0, gt=0, le=100)
    max_input_megapixels: float = Field(40.0, gt=0, le=200)
    edit_model: str = "kontext-pro"  # what /edit and the Edit buttons use unless the user names another edit model
    # Vary (subtle / strong): image-to-image from the result at this strength (0 = the same image, 1 = unrelated).
    vary_subtle_strength: float = Field(0.35, gt=0, le=1)
    vary_strong_strength: float = Field(0.7, gt=0, le=1)


class ReviewSettings(_Section):
    """The review step after generation (engine/review.py): what holds an image for an admin, and where they see it."""

    # Names and trademarks the operator wants a person to look at: the image is made, then held (never blocked).
    phrases: Strings = ()
    classifier: Literal["none", "nudenet"] = "none"  # nudenet: the optional `review` extra (AGPL-3.0)
    # A classifier label at or above its score holds the image (outside age-restricted channels).
    thresholds: dict[str, float] = Field(
        default_factory=lambda: {
            "FEMALE_BREAST_EXPOSED": 0.5,
            "FEMALE_GENITALIA_EXPOSED": 0.4,
            "MALE_GENITALIA_EXPOSED": 0.4,
            "BUTTOCKS_EXPOSED": 0.5,
            "ANUS_EXPOSED": 0.4,
        }
    )
    discord_channel_id: str = ""  # where held images wait for an admin ("" = none on Discord)
    slack_channel_id: str = ""  # ("" = none on Slack)
    age_restricted_slack_channels: Strings = ()  # Slack channels treated as Discord's age-restricted ones
    # A prompt refused for a blocked word offers an Appeal button; an admin who allows it runs it, charged as usual.
    appeals: bool = True

    @field_validator("thresholds")
    @classmethod
    def _scores(cls, value: dict[str, float]) -> dict[str, float]:
        for label, score in value.items():
            if not 0 < score <= 1:
                raise ValueError(f"{label}: a score threshold is above 0 and at most 1, got {score}")
        return value


class NatsSettings(_Section):
    """The GPU lane across hosts (engine/backends/nats.py, engine/gpu_host.py): where the NATS server is and what
    the lane's streams and buckets are called. Credentials and TLS files come only from the environment
    (`NatsCredentials`). An empty `url` means no remote GPU hosts."""

    url: str = ""  # e.g. "nats://gpu-broker.internal:4222"; "tls://..." for TLS
    jobs_stream: str = "FLUX_JOBS"
    results_stream: str = "FLUX_RESULTS"
    images_bucket: str = "flux-images"
    hosts_bucket: str = "flux-hosts"
    # A job a host holds stays leased this long after the host's last sign of it (progress, heartbeat); past it,
    # the job is lost (retried or failed over, never charged). Hosts extend it on every progress event.
    ack_wait_s: float = Field(30.0, gt=0)
    heartbeat_interval_s: float = Field(2.0, gt=0)
    heartbeat_ttl_s: float = Field(10.0, gt=0)  # a host silent this long is gone, and its jobs with it

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, value: str) -> str:
        if value and not value.startswith(("nats://", "tls://", "ws://", "wss://")):
            raise ValueError(f"expected a URL such as nats://broker:4222, got {value!r}")
        if "@" in value.partition("://")[2].partition("/")[0]:
            raise ValueError(
                "credentials in the URL would be a secret in config.toml: set NATS_USER and NATS_PASSWORD "
                "(or NATS_TOKEN) in the environment instead"
            )
        return value

    @model_validator(mode="after")
    def _ttl_covers_beats(self) -> NatsSettings:
        if self.heartbeat_ttl_s < 2 * self.heartbeat_interval_s:
            raise ValueError("heartbeat_ttl_s must be at least twice heartbeat_interval_s (one lost beat is normal)")
        return self


class ModelSettings(_Section):
    display_name: str
    local: bool = False
    api_endpoint: str | None = None
    non_commercial: bool = False
    price_credits: Credits = Field(Decimal(0), ge=0)
    default_steps: int = Field(28, ge=1)
    max_steps: int = Field(BFL_STEPS_MAX, ge=1)
    default_guidance: float | None = None  # None: the model takes no guidance, and a value is refused
    min_guidance: float = BFL_GUIDANCE_MIN
    max_guidance: float = BFL_GUIDANCE_MAX
    sizing: Literal["pixels", "aspect"] = "pixels"
    megapixels: float = Field(1.0, gt=0, le=4.0)
    needs_input_image: bool = False
    local_seconds_per_step: float = Field(0.25, gt=0)

    @model_validator(mode="after")
    def _runs_somewhere(self) -> ModelSettings:
        if not self.local and not self.api_endpoint:
            raise ValueError("a model must run locally (local = true) or name an api_endpoint")
        if self.default_steps > self.max_steps:
            raise ValueError("default_steps is larger than max_steps")
        return self

    @property
    def price_micros(self) -> int:
        return credits_to_micros(self.price_credits)


class StyleAdapter(_Section):
    """One LoRA adapter of a style: a .safetensors file, its sha256 (checked before it is loaded) and its weight."""

    # A local path, or "hf:OWNER/REPO/FILE.safetensors" for a file already in the Hugging Face cache (no download:
    # GPU hosts run offline; fetch it once with `huggingface-cli download OWNER/REPO FILE`).
    file: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weight: float = Field(1.0, ge=-4.0, le=4.0)


class StyleSettings(_Section):
    """[styles.NAME]: a preset an admin chose and tested. A style without adapters is only a prompt template and
    defaults (it runs on the API too); one with adapters runs on the GPU lane only, where workers load them at start."""

    display_name: str = Field(min_length=1)
    description: str = ""
    template: str = "{prompt}"  # the text the model receives; {prompt} is the user's prompt as typed
    model: str | None = None  # the default model for this style (else the user's, then routing.default_model)
    steps: int | None = Field(None, ge=1)
    guidance: float | None = None
    aspect: str | None = None  # "16:9"
    models: Strings = ()  # the models it may run with (empty: any model that can run its adapters)
    adapters: Annotated[tuple[StyleAdapter, ...], BeforeValidator(_as_tuple)] = Field((), max_length=3)
    sample_image: str = ""  # an image URL that /styles shows with the style

    @field_validator("template")
    @classmethod
    def _one_prompt(cls, value: str) -> str:
        if value.count("{prompt}") != 1:
            raise ValueError("the template must contain {prompt} exactly once (where the user's prompt goes)")
        return value

    def apply(self, prompt: str) -> str:
        """The template filled with the user's prompt; other braces in it are left as written."""
        return self.template.replace("{prompt}", prompt)

    @property
    def gpu_only(self) -> bool:
        return bool(self.adapters)

    def adapters_text(self) -> str:
        """'sha256:<hash> x<weight>' per adapter, comma separated: what the PNG and /job say made an image."""
        return ", ".join(f"sha256:{adapter.sha256} x{adapter.weight:g}" for adapter in self.adapters)


class PolicySettings(_Section):
    min_prompt_chars: int = Field(3, ge=1)
    max_prompt_chars: int = Field(1500, ge=1)
    blocked_words: Strings = ()
    allowed_phrases: Strings = ()


class TierSettings(_Section):
    roles: Strings = ()
    images_per_day: int | None = Field(None, ge=0)
    gpu_seconds_per_day: int | None = Field(None, ge=0)
    api_usd_per_month: Dollars | None = None
    concurrent_jobs: int | None = Field(None, ge=1)


class LimitSettings(_Section):
    guild_api_usd_per_month: Dollars | None = None
    global_api_usd_per_month: Dollars | None = None


def _default_models() -> dict[str, ModelSettings]:
    return {
        "schnell": ModelSettings(
            display_name="FLUX.1 [schnell]",
            local=True,
            default_steps=4,
            max_steps=8,
            local_seconds_per_step=0.1,
        ),
        "dev": ModelSettings(
            display_name="FLUX.1 [dev]",
            local=True,
            api_endpoint="flux-dev",
            non_commercial=True,
            price_credits=Decimal("2.5"),
            default_guidance=3.0,
        ),
        "pro": ModelSettings(display_name="FLUX1.1 [pro]", api_endpoint="flux-pro-1.1", price_credits=Decimal(4)),
        "ultra": ModelSettings(
            display_name="FLUX1.1 [pro] ultra",
            api_endpoint="flux-pro-1.1-ultra",
            price_credits=Decimal(6),
            sizing="aspect",
            megapixels=4.0,
        ),
        "kontext-pro": ModelSettings(
            display_name="FLUX.1 Kontext [pro]",
            api_endpoint="flux-kontext-pro",
            price_credits=Decimal(4),
            sizing="aspect",
            needs_input_image=True,
        ),
        "kontext-max": ModelSettings(
            display_name="FLUX.1 Kontext [max]",
            api_endpoint="flux-kontext-max",
            price_credits=Decimal(8),
            sizing="aspect",
            needs_input_image=True,
        ),
        # Its own weights ([local] kontext_model); a non-commercial licence, as [dev].
        "kontext-dev": ModelSettings(
            display_name="FLUX.1 Kontext [dev]",
            local=True,
            non_commercial=True,
            needs_input_image=True,
            default_guidance=2.5,
        ),
    }


_DEFAULT_TIER = TierSettings(
    images_per_day=50, gpu_seconds_per_day=1800, api_usd_per_month=Decimal("2.00"), concurrent_jobs=3
)


class Settings(_Section):
    bot: BotSettings = BotSettings()
    admins: AdminSettings = AdminSettings()
    routing: RoutingSettings = RoutingSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    slack: SlackSettings = SlackSettings()
    ops: OpsSettings = OpsSettings()
    bfl: BflSettings = BflSettings()
    local: LocalSettings = LocalSettings()
    images: ImageSettings = ImageSettings()
    review: ReviewSettings = ReviewSettings()
    nats: NatsSettings = NatsSettings()
    policy: PolicySettings = PolicySettings()
    limits: LimitSettings = LimitSettings()
    models: dict[str, ModelSettings] = Field(default_factory=_default_models)
    tiers: dict[str, TierSettings] = Field(default_factory=lambda: {"default": _DEFAULT_TIER})
    styles: dict[str, StyleSettings] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.routing.default_model not in self.models:
            raise ValueError(f"routing.default_model {self.routing.default_model!r} is not one of [models.*]")
        # A [models.*] table without the edit model means no edits on this bot (/edit then says so).
        edit = self.models.get(self.images.edit_model)
        if edit is not None and not edit.needs_input_image:
            raise ValueError(
                f"images.edit_model {self.images.edit_model!r} does not edit images (needs_input_image = false)"
            )
        if "default" not in self.tiers:
            raise ValueError("[tiers.default] is required: it holds the limits of users with no other tier")
        for name, style in self.styles.items():
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", name):
                raise ValueError(f"[styles.{name}]: a style's name is 1-32 lowercase letters, digits, - or _")
            for model in (*style.models, *([style.model] if style.model else [])):
                if model not in self.models:
                    raise ValueError(f"[styles.{name}] names the model {model!r}, which is not one of [models.*]")
            if style.model and style.models and style.model not in style.models:
                raise ValueError(f"[styles.{name}]: its default model {style.model!r} is not in its models")
            if style.adapters:
                runnable = [m for m in (style.models or tuple(self.models)) if self.models[m].local]
                if not runnable:
                    raise ValueError(
                        f"[styles.{name}] has LoRA adapters, which run on the GPU lane only, but none of its models"
                        " runs there (local = true)"
                    )
        return self


@dataclass(frozen=True)
class NatsCredentials:
    """How to authenticate to the NATS server, from the environment only: a user and password, a token, or an NKey
    seed file; TLS files for a server that asks for (mutual) TLS. repr() never shows a secret."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    nkey_seed_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NatsCredentials:
        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        def path(name: str) -> Path | None:
            value = get(name)
            return Path(value).expanduser() if value else None

        return cls(
            user=get("NATS_USER"),
            password=get("NATS_PASSWORD"),
            token=get("NATS_TOKEN"),
            nkey_seed_file=path("NATS_NKEY_SEED_FILE"),
            tls_ca_file=path("NATS_TLS_CA_FILE"),
            tls_cert_file=path("NATS_TLS_CERT_FILE"),
            tls_key_file=path("NATS_TLS_KEY_FILE"),
        )


@dataclass(frozen=True)
class Secrets:
    """Tokens and keys, from the environment only. repr() never shows a value."""

    discord_token: str | None = field(default=None, repr=False)
    slack_bot_token: str | None = field(default=None, repr=False)
    slack_app_token: str | None = field(default=None, repr=False)
    slack_signing_secret: str | None = field(default=None, repr=False)
    bfl_api_key: str | None = field(default=None, repr=False)
    nats: NatsCredentials = NatsCredentials()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Secrets:
        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        return cls(
            discord_token=get("DISCORD_TOKEN"),
            slack_bot_token=get("SLACK_BOT_TOKEN"),
            slack_app_token=get("SLACK_APP_TOKEN"),
            slack_signing_secret=get("SLACK_SIGNING_SECRET"),
            bfl_api_key=get("BFL_API_KEY"),
            nats=NatsCredentials.from_env(env),
        )

    def values(self) -> tuple[str, ...]:
        """Every secret that is set, so logging can redact them."""
        return tuple(
            v
            for v in (
                self.discord_token,
                self.slack_bot_token,
                self.slack_app_token,
                self.slack_signing_secret,
                self.bfl_api_key,
                self.nats.password,
                self.nats.token,
            )
            if v
        )


_SECRET_KEYS = {
    "token",
    "api_key",
    "key",
    "secret",
    "signing_secret",
    "password",
    "bfl_api_key",
    "discord_token",
}


def _reject_secrets(data: Any, path: str, file: str) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}.{key}" if path else key
            if key.lower() in _SECRET_KEYS or key.lower().endswith(("_token", "_secret", "_key")):
                raise ConfigError(file, where, "secrets are read only from the environment; remove this key")
            _reject_secrets(value, where, file)


_EXPECTED = {
    "bool_type": "true or false",
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "finite_number": "a finite number",
    "string_type": "a string in quotes",
    "tuple_type": "an array such as [1, 2]",
    "dict_type": "a table",
    "model_type": "a table",
}


def _toml_value(value: Any) -> str:
    """The value as it was written in TOML, with its kind: `the boolean true`, `the string "3000"`."""
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {json.dumps(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return repr(value)


def _describe(error: Mapping[str, Any]) -> tuple[str, str]:
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "__root__") or "(top level)"
    message = str(error.get("msg", "invalid value"))
    kind = str(error.get("type"))
    if kind == "extra_forbidden":
        message = "unknown key (check its spelling against the documented config.toml)"
    elif kind in _EXPECTED:
        message = f"expected {_EXPECTED[kind]}, got {_toml_value(error.get('input'))}"
    return where, message.removeprefix("Value error, ")


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Which config file is in use and how it was found; `path` None means the built-in defaults."""

    path: Path | None
    found_by: str

    def describe(self) -> str:
        if self.path is None:
            return f"built-in defaults ({self.found_by})"
        return f"{self.path.resolve()} ({self.found_by})"


def find_config(
    explicit: Path | None,
    env: Mapping[str, str] | None = None,
    *,
    cwd: Path | None = None,
    system: Path = SYSTEM_CONFIG,
) -> ConfigSource:
    """`--config`, then $FLUX_BOT_CONFIG, then ./config.toml, then /etc/flux-bot/config.toml, else the defaults.

    A file named by the option or the variable must exist (loading it says so); the two places searched are used
    only when a file is there.
    """
    env = os.environ if env is None else env
    if explicit is not None:
        return ConfigSource(explicit, "--config")
    if env.get(CONFIG_ENV):
        return ConfigSource(Path(env[CONFIG_ENV]), f"${CONFIG_ENV}")
    local = (cwd or Path.cwd()) / LOCAL_CONFIG
    if local.is_file():
        return ConfigSource(local, f"./{LOCAL_CONFIG}")
    if system.is_file():
        return ConfigSource(system, str(system))
    return ConfigSource(None, f"no --config, ${CONFIG_ENV}, ./{LOCAL_CONFIG} or {system}")


def load_settings(path: Path | None = None, env: Mapping[str, str] | None = None) -> tuple[Settings, Secrets]:
    """Read the file (None: the built-in defaults), apply environment overrides, validate, resolve paths.

    Relative paths in the file are relative to the file's folder (with the built-in defaults: to the working
    directory), wherever the bot is started from. `find_config` chooses the file.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    file = str(path) if path else "(built-in defaults)"
    base_dir = Path.cwd()
    if path is not None:
        try:
            with path.open("rb") as handle:
                raw = tomllib.load(handle)
        except FileNotFoundError as exc:
            raise ConfigError(file, "(file)", "file not found") from exc
        except OSError as exc:
            raise ConfigError(file, "(file)", f"cannot be read ({exc.strerror or exc})") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(file, "(syntax)", str(exc)) from exc
        base_dir = path.resolve().parent
    _reject_secrets(raw, "", file)
    if env.get("BFL_API_URL"):
        raw.setdefault("bfl", {})["api_url"] = env["BFL_API_URL"]
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        where, problem = _describe(exc.errors()[0])
        raise ConfigError(file, where, problem) from exc
    return _relative_to(settings, base_dir), Secrets.from_env(env)


def _relative_to(settings: Settings, base_dir: Path) -> Settings:
    bot = settings.bot.model_copy(update={"state_dir": base_dir / settings.bot.state_dir.expanduser()})
    local = settings.local
    # `[local] model` is a folder or a Hugging Face id ("org/name"): a folder that exists (or an explicit ./ or
    # ../ path) is one, as diffusers decides; an id is left as it is.
    for key in ("model", "kontext_model"):
        weights = getattr(local, key)
        if weights and weights != DEMO_MODEL:
            folder = base_dir / Path(weights).expanduser()
            if weights.startswith(("./", "../")) or folder.is_dir():
                local = local.model_copy(update={key: str(folder)})
    return settings.model_copy(update={"bot": bot, "local": local})


def dollars(value: Decimal | None) -> int | None:
    """A configured dollar limit as micro-dollars (None stays None: no limit)."""
    return None if value is None else dollars_to_micros(value)
