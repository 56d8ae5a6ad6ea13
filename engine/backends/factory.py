"""Builds the backends the settings and secrets call for.

The API backend exists when a BFL key is set. The local backend exists when local routing is on and the GPU extra
(torch + diffusers) is installed; with no model configured it runs the built-in tiny demo model, whose images are
noise from random weights, and says so.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from pathlib import Path

from engine.backends.base import Backend
from engine.config import Secrets, Settings
from engine.models import BackendKind

log = logging.getLogger("flux_bot.backends")


def gpu_extra_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "diffusers", "transformers"))


async def build_backends(settings: Settings, secrets: Secrets) -> tuple[dict[BackendKind, Backend], bool]:
    """The configured backends, and whether the local one runs the demo model."""
    backends: dict[BackendKind, Backend] = {}
    demo = False
    if settings.routing.api_enabled and secrets.bfl_api_key:
        from engine.backends.bfl import BflBackend

        backends[BackendKind.API] = BflBackend(settings.bfl, settings.models, secrets.bfl_api_key)
    if settings.routing.local_enabled:
        if gpu_extra_installed():
            from engine.backends.demo_model import ensure_demo_model
            from engine.backends.local import LocalBackend

            model_path: Path | str
            if settings.local.model:
                model_path = settings.local.model
            else:
                demo = True
                model_path = await asyncio.to_thread(ensure_demo_model, settings.bot.state_dir / "demo-model")
            backends[BackendKind.LOCAL] = LocalBackend(settings.local, settings.models, Path(model_path))
        else:
            log.warning("local routing is on but torch/diffusers are not installed: pip install 'flux-bot[gpu]'")
    return backends, demo
