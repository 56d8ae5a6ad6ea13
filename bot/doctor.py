"""`flux-bot doctor`: one line per check with a fix hint; the process exits non-zero when any check fails.

Each check answers one operator question (will the bot start, can it pay, can it generate, can it talk) and never
raises: a problem becomes a FAIL line. Checks that call a service (BFL, Discord, Slack) use the real clients with a
short timeout; the endpoints can be pointed elsewhere, which is how the tests run them against local fakes.
Secrets are never printed: a line says whether a token was accepted, never what it is.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from engine.config import DEMO_MODEL, Secrets, Settings
from engine.errors import BackendUnavailable, ConfigError
from engine.models import GpuLaneReport, format_usd
from engine.service import (
    LocalLane,
    backup_dir,
    bfl_credits,
    gpu_extra_installed,
    gpu_lane_report,
    image_store,
    integrity_problem,
    ledger_problems,
    list_backups,
    local_lane,
)

log = logging.getLogger(__name__)

MIN_FREE_BYTES = 1 << 30  # below 1 GiB a day of images and a backup may no longer fit
LOW_GPU_BYTES = 24 << 30  # FLUX.1 in bf16 needs about 24 GB without offloading
SERVICE_TIMEOUT_S = 10.0


class Status(StrEnum):
    OK = "ok"
    INFO = "info"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Check:
    status: Status
    what: str
    hint: str = ""

    def line(self) -> str:
        hint = f" — {self.hint}" if self.hint and self.status in (Status.WARN, Status.FAIL) else ""
        return f"[{self.status.value}] {self.what}{hint}"


def config_failure(exc: ConfigError) -> Check:
    return Check(
        Status.FAIL,
        f"configuration {exc.file}: {exc.field}: {exc.problem}",
        "fix or remove that key (config.toml documents every key and its default)",
    )


async def run_checks(settings: Settings, secrets: Secrets, *, slack_api_url: str | None = None) -> list[Check]:
    """Every check, in the order an operator fixes things: config, storage, image backends, chat."""
    checks = [
        Check(Status.OK, f"configuration: {len(settings.models)} models, {len(settings.tiers)} tiers"),
        database(settings),
        *running_totals(settings),
        disk_space(settings),
        images(settings),
        backups(settings),
        await bfl_key(settings, secrets, local_serves=local_serves(settings, secrets)),
        local_lane_check(settings, secrets),
        *local_weights(settings),
        *gpu(settings),
        *(gpu_hosts(await gpu_lane_report(settings, secrets)) if settings.nats.url else ()),
    ]
    if not settings.routing.api_enabled and not settings.routing.local_enabled:
        checks.append(
            Check(
                Status.FAIL,
                "no image backend is enabled",
                "set BFL_API_KEY, or [routing] local_enabled = true with a GPU",
            )
        )
    checks.extend(await chat_tokens(secrets, slack_api_url))
    return checks


def failed(checks: Iterable[Check]) -> bool:
    return any(check.status is Status.FAIL for check in checks)


# ---- storage ----


def database(settings: Settings) -> Check:
    path = settings.bot.database_path
    if not path.exists():
        return Check(
            Status.FAIL,
            f"database {path}: does not exist",
            "start the bot once (`flux-bot run`) to create it, or select the config file of the existing one "
            "(--config, $FLUX_BOT_CONFIG)",
        )
    try:
        problem = integrity_problem(path)
    except sqlite3.DatabaseError as exc:
        problem = str(exc)
    if problem is None:
        return Check(Status.OK, f"database {path}: integrity check passed")
    newest = list_backups(backup_dir(settings.bot.state_dir))
    hint = (
        f"stop the bot, then `flux-bot admin restore {newest[-1].path}`"
        if newest
        else "no backup to restore from: move the file aside and start afresh, or repair it with sqlite3 .recover"
    )
    return Check(Status.FAIL, f"database {path}: {problem}", hint)


def running_totals(settings: Settings) -> list[Check]:
    """The limit checks read running totals: they must equal what the ledger's lines add up to."""
    path = settings.bot.database_path
    if not path.exists():
        return []  # the database line already says so
    try:
        problems = ledger_problems(path)
    except sqlite3.DatabaseError as exc:
        return [
            Check(Status.WARN, f"ledger totals: not readable ({exc})", "start the bot once to migrate the database")
        ]
    if not problems:
        return [Check(Status.OK, "ledger totals: every running total matches the ledger's lines")]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return [
        Check(
            Status.FAIL,
            f"ledger totals: {len(problems)} differ from the ledger's lines, e.g. {problems[0]}{more}",
            "the ledger's lines are the record of every charge; stop the bot and keep a copy of the database "
            "(`flux-bot admin backup`) so the difference can be traced",
        )
    ]


