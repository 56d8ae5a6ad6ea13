"""Styles for admins: where each style's adapters are loaded, a reload of [styles.*] from the config file, and the
check of a style's adapter files. The facade (Engine) checks rights, applies a reload and queues the test renders.
The worker's side, loading and switching adapters, is engine/backends/local/styles.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.config import Settings, StyleSettings, load_settings
from engine.errors import InvalidRequest
from engine.models import JobState, StyleServing
from engine.store import Store

# (where, slots, the LoRA styles loaded there), as the GPU lane's members report their workers.
Slots = list[tuple[str, int, tuple[str, ...]]]


def style_report(styles: Mapping[str, StyleSettings], slots: Slots | None) -> list[StyleServing]:
    """Each style and the GPU slots that have its adapters loaded; `slots` None: this process has no GPU lane."""

    def serving(name: str) -> tuple[str, ...] | None:
        if slots is None:
            return None
        return tuple(f"{where} ({n} slot{'s' if n != 1 else ''})" for where, n, loaded in slots if name in loaded)

    return [
        StyleServing(name, style.display_name, style.adapters_text(), serving(name) if style.gpu_only else ())
        for name, style in styles.items()
    ]


@dataclass(frozen=True, slots=True)
class StylesReload:
    styles: dict[str, StyleSettings]
    added: list[str]
    removed: list[str]
    changed: list[str]

    def detail(self) -> dict[str, list[str]]:
        return {"added": self.added, "removed": self.removed, "changed": self.changed}

    def summary(self) -> str:
        parts = [f"{what}: {', '.join(names)}" for what, names in self.detail().items() if names]
        if not parts:
            return "Styles reloaded: nothing changed."
        return (
            f"Styles reloaded ({'; '.join(parts)}). Workers load new adapters between jobs; no job is lost. GPU hosts"
            " read their own config: reload them too (systemctl reload flux-bot-gpu-host)."
        )


async def read_styles(config_path: Path | None, running: Settings) -> StylesReload:
    """[styles.*] from the config file as it is now, checked against the models this process runs with (other
    changes to the file need a restart); ConfigError for a file that does not load."""
    if config_path is None:
        raise InvalidRequest("this bot runs on the built-in defaults: there is no config file to reload")
    fresh, _ = await asyncio.to_thread(load_settings, config_path)
    for name, style in fresh.styles.items():
        named = (*style.models, *([style.model] if style.model else []))
        unknown = [model for model in named if model not in running.models]
        if unknown:
            raise InvalidRequest(
                f"[styles.{name}] names {', '.join(unknown)}, which this running bot does not have: restart it to"
                " add models",
                field="styles",
            )
    old = running.styles
    return StylesReload(
        dict(fresh.styles),
        added=[name for name in fresh.styles if name not in old],
        removed=[name for name in old if name not in fresh.styles],
        changed=[name for name in fresh.styles if name in old and fresh.styles[name] != old[name]],
    )


async def adapter_problems(name: str, style: StyleSettings) -> tuple[str, ...]:
    """What is wrong with the style's adapter files (missing, not in the cache, a wrong sha256); empty when none."""
    from engine.backends.local.pipeline import WorkerSetupError
    from engine.backends.local.styles import verified

    problems = []
    for adapter in style.adapters:
        try:
            await asyncio.to_thread(verified, name, adapter)
        except (WorkerSetupError, OSError) as exc:
            problems.append(str(exc))
    return tuple(problems)


async def render_outcome(store: Store, job_id: str, limit_s: float) -> str:
    """How a style's test render ended, read from the store: a render the CLI queued runs in the bot's process, whose
    events this one never sees."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        job = await store.get_job(job_id)
        if job.state.terminal:
            if job.state is JobState.DONE and job.started_at and job.finished_at:
                return f"done in {job.finished_at - job.started_at:.1f} s ({job.result_path})"
            return f"{job.state.value}: {job.error or job.failure_reason or 'no detail'}"
        await asyncio.sleep(0.2)
    return f"not finished after {limit_s:g} s (is the bot running? `flux-bot admin jobs` shows the job)"
