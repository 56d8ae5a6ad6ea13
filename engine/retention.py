"""Stored results have a retention: `[bot] keep_images_days` after a job ended, its image is deleted from disk;
input images go as long after they were last used, unless a queued or running job still needs them.

The running bot sweeps once at start and then every hour (`SWEEP_EVERY_S`), on the engine's clock. A job's image is
judged by the job's `finished_at`; a file in the images folder that no job points at any more (a crash between
writing and recording, a database restored from a backup, a leftover `.tmp`) is judged by its modification time.
Each removal is recorded in the job row (its `result_path` is cleared) and in the audit log, so the job still shows
in /job and its delivery says the image is gone instead of failing on a missing file.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from engine.config import BotSettings
from engine.inputs import InputImages
from engine.models import AuditEntry
from engine.store import Store

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 3600.0
DAY_S = 86400.0
ACTOR = "flux-bot"


@dataclass(frozen=True, slots=True)
class Swept:
    """What one sweep removed: images of ended jobs, files no job points at, and how many input images."""

    jobs: tuple[str, ...] = ()
    orphans: tuple[Path, ...] = ()
    inputs: int = 0


@dataclass(frozen=True, slots=True)
class ImageStore:
    """The images folder at one moment, for doctor: how many files, their bytes, the oldest modification time."""

    files: int
    bytes: int
    oldest_mtime: float | None


class Retention:
    def __init__(
        self,
        store: Store,
        settings: BotSettings,
        clock: Callable[[], float],
        *,
        inputs: InputImages | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._store = store
        self._settings = settings
        self._inputs = inputs
        self._clock = clock
        self._sleep = sleep

    @property
    def keep_days(self) -> int:
        return self._settings.keep_images_days

    async def run(self) -> None:
        """Until cancelled: a sweep every SWEEP_EVERY_S. A failed sweep is logged and the next one tries again."""
        while True:
            await self._sleep(SWEEP_EVERY_S)
            await self.sweep_logged()

    async def sweep_logged(self) -> Swept:
        try:
            return await self.sweep()
        except Exception:
            log.exception("image retention sweep failed; the next one, in %.0f s, tries again", SWEEP_EVERY_S)
            return Swept()

    async def sweep(self) -> Swept:
        """Delete the images older than keep_images_days (none with 0: kept forever) and record each removal."""
        if self.keep_days <= 0:
            return Swept()
        cutoff = self._clock() - self.keep_days * DAY_S
        why = f"older than {self.keep_days} days ([bot] keep_images_days)"
        expired = await self._store.stored_results(finished_before=cutoff)
        removed = await self._remove({result.job_id: result.path for result in expired}, why=why, actor=ACTOR)
        # By name: the images folder may have moved with state_dir since a row's absolute path was written.
        known = {Path(result.path).name for result in await self._store.stored_results()}
        orphans = await asyncio.to_thread(_remove_orphans, self._settings.images_dir, known, cutoff)
        for path in orphans:
            log.info("image retention: removed %s (no job points at it; older than %d days)", path, self.keep_days)
        inputs = 0
        if self._inputs is not None:
            in_use = await self._store.input_images_in_use()
            inputs = await asyncio.to_thread(self._inputs.remove_older_than, self.keep_days * DAY_S, in_use)
        if removed or orphans or inputs:
            log.info(
                "image retention: removed %d images of ended jobs, %d other files and %d input images",
                len(removed),
                len(orphans),
                inputs,
            )
        return Swept(tuple(removed), tuple(orphans), inputs)

    async def remove(self, job_id: str, path: str | None, *, why: str, actor: str) -> bool:
        """Delete one job's stored image and record it; False when it had none or the file could not be deleted."""
        if path is None:
            return False
        return bool(await self._remove({job_id: path}, why=why, actor=actor))

    async def _remove(self, paths: dict[str, str], *, why: str, actor: str) -> list[str]:
        deleted = await asyncio.to_thread(_unlink, paths)
        audits = [
            AuditEntry(actor, "image.removed", job_id=job_id, detail={"why": why, "path": paths[job_id]})
            for job_id in deleted
        ]
        forgotten = await self._store.forget_results(audits)
        for job_id in forgotten:
            log.info("job %s: stored image removed (%s)", job_id, why)
        return forgotten


def _unlink(paths: dict[str, str]) -> list[str]:
    """Delete each job's file (one already gone counts as deleted); the jobs whose file is gone now."""
    deleted = []
    for job_id, path in paths.items():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("job %s: could not delete its stored image %s: %s", job_id, path, exc)
            continue
        deleted.append(job_id)
    return deleted


def _remove_orphans(directory: Path, known: set[str], cutoff: float) -> list[Path]:
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False) or entry.name in known:
                continue
            if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                continue
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.error("image retention: could not delete %s: %s", entry.path, exc)
            continue
        removed.append(Path(entry.path))
    return removed


def image_store(directory: Path) -> ImageStore:
    """Count the images folder (for doctor); an absent folder is an empty store."""
    files, size, oldest = 0, 0, None
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return ImageStore(0, 0, None)
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            stat = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        files += 1
        size += stat.st_size
        oldest = stat.st_mtime if oldest is None else min(oldest, stat.st_mtime)
    return ImageStore(files, size, oldest)
