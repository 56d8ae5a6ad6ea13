"""Shared fixtures: settings on a temporary state folder, and engines over real SQLite files."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.backends.base import Backend
from engine.config import Secrets, Settings
from engine.models import TERMINAL_EVENTS, BackendKind, JobEvent, Platform, Requester
from engine.review import Classifier
from engine.service import Engine
from tests.fakes.notify_socket import NotifyListener

SettingsFactory = Callable[..., Settings]
EngineFactory = Callable[..., Awaitable[Engine]]


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture
def notify_listener() -> Iterator[NotifyListener]:
    """A fake systemd NOTIFY_SOCKET (tests/fakes/notify_socket.py)."""
    listener = NotifyListener()
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture
def make_settings(tmp_path: Path) -> SettingsFactory:
    """Settings from a config dict (as config.toml would give), with the state folder in tmp_path."""

    def build(**sections: Any) -> Settings:
        raw = _merge({"bot": {"state_dir": str(tmp_path / "state")}}, sections)
        return Settings.model_validate(raw)

    return build


@pytest.fixture
async def make_engine(make_settings: SettingsFactory) -> AsyncIterator[EngineFactory]:
    engines: list[Engine] = []

    async def build(
        backends: Mapping[BackendKind, Backend],
        settings: Settings | None = None,
        *,
        dispatch: bool = True,
        classifier: Classifier | None = None,
    ) -> Engine:
        from engine.store import Store

        settings = settings or make_settings()
        store = await Store.open(settings.bot.database_path)
        engine = Engine(settings, Secrets(), store, backends, classifier=classifier)
        await engine.start(dispatch=dispatch)
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        await engine.close()


def user(
    name: str = "alice", *, guild: str | None = "g1", roles: tuple[str, ...] = (), admin: bool = False
) -> Requester:
    return Requester(Platform.DISCORD, name, guild_id=guild, channel_id="c1", roles=roles, is_admin=admin)


async def wait_terminal(engine: Engine, job_id: str, limit_s: float = 30.0) -> JobEvent:
    """The job's terminal event (the timeout only guards against a hung test, it is never the expected path)."""

    async def last() -> JobEvent:
        async for event in engine.events(job_id):
            if isinstance(event, TERMINAL_EVENTS):
                return event
        raise AssertionError("events ended without a terminal event")

    return await asyncio.wait_for(last(), limit_s)