def disk_space(settings: Settings) -> Check:
    place = settings.bot.state_dir.resolve()
    while not place.exists():
        place = place.parent
    free = shutil.disk_usage(place).free
    what = f"disk: {free / 2**30:.1f} GiB free for {settings.bot.state_dir}"
    if free < MIN_FREE_BYTES:
        return Check(Status.FAIL, what, "free some space: images and backups live there (state_dir)")
    return Check(Status.OK, what)


def images(settings: Settings) -> Check:
    """The image store's size, and how long it keeps images (`[bot] keep_images_days`)."""
    found = image_store(settings.bot.images_dir)
    days = settings.bot.keep_images_days
    kept = f"kept {days} days" if days else "kept forever ([bot] keep_images_days = 0)"
    if found.oldest_mtime is None:
        return Check(Status.INFO, f"images: none stored yet in {settings.bot.images_dir}; {kept}")
    oldest = datetime.fromtimestamp(found.oldest_mtime, UTC)
    return Check(
        Status.OK,
        f"images: {found.files} files, {found.bytes / 2**20:.1f} MB in {settings.bot.images_dir}, "
        f"the oldest from {oldest:%Y-%m-%d}; {kept}",
    )


def backups(settings: Settings, now: datetime | None = None) -> Check:
    every_h = settings.ops.backup_every_hours
    found = list_backups(backup_dir(settings.bot.state_dir))
    if not found:
        schedule = f"every {every_h:g} h while the bot runs" if every_h else "none scheduled ([ops] backup_every_hours)"
        return Check(Status.INFO, f"backups: none yet; {schedule}")
    age_h = ((now or datetime.now(UTC)) - found[-1].taken_at).total_seconds() / 3600
    what = f"backups: {len(found)}, the newest {age_h:.1f} h old ({found[-1].path.name})"
    if every_h and age_h > 2 * every_h:
        return Check(Status.WARN, what, "scheduled backups are late: is the bot running? `flux-bot admin backup` now")
    return Check(Status.OK, what)


# ---- image backends ----


def local_serves(settings: Settings, secrets: Secrets) -> bool:
    """Whether the local lane will take jobs: on, installed, and with weights or in the demo case.

    The demo model (no [local] model) serves only while nothing real is configured: no chat token and no BFL key.
    """
    lane = local_lane(settings, secrets)
    if lane is LocalLane.HOSTS_ONLY:
        return True
    return gpu_extra_installed() and lane not in (LocalLane.NO_WEIGHTS, LocalLane.DISABLED)


async def bfl_key(settings: Settings, secrets: Secrets, *, local_serves: bool = False) -> Check:
    if not settings.routing.api_enabled:
        return Check(Status.INFO, "BFL API: off ([routing] api_enabled = false)")
    if not secrets.bfl_api_key:
        api_only = [name for name, model in settings.models.items() if not model.local]
        if local_serves:
            # Not a failure: the local lane serves; only the API-only models are missing.
            return Check(
                Status.WARN,
                "BFL API: BFL_API_KEY is not set; jobs run on the local lane"
                + (f" and the API-only models ({', '.join(api_only)}) are refused" if api_only else ""),
                "put BFL_API_KEY=... in the environment (/etc/flux-bot/env) for the API, "
                "or set [routing] api_enabled = false to say it is meant",
            )
        return Check(
            Status.FAIL,
            "BFL API: BFL_API_KEY is not set, and no local model can serve either: no backend can make images",
            "put BFL_API_KEY=... in the environment (/etc/flux-bot/env), "
            "or set [local] model to FLUX.1 weights (with pip install 'flux-bot[gpu]') for a local-only bot",
        )
    try:
        credits = await bfl_credits(settings, secrets, timeout_s=SERVICE_TIMEOUT_S)
    except (BackendUnavailable, TimeoutError) as exc:
        reason = str(exc) or f"no answer within {SERVICE_TIMEOUT_S:g} s"
        return Check(Status.FAIL, f"BFL API: {reason}", "check BFL_API_KEY and [bfl] api_url")
    what = f"BFL API: key accepted, {format_usd(credits)} of credits left"
    if credits <= 0:
        return Check(Status.WARN, what, "buy credits, or every API job will fail")
    return Check(Status.OK, what)


