"""The command handlers on stdin/stdout: the embedded front-end when no chat token is set.

It works interactively and from a pipe: `printf '/imagine a red cat\\n/quota\\n' | flux-bot console --user alice`
prints one line per event and exits once every job it submitted has ended. Images are saved as PNG with the
prompt, seed and model in the PNG text chunks.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from bot import render
from bot.commands import Commands, parse_imagine_text
from engine.errors import EngineError, InvalidRequest
from engine.models import TERMINAL_EVENTS, Job, JobDone, JobEvent, JobQueued, Requester
from engine.service import Engine

log = logging.getLogger("flux_bot.console")

HELP = """commands:
  /imagine PROMPT [model=..] [aspect=16:9] [steps=N] [guidance=X] [seed=N] [mode=auto|fast|relax]
  /quota   /queue   /cancel JOB   /job JOB   /settings [NAME VALUE]   /admin ...   /help   /quit"""


def png_with_parameters(image: bytes, job: Job, model_display: str) -> bytes:
    """Re-encode as PNG carrying the generation parameters in text chunks (readable by most image tools)."""
    info = PngInfo()
    r = job.request
    for key, value in (
        ("prompt", r.prompt),
        ("seed", str(r.seed)),
        ("model", model_display),
        ("steps", str(r.steps)),
        ("size", f"{r.width}x{r.height}"),
        ("guidance", "" if r.guidance is None else str(r.guidance)),
        ("backend", job.backend.value),
        ("job", job.id),
        ("Software", "flux-bot"),
    ):
        info.add_text(key, value)
    with Image.open(io.BytesIO(image)) as opened:
        out = io.BytesIO()
        opened.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


class Console:
    def __init__(
        self,
        engine: Engine,
        requester: Requester,
        out_dir: Path,
        write: Callable[[str], None] = print,
    ) -> None:
        self.engine = engine
        self.commands = Commands(engine)
        self.requester = requester
        self.out_dir = out_dir
        self.write = write
        self._pending: set[str] = set()
        self._all_ended = asyncio.Event()
        self._all_ended.set()

    async def run(self, read_line: Callable[[], str]) -> int:
        """Serve commands until end of input, then wait for this session's jobs to end."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._introduce()
        events = asyncio.create_task(self._deliver_events(), name="console events")
        alerts = asyncio.create_task(self._print_alerts(), name="console alerts")
        await self._deliver_backlog()
        try:
            while True:
                line = await asyncio.to_thread(read_line)
                if not line:
                    break
                if line.strip() in ("/quit", "/exit"):
                    break
                await self.handle(line.strip())
            await self._all_ended.wait()
        finally:
            events.cancel()
            alerts.cancel()
            await asyncio.gather(events, alerts, return_exceptions=True)
        return 0

    def _introduce(self) -> None:
        if self.engine.demo:
            self.write(
                "DEMO MODE: the local backend runs a tiny FLUX pipeline with random weights, so its images are noise."
                " To make real images, set [local] model in config.toml to a FLUX.1 folder or Hugging Face id"
                " (with the gpu extra installed), or set BFL_API_KEY for the BFL API."
            )
        if self.engine.scheduler.backend_count() == 0:
            self.write(
                "No image backend is configured: set BFL_API_KEY for the BFL API, or install the gpu extra"
                " (pip install 'flux-bot[gpu]') for the local worker. Quota and admin commands still work."
            )

    async def handle(self, line: str) -> None:
        if not line or line.startswith("#"):
            return
        command, _, rest = line.partition(" ")
        try:
            await self._dispatch(command.lower(), rest.strip())
        except EngineError as exc:
            self.write(render.error_message(exc))
        except Exception:
            log.exception("console command failed: %r", command)
            self.write(render.INTERNAL_ERROR)

    async def _dispatch(self, command: str, rest: str) -> None:
        c = self.commands
        match command:
            case "/imagine":
                args = parse_imagine_text(rest)
                queued = await c.imagine(self.requester, args.prompt, args.options)
                self._track(queued)
            case "/quota":
                self.write(await c.quota(self.requester))
            case "/queue":
                self.write(await c.queue(self.requester))
            case "/cancel":
                await c.cancel(self.requester, rest)  # the JobCancelled line arrives as an event
            case "/job":
                self.write(await c.job(self.requester, rest))
            case "/settings":
                name, _, value = rest.partition(" ")
                self.write(await c.settings(self.requester, name or None, value.strip() or None))
            case "/admin" if rest.lower() == "report":
                reply = await c.report(self.requester)
                path = self.out_dir / reply.filename
                await asyncio.to_thread(path.write_bytes, reply.png)
                self.write(f"{reply.text}\nchart saved: {path}")
            case "/admin":
                self.write(await c.admin(self.requester, rest))
            case "/help":
                self.write(HELP)
            case _:
                raise InvalidRequest(f"unknown command {command!r}; type /help")

    def _track(self, queued: JobQueued) -> None:
        self._pending.add(queued.job_id)
        self._all_ended.clear()
        self.write(render.event_line(queued))

    async def _deliver_events(self) -> None:
        async for event in self.engine.all_events():
            if event.job_id not in self._pending or isinstance(event, JobQueued):
                continue
            await self._deliver(event)

    async def _print_alerts(self) -> None:
        async for alert in self.engine.alerts.stream():
            self.write(render.alert_text(alert))

    async def _deliver_backlog(self) -> None:
        """Results that ended while no console was attached (a restart) are delivered once, now."""
        for job in await self.engine.undelivered():
            if job.requester.user_key == self.requester.user_key:
                await self._deliver(await self.engine.terminal_event(job))

    async def _deliver(self, event: JobEvent) -> None:
        try:
            line = render.event_line(event)
            if isinstance(event, JobDone):
                job = await self.engine.store.get_job(event.job_id)
                png = png_with_parameters(event.image, job, self.commands.model_display(job.request.model))
                path = self.out_dir / f"{event.job_id}.png"
                await asyncio.to_thread(path.write_bytes, png)
                line += f": saved {path}{render.demo_note(event, self.engine.demo)}"
            self.write(line)
            if isinstance(event, TERMINAL_EVENTS):
                await self.engine.mark_delivered(event.job_id)
        except Exception:
            log.exception("job %s: could not deliver %s", event.job_id, type(event).__name__)
            self.write(f"[{event.job_id}] the result could not be saved; it has been logged.")
        finally:
            if isinstance(event, TERMINAL_EVENTS):
                self._pending.discard(event.job_id)
                if not self._pending:
                    self._all_ended.set()


def stdin_reader(prompt: bool) -> Callable[[], str]:
    def read() -> str:
        if prompt:
            sys.stdout.write("> ")
            sys.stdout.flush()
        return sys.stdin.readline()

    return read
