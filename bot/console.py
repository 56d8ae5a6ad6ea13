"""The command handlers on stdin/stdout: the embedded front-end when no chat token is set.

It works interactively and from a pipe: `printf '/imagine a red cat\\n/quota\\n' | flux-bot console --user alice`
prints one line per event and exits once every job of this user has ended. At a terminal the prompt is redrawn
(with what was typed so far, through readline) when a job's event arrives while a line is being typed.

Ctrl-C stops at once: it cancels this user's queued jobs and leaves the running ones to the next start, which
resumes them and shows their results; a second Ctrl-C quits without tidying up. A job that ends while this console
runs is shown here whichever session submitted it.

Images: the engine stores each result once, a PNG with the prompt, seed and model in its text chunks. The console
prints that file's path and puts a hard link to it in the --out folder (the same bytes, and the link outlives the
store's retention); only where no hard link can be made (another filesystem) is the file copied there.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import queue
import re
import shutil
import signal
import sys
import termios
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO, TypeVar

from bot import render
from bot.commands import Commands, parse_imagine_text
from engine.errors import EngineError, InvalidRequest
from engine.models import TERMINAL_EVENTS, JobDone, JobEvent, JobQueued, JobState, JobWaiting, Requester
from engine.service import Engine

log = logging.getLogger(__name__)

T = TypeVar("T")

HELP = """commands:
  /imagine PROMPT [model=..] [aspect=16:9] [steps=N] [guidance=X] [seed=N] [mode=auto|fast|relax] [style=NAME]
          [image=PATH]
  /edit PATH INSTRUCTION   (e.g. /edit ~/cat.png make the cat wear a hat)
  /styles   /quota   /queue   /cancel JOB   /job JOB   /settings [NAME VALUE]   /admin ...   /help   /quit"""

INTERRUPTED = 130  # the exit status of a program ended by SIGINT, as shells report it
# Filesystems that cannot hard-link (another device, FAT, some network mounts) get a copy instead.
NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


class Terminal:
    """stdin and stdout as the console uses them: at a terminal, a prompt with line editing (readline where Python
    has it) that output arriving while a line is being typed does not break; elsewhere plain lines."""

    PROMPT = "> "

    def __init__(self, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
        # Looked up when built, not when defined: the process's streams may have been replaced since import.
        self._in, self._out = stdin or sys.stdin, stdout or sys.stdout
        self.interactive = self._in.isatty() and self._out.isatty()
        self._readline = _readline() if self.interactive else None
        self._tty = _tty_state(self._in) if self.interactive else None
        self._lock = threading.Lock()
        self._prompting = False
        self._ending = False

    def read_line(self) -> str:
        """One line with its newline, "" at the end of input. Blocks: the console calls it from its reader thread."""
        if not self.interactive:
            return self._in.readline()
        with self._lock:
            self._prompting = True
        try:
            return input(self.PROMPT) + "\n"
        except EOFError:
            self._out.write("\n")
            return ""
        finally:
            with self._lock:
                self._prompting = False

    def write(self, text: str) -> None:
        with self._lock:
            if self._prompting and not self._ending:
                # Clear the prompt line, print, then draw the prompt again with what was typed so far.
                typed = self._readline.get_line_buffer() if self._readline is not None else ""
                self._out.write(f"\r\x1b[K{text}\n{self.PROMPT}{typed}")
            else:
                self._out.write(text + "\n")
            self._out.flush()

    def stop_prompting(self) -> None:
        """The session is ending: take the prompt away, and print plain lines from now on."""
        with self._lock:
            if self._prompting and not self._ending:
                self._out.write("\r\x1b[K")
                self._out.flush()
            self._ending = True

    def restore(self) -> None:
        """Leave the terminal as it was found: readline changes its modes while it waits for a line."""
        self._out.flush()
        if self._tty is not None:
            fd, attributes = self._tty
            termios.tcsetattr(fd, termios.TCSADRAIN, attributes)


def _readline() -> ModuleType | None:
    try:
        import readline  # only at a terminal: once imported, input() edits lines with it
    except ImportError:
        return None
    return readline


def _tty_state(stdin: TextIO) -> tuple[int, list[Any]] | None:
    try:
        return stdin.fileno(), termios.tcgetattr(stdin.fileno())
    except (OSError, ValueError, termios.error):
        return None


class _LineReader:
    """Reads a line only when asked, in a daemon thread: a blocked read never holds up the end of the program."""

    def __init__(self, read_line: Callable[[], str]) -> None:
        self._read_line = read_line
        self._loop = asyncio.get_running_loop()
        self._asks: queue.SimpleQueue[asyncio.Future[str]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="console stdin", daemon=True).start()

    async def next(self) -> str:
        answer: asyncio.Future[str] = self._loop.create_future()
        self._asks.put(answer)
        return await answer

    def _serve(self) -> None:
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # Ctrl-C is the event loop's to handle
        while True:
            answer = self._asks.get()
            try:
                line = self._read_line()
            except Exception as exc:
                self._resolve(answer, exc)
                return
            if not self._resolve(answer, line) or not line:
                return

    def _resolve(self, answer: asyncio.Future[str], value: str | Exception) -> bool:
        def settle() -> None:
            if answer.done():
                return
            if isinstance(value, Exception):
                answer.set_exception(value)
            else:
                answer.set_result(value)

        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop has closed: the console is gone
            return False
        return True


_IMAGE_OPTION = re.compile(r"(?:^|\s)(?:--image[= ]|image=)(?P<path>\S+)")


def _image_option(text: str) -> tuple[str | None, str]:
    """The console's own `image=PATH` (or `--image PATH`) taken out of an /imagine line, and the rest as typed."""
    found = _IMAGE_OPTION.search(text)
    if found is None:
        return None, text
    return found["path"], (text[: found.start()] + text[found.end() :]).strip()