def local_lane_check(settings: Settings, secrets: Secrets) -> Check:
    """Which case holds for the local lane: real weights, the demo model (asked for, or because nothing is
    configured), or off."""
    lane = local_lane(settings, secrets)
    chat = bool(secrets.discord_token or secrets.slack_bot_token)
    match lane:
        case LocalLane.WEIGHTS:
            units = f"the worker units on {len(settings.local.worker_sockets)} sockets"
            return Check(Status.OK, f"local worker: local weights ({settings.local.model or units})")
        case LocalLane.DEMO_UNCONFIGURED:
            return Check(
                Status.INFO,
                "local worker: the built-in demo model, because nothing is configured (no DISCORD_TOKEN, "
                "SLACK_BOT_TOKEN, BFL_API_KEY or [local] model); its images are noise from random weights",
            )
        case LocalLane.DEMO_REQUESTED:
            what = f'local worker: the built-in demo model by request ([local] model = "{DEMO_MODEL}")'
            if chat:
                return Check(
                    Status.WARN,
                    f"{what}: chat users get noise from random weights (each result says so)",
                    "set [local] model to a FLUX.1 folder or Hugging Face id for real images",
                )
            return Check(Status.INFO, f"{what}; its images are noise from random weights")
        case LocalLane.HOSTS_ONLY:
            return Check(
                Status.INFO, f"local worker: none on this host; the GPU lane is the GPU hosts on {settings.nats.url}"
            )
        case LocalLane.NO_WEIGHTS:
            what = "local worker: off, API only (no [local] model is set)"
            hint = "for local images install the gpu extra and set [local] model to a FLUX.1 folder or Hugging Face id"
            if settings.routing.api_enabled and secrets.bfl_api_key:
                return Check(Status.INFO, f"{what}; {hint}")
            return Check(
                Status.FAIL, "local worker: off (no [local] model) and no BFL API: nothing can make images", hint
            )
    return Check(Status.INFO, "local worker: off ([routing] local_enabled = false)")


def local_weights(settings: Settings) -> list[Check]:
    local = settings.local
    if not settings.routing.local_enabled or local.model in ("", DEMO_MODEL):
        return []  # no weights to check: local_lane_check says what the local lane runs
    folder = _model_folder(local.model)
    if folder is None:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            return [
                Check(
                    Status.FAIL,
                    f"local weights {local.model}: not in the Hugging Face cache and HF_HUB_OFFLINE=1",
                    f"download them once: huggingface-cli download {local.model}",
                )
            ]
        return [
            Check(Status.WARN, f"local weights {local.model}: not downloaded", "the worker downloads them at start")
        ]
    return [_safetensors_check(local.model, folder)]


