"""Builds the backends the settings and secrets call for, and decides what the local lane runs.

The API backend exists when a BFL key is set. The local lane runs real weights (`[local] model`, or the worker
units of `[local] worker_sockets`); the built-in tiny demo model, whose images are noise from random weights, runs
only when asked for (`[local] model = "demo"`, `--demo`) or while nothing real is configured at all, so that a
fresh clone works end to end. A bot with a chat token or a BFL key and no weights has no local lane.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from engine.backends.base import Backend
from engine.config import DEMO_MODEL, Secrets, Settings
from engine.models import BackendKind

if TYPE_CHECKING:
    from engine.backends.pool import Member

log = logging.getLogger(__name__)

IN_HOST = "in-host"  # the GPU lane's member that supervises this host's worker processes
GPU_HOSTS = "gpu-hosts"  # the member that reaches the GPU hosts on NATS

# The demo model is small and built in code: warming every bucket up or compiling it would only delay the start.
_DEMO_SWITCHES = {"warmup": False, "compile": False, "fp8": False}


class LocalLane(StrEnum):
    WEIGHTS = "local weights"
    DEMO_REQUESTED = "demo by request"
    DEMO_UNCONFIGURED = "demo because nothing is configured"
    NO_WEIGHTS = "no local weights"  # a chat token or a BFL key but no [local] model: the lane is off
    HOSTS_ONLY = "GPU hosts only"  # no weights here, but GPU hosts on NATS ([nats] url)
    DISABLED = "local routing off"

    @property
    def demo(self) -> bool:
        return self in (LocalLane.DEMO_REQUESTED, LocalLane.DEMO_UNCONFIGURED)


def local_lane(settings: Settings, secrets: Secrets) -> LocalLane:
    if not settings.routing.local_enabled:
        return LocalLane.DISABLED
    if settings.local.model == DEMO_MODEL:
        return LocalLane.DEMO_REQUESTED
    if settings.local.model or settings.local.worker_sockets:
        return LocalLane.WEIGHTS
    if settings.nats.url:
        return LocalLane.HOSTS_ONLY
    if secrets.discord_token or secrets.slack_bot_token or (settings.routing.api_enabled and secrets.bfl_api_key):
        return LocalLane.NO_WEIGHTS
    return LocalLane.DEMO_UNCONFIGURED


def local_off_line(settings: Settings, secrets: Secrets) -> str:
    """The one start-up line of a bot without weights: where its jobs go, and how to add weights."""
    add_weights = (
        "to generate locally, install the gpu extra (pip install 'flux-bot[gpu]') and set [local] model in "
        'config.toml to a FLUX.1 folder or Hugging Face id (e.g. "black-forest-labs/FLUX.1-schnell")'
    )
    if settings.routing.api_enabled and secrets.bfl_api_key:
        default = settings.models[serving_settings(settings, secrets).routing.default_model].display_name
        return (
            f"local generation is off (no [local] model): every job goes to the BFL API ({default} by default); "
            f"{add_weights}"
        )
    return (
        "local generation is off (no [local] model) and BFL_API_KEY is not set: no image can be made; "
        f"{add_weights}, or set BFL_API_KEY"
    )


def serving_settings(settings: Settings, secrets: Secrets) -> Settings:
    """The settings the engine runs with: with no local weights, local routing is off and, when the configured
    default model runs only locally, /imagine defaults to the first model the API serves."""
    if local_lane(settings, secrets) is not LocalLane.NO_WEIGHTS:
        return settings
    routing = settings.routing.model_copy(update={"local_enabled": False})
    api_models = [name for name, model in settings.models.items() if model.api_endpoint]
    serves_default = settings.models[routing.default_model].api_endpoint is not None
    if settings.routing.api_enabled and secrets.bfl_api_key and not serves_default and api_models:
        routing = routing.model_copy(update={"default_model": api_models[0]})
    return settings.model_copy(update={"routing": routing})


def gpu_extra_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "diffusers", "transformers"))


async def build_backends(settings: Settings, secrets: Secrets) -> tuple[dict[BackendKind, Backend], bool]:
    """The configured backends, and whether the local one runs the demo model."""
    backends: dict[BackendKind, Backend] = {}
    if settings.routing.api_enabled and secrets.bfl_api_key:
        from engine.backends.bfl import BflBackend

        backends[BackendKind.API] = BflBackend(settings.bfl, settings.models, secrets.bfl_api_key)
    lane = local_lane(settings, secrets)
    if lane in (LocalLane.DISABLED, LocalLane.NO_WEIGHTS):
        return backends, False
    from engine.backends.pool import GpuPool, Member

    members: list[Member] = []
    if lane is not LocalLane.HOSTS_ONLY:
        if gpu_extra_installed():
            members.append(await _in_host(settings, lane))
        else:
            log.warning("local routing is on but torch/diffusers are not installed: pip install 'flux-bot[gpu]'")
    if settings.nats.url:
        from engine.backends.nats import RemoteHosts

        members.append(Member(GPU_HOSTS, RemoteHosts(settings.nats, secrets.nats, settings.models, settings.styles)))
    if not members:
        return backends, False
    backends[BackendKind.LOCAL] = GpuPool(members, settings.models)
    return backends, lane.demo and members[0].name == IN_HOST


async def _in_host(settings: Settings, lane: LocalLane) -> Member:
    from engine.backends.local.supervisor import LocalBackend
    from engine.backends.pool import Member

    local = settings.local
    model_path = Path(local.model)
    if lane.demo:
        from engine.backends.demo_model import ensure_demo_model

        model_path = await asyncio.to_thread(ensure_demo_model, settings.bot.state_dir / "demo-model")
        # The demo model edits with its own tiny transformer, as Kontext [dev] would with its weights.
        local = local.model_copy(update={**_DEMO_SWITCHES, "kontext_model": str(model_path)})
    return Member(IN_HOST, LocalBackend(local, settings.models, model_path, styles=settings.styles))