def _first_word(text: str) -> tuple[str, str]:
    """'PATH the rest' -> (PATH, 'the rest'); a path with spaces goes in quotes."""
    text = text.strip()
    if text[:1] in ('"', "'") and (end := text.find(text[0], 1)) > 0:
        return text[1:end], text[end + 1 :].strip()
    word, _, rest = text.partition(" ")
    return word, rest.strip()


async def _read_image(path: str) -> bytes:
    try:
        return await asyncio.to_thread(lambda: Path(path).expanduser().read_bytes())
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror or exc}", field="image") from exc


def place_result(stored: Path, target: Path) -> str:
    """Put the stored result at target without writing the image again: "linked", or "copied" where no link can be
    made. The name appears complete or not at all."""
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        os.link(stored, partial)
        how = "linked"
    except OSError as exc:
        if exc.errno not in NO_LINK:
            raise
        shutil.copyfile(stored, partial)
        how = "copied"
    partial.replace(target)
    return how


class Console:
    def __init__(
        self,
        engine: Engine,
        requester: Requester,
        out_dir: Path,
        write: Callable[[str], None] = print,
        *,
        terminal: Terminal | None = None,
    ) -> None:
        self.engine = engine
        self.commands = Commands(engine)
        self.requester = requester
        self.out_dir = out_dir
        self.terminal = terminal
        self.write = terminal.write if terminal is not None else write
        self._mine: dict[str, bool] = {}  # job id -> whether it is this user's (asked of the store once per job)
        self._pending: set[str] = set()  # this user's jobs not yet ended: what /quit and end of input wait for
        self._ended: set[str] = set()  # jobs whose end was shown, so the backlog and the event stream show it once
        self._all_ended = asyncio.Event()
        self._all_ended.set()
        self._interrupted = asyncio.Event()

    async def run(self, read_line: Callable[[], str] | None = None) -> int:
        """Serve commands until end of input or /quit, then wait for this user's jobs to end; Ctrl-C stops sooner.

        Returns the exit status: 0, or 130 after Ctrl-C.
        """
        if read_line is None:
            read_line = self.terminal.read_line if self.terminal is not None else sys.stdin.readline
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._introduce()
        # Subscribed before the backlog is read, so a job ending in between is seen by one of them.
        events = asyncio.create_task(self._deliver_events(), name="console events")
        alerts = asyncio.create_task(self._print_alerts(), name="console alerts")
        restore_sigint = self._catch_sigint()
        try:
            await self._adopt_open_jobs()
            await self._deliver_backlog()
            status = await self._serve(_LineReader(read_line))
        finally:
            events.cancel()
            alerts.cancel()
            await asyncio.gather(events, alerts, return_exceptions=True)
            if not self._interrupted.is_set():
                restore_sigint()  # after Ctrl-C it stays caught: a second one quits at once, even while closing
            if self.terminal is not None:
                self.terminal.restore()
        return status

    async def _serve(self, reader: _LineReader) -> int:
        while True:
            line = await self._unless_interrupted(reader.next())
            if line is None:
                return await self._stop()
            if not line or line.strip() in ("/quit", "/exit"):
                break
            await self.handle(line.strip())  # not cut short by Ctrl-C: a submit is one quick transaction
            if self._interrupted.is_set():
                return await self._stop()
        if self._pending:
            jobs = sorted(self._pending)
            self.write(
                f"Waiting for {len(jobs)} job{'s' if len(jobs) > 1 else ''} to finish: {', '.join(jobs)}."
                " Ctrl-C to stop waiting (queued jobs are cancelled; running ones resume at the next start)."
            )
        if await self._unless_interrupted(self._all_ended.wait()) is None:
            return await self._stop()
        return 0

    async def _unless_interrupted(self, work: Awaitable[T]) -> T | None:
        """The result of work, or None when Ctrl-C comes first (work is then cancelled)."""
        task = asyncio.ensure_future(work)
        interrupted = asyncio.create_task(self._interrupted.wait())
        await asyncio.wait([task, interrupted], return_when=asyncio.FIRST_COMPLETED)
        interrupted.cancel()
        if task.done():
            return task.result()
        task.cancel()
        return None

    def _catch_sigint(self) -> Callable[[], None]:
        """Ctrl-C as an event of the loop (it wakes the loop whichever thread the signal lands on); returns the undo."""
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGINT)
        try:
            loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            return lambda: None

        def undo() -> None:
            loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, previous)

        return undo

    def _on_sigint(self) -> None:
        if not self._interrupted.is_set():
            self._interrupted.set()
            return
        self.write("Quitting now.")
        if self.terminal is not None:
            self.terminal.restore()
        sys.stdout.flush()
        os._exit(INTERRUPTED)

    async def _stop(self) -> int:
        """After Ctrl-C: cancel this user's queued jobs, leave the running ones to the next start, say which."""
        if self.terminal is not None:
            self.terminal.stop_prompting()
        self.write("Stopping (Ctrl-C again quits at once).")
        mine = (await self.engine.queue(self.requester)).mine
        for job in mine:
            if job.state is not JobState.QUEUED:
                continue
            try:
                cancelled = await self.engine.cancel(self.requester, job.id)
            except EngineError as exc:  # it ended or started meanwhile
                self.write(f"[{job.id}] {render.error_message(exc)}")
                continue
            self._ended.add(job.id)
            await self.engine.mark_delivered(job.id)
            self.write(render.cancelled_text(cancelled))
        running = [job.id for job in mine if job.state is JobState.RUNNING]
        if running:
            self.write(
                f"Left running: {', '.join(running)}. The next start resumes "
                f"{'them' if len(running) > 1 else 'it'} and shows the result."
            )
        elif not mine:
            self.write("You had no jobs waiting or running.")
        return INTERRUPTED

    def _introduce(self) -> None:
        if self.engine.demo:
            self.write(
                "DEMO MODE: the local backend runs a tiny FLUX pipeline with random weights, so its images are noise."
                " To make real images, set [local] model in config.toml to a FLUX.1 folder or Hugging Face id"
                " (with the gpu extra installed), or set BFL_API_KEY for the BFL API."
            )
        if not self.engine.has_backends():
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
            self.write(render.error_message(exc, self.engine.capabilities()))
        except Exception:
            log.exception("console command failed: %r", command)
            self.write(render.INTERNAL_ERROR)

    async def _dispatch(self, command: str, rest: str) -> None:
        c = self.commands
        match command:
            case "/imagine":
                image_path, rest = _image_option(rest)
                args = parse_imagine_text(rest)
                image = await _read_image(image_path) if image_path else None
                queued = await c.imagine(self.requester, args.prompt, args.options, image=image)
                self._track(queued)
            case "/edit":
                image_path, instruction = _first_word(rest)
                if not image_path or not instruction:
                    raise InvalidRequest("say which image and what to change: /edit PATH INSTRUCTION", field="image")
                self._track(await c.edit(self.requester, await _read_image(image_path), instruction))
            case "/styles":
                self.write(c.styles())
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
        self._mine[queued.job_id] = True
        if queued.job_id not in self._ended:  # a fast job may have ended before its submit returned here
            self._pending.add(queued.job_id)
            self._all_ended.clear()
        self.write(render.event_line(queued))

    async def _adopt_open_jobs(self) -> None:
        """This user's jobs from an earlier session that the engine resumed: shown and waited for like new ones."""
        mine = [job for job in (await self.engine.queue(self.requester)).mine if job.id not in self._ended]
        if not mine:
            return
        for job in mine:
            self._mine[job.id] = True
            self._pending.add(job.id)
        self._all_ended.clear()
        listed = ", ".join(f"{job.id} ({job.state.value})" for job in mine)
        self.write(f"Your jobs from an earlier session: {listed}. Their results are shown here.")

    async def _is_mine(self, job_id: str) -> bool:
        mine = self._mine.get(job_id)
        if mine is None:
            try:
                job = await self.engine.get_job(job_id)
            except EngineError:
                return False
            mine = self._mine[job_id] = job.requester.user_key == self.requester.user_key
        return mine

    async def _deliver_events(self) -> None:
        # A waiting job's place as last printed: a line only when it changes, so a long queue does not flood the
        # terminal with ETA ticks. The submit's own JobQueued (printed by _track) comes first.
        places: dict[str, int] = {}
        async for event in self.engine.all_events():
            if not await self._is_mine(event.job_id):
                continue
            if isinstance(event, JobQueued | JobWaiting):
                if isinstance(event, JobWaiting) and places.get(event.job_id, event.position) != event.position:
                    self.write(render.event_line(event))
                places[event.job_id] = event.position
                continue
            places.pop(event.job_id, None)
            await self._deliver(event)

    async def _print_alerts(self) -> None:
        async for alert in self.engine.alerts():
            self.write(render.alert_text(alert))

    async def _deliver_backlog(self) -> None:
        """Results that ended while no console was attached (a restart) are delivered once, now."""
        for job in await self.engine.undelivered():
            if job.requester.user_key == self.requester.user_key:
                await self._deliver(await self.engine.terminal_event(job))

    async def _deliver(self, event: JobEvent) -> None:
        terminal = isinstance(event, TERMINAL_EVENTS)
        if terminal:
            if event.job_id in self._ended:
                return
            self._ended.add(event.job_id)
        try:
            line = render.event_line(event, self.engine.capabilities())
            if isinstance(event, JobDone):
                line += ": " + await self._place(event) + render.demo_note(event, self.engine.demo)
            self.write(line)
            if terminal:
                await self.engine.mark_delivered(event.job_id)
        except Exception:
            log.exception("job %s: could not deliver %s", event.job_id, type(event).__name__)
            self.write(f"[{event.job_id}] the result could not be saved; it has been logged.")
        finally:
            if terminal:
                self._pending.discard(event.job_id)
                if not self._pending:
                    self._all_ended.set()

    async def _place(self, event: JobDone) -> str:
        """The stored result in the --out folder; the words that say where it is."""
        job = await self.engine.get_job(event.job_id)
        if not job.result_path:
            raise ValueError(f"job {job.id} is done without a stored result")
        stored = Path(job.result_path)
        target = self.out_dir / stored.name
        how = await asyncio.to_thread(place_result, stored, target)
        return f"saved {stored}, {how} as {target}"