def _model_folder(model: str) -> Path | None:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        return Path(snapshot_download(model, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None


def _safetensors_check(model: str, folder: Path) -> Check:
    if not (folder / "model_index.json").is_file():
        return Check(
            Status.FAIL,
            f"local weights {model}: no model_index.json in {folder}",
            "point [local] model at a diffusers FluxPipeline folder (the one save_pretrained writes)",
        )
    try:
        from safetensors import safe_open
    except ImportError:
        return Check(Status.FAIL, "local weights: safetensors is not installed", "pip install 'flux-bot[gpu]'")
    files = sorted(folder.rglob("*.safetensors"))
    if not files:
        return Check(Status.FAIL, f"local weights {model}: no .safetensors files in {folder}", "download them again")
    tensors = 0
    for file in files:
        try:
            # Reading the header and every tensor name proves the file is whole enough to load, without loading it.
            with safe_open(str(file), framework="numpy") as weights:
                tensors += len(list(weights.keys()))
        except Exception as exc:  # safetensors raises its own error types and OSError; each is a damaged file
            return Check(
                Status.FAIL,
                f"local weights {model}: {file.relative_to(folder)} cannot be read ({exc})",
                "delete that file and download the weights again",
            )
    return Check(Status.OK, f"local weights {model}: {len(files)} safetensors files, {tensors} tensors readable")


def gpu(settings: Settings) -> list[Check]:
    """Always one line at least: what the local lane runs on (a real model needs a GPU; the demo model does not)."""
    if not settings.routing.local_enabled:
        return [Check(Status.INFO, "GPU: not used ([routing] local_enabled = false)")]
    demo = settings.local.model in ("", DEMO_MODEL)
    if settings.local.device == "cpu":
        if demo:
            return [Check(Status.INFO, 'GPU: not used ([local] device = "cpu"; the demo model runs on the CPU)')]
        return [Check(Status.WARN, 'GPU: [local] device = "cpu"', "FLUX.1 on a CPU takes minutes per image")]
    try:
        import torch
    except ImportError:
        if demo:
            return [
                Check(Status.WARN, "GPU: torch is not installed: no local generation", "pip install 'flux-bot[gpu]'")
            ]
        return [Check(Status.FAIL, "GPU: torch is not installed", "pip install 'flux-bot[gpu]'")]
    if not torch.cuda.is_available():
        if demo:
            return [Check(Status.INFO, "GPU: no CUDA GPU: local generation runs on the CPU (demo model only)")]
        return [
            Check(
                Status.FAIL,
                "GPU: no CUDA device is visible",
                "install the NVIDIA driver and a CUDA build of torch, or set [routing] local_enabled = false",
            )
        ]
    checks = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        what = f"GPU {index}: {props.name}, {props.total_memory / 2**30:.0f} GiB"
        if props.total_memory < LOW_GPU_BYTES and not settings.local.cpu_offload and not demo:
            checks.append(Check(Status.WARN, what, "under 24 GB: set [local] cpu_offload = true"))
        else:
            checks.append(Check(Status.OK, what))
    return checks


# ---- chat ----


def gpu_hosts(report: GpuLaneReport) -> list[Check]:
    """The NATS connection, the lane's streams and buckets, and the GPU hosts whose heartbeats are live."""
    if report.problem is not None:
        return [
            Check(
                Status.FAIL,
                f"GPU hosts: {report.problem}",
                "check [nats] url and the NATS_* credentials; nats-server must run with JetStream (-js)",
            )
        ]
    checks = [Check(Status.OK, f"NATS: connected to {report.url}")]
    if report.missing:
        checks.append(
            Check(
                Status.WARN,
                f"NATS: the GPU lane's {', '.join(report.missing)} are not on the server yet",
                "`flux-bot run` creates them when it starts",
            )
        )
    if not report.hosts:
        checks.append(
            Check(
                Status.WARN,
                "GPU hosts: none online",
                "start `flux-bot worker --nats URL` on a GPU host (docs/OPERATIONS.md, Adding GPU hosts)",
            )
        )
    for host in report.hosts:
        what = (
            f"GPU host {host.name}: {host.busy} of {host.slots} GPUs busy, serving {', '.join(host.models)}"
            f" (flux-bot {host.version}, {host.recycles} recycles)"
        )
        if host.compatible:
            checks.append(Check(Status.OK, what))
        else:
            checks.append(
                Check(Status.WARN, f"{what}: another protocol version, gets no jobs", "run this bot's version there")
            )
    return checks


async def chat_tokens(secrets: Secrets, slack_api_url: str | None) -> list[Check]:
    checks = []
    if secrets.discord_token:
        checks.append(await _discord(secrets.discord_token))
    if secrets.slack_bot_token:
        checks.append(await _slack(secrets.slack_bot_token, slack_api_url))
        if not secrets.slack_app_token and not secrets.slack_signing_secret:
            checks.append(
                Check(
                    Status.FAIL,
                    "Slack: neither SLACK_APP_TOKEN (Socket Mode) nor SLACK_SIGNING_SECRET (HTTP mode) is set",
                    "set one of them from the Slack app's settings",
                )
            )
    if not checks:
        checks.append(Check(Status.INFO, "chat: no DISCORD_TOKEN or SLACK_BOT_TOKEN: `flux-bot run` opens the console"))
    return checks


async def _discord(token: str) -> Check:
    import aiohttp
    import discord

    http = discord.http.HTTPClient(asyncio.get_running_loop())
    try:
        me = await asyncio.wait_for(http.static_login(token), SERVICE_TIMEOUT_S)
    except discord.LoginFailure:
        return Check(
            Status.FAIL,
            "Discord: the token was refused",
            "reset it in the Developer Portal (Bot > Reset Token) and update DISCORD_TOKEN",
        )
    except (discord.HTTPException, aiohttp.ClientError, TimeoutError) as exc:
        return Check(Status.FAIL, f"Discord: cannot reach the API ({type(exc).__name__})", "check the network")
    finally:
        await http.close()
    return Check(Status.OK, f"Discord: token accepted (bot {me['username']}, id {me['id']})")


async def _slack(token: str, api_url: str | None) -> Check:
    import aiohttp
    from slack_sdk.errors import SlackApiError
    from slack_sdk.web.async_client import AsyncWebClient

    client = AsyncWebClient(token=token, base_url=api_url or AsyncWebClient.BASE_URL, timeout=int(SERVICE_TIMEOUT_S))
    try:
        answer = await client.auth_test()
    except SlackApiError as exc:
        return Check(
            Status.FAIL,
            f"Slack: the bot token was refused ({exc.response.get('error')})",
            "copy the Bot User OAuth Token (xoxb-...) from the Slack app into SLACK_BOT_TOKEN",
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Check(Status.FAIL, f"Slack: cannot reach the API ({type(exc).__name__})", "check the network")
    return Check(Status.OK, f"Slack: bot token accepted (team {answer.get('team_id')}, bot {answer.get('user_id')})")
