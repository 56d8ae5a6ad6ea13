"""The console front-end and the admin CLI: in-process with a scripted backend, and as real subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import pty
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from bot.commands import Commands
from bot.console import Console
from engine.errors import InvalidRequest
from engine.models import BackendKind, FailureReason, Platform, Requester
from engine.store import Store
from tests.conftest import EngineFactory, SettingsFactory
from tests.fakes.backends import ScriptedBackend, fail
from tests.fakes.bfl_server import API_KEY, FakeBfl, FakeTask

REPO = Path(__file__).resolve().parents[2]


def feeder(lines: list[str]) -> Iterator[str]:
    yield from (line + "\n" for line in lines)


async def run_console(engine_factory: EngineFactory, out: Path, lines: list[str], **kwargs: object) -> list[str]:
    engine = await engine_factory({BackendKind.LOCAL: ScriptedBackend()})
    written: list[str] = []
    requester = Requester(Platform.CONSOLE, "alice", display_name="alice", is_admin=bool(kwargs.get("admin")))
    lines_iter = feeder(lines)
    console = Console(engine, requester, out, write=written.append)
    assert await asyncio.wait_for(console.run(lambda: next(lines_iter, "")), 30) == 0
    return written


async def test_console_runs_jobs_and_saves_pngs_with_parameters(make_engine: EngineFactory, tmp_path: Path) -> None:
    out = tmp_path / "out"
    written = await run_console(make_engine, out, ["/imagine a red cat seed=7 aspect=16:9", "/quota"])
    text = "\n".join(written)
    assert "queued on local" in text and "done on local" in text and "images today: 1 of 50 images used" in text
    [png] = list(out.glob("*.png"))
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.text["prompt"] == "a red cat" and image.text["seed"] == "7"
        assert image.text["model"] == "FLUX.1 [schnell]"
    assert [line for line in written if "] done" in line] == [line for line in written if png.name in line]


async def test_console_edits_and_guides_from_image_files(make_engine: EngineFactory, tmp_path: Path) -> None:
    picture, plain_name = tmp_path / "my cat.png", tmp_path / "cat.png"
    Image.new("RGB", (96, 64), (200, 40, 40)).save(picture)
    Image.new("RGB", (64, 64), (20, 40, 200)).save(plain_name)
    api = ScriptedBackend(kind=BackendKind.API)
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend(), BackendKind.API: api})
    written: list[str] = []
    lines = iter(
        [
            f'/edit "{picture}" make the cat wear a hat\n',
            f"/imagine a cat in the style of this image image={plain_name}\n",
            f"/imagine a cat in the style of this image image={tmp_path / 'my'}\n",
            f"/imagine a red cat like this --image {tmp_path}/missing.png\n",
            "/edit\n",
        ]
    )
    console = Console(engine, Requester(Platform.CONSOLE, "alice"), tmp_path / "out", write=written.append)
    assert await asyncio.wait_for(console.run(lambda: next(lines, "")), 30) == 0
    text = "\n".join(written)
    assert "queued on api" in text and "done on api" in text  # the edit: Kontext [pro], on the API
    assert f"cannot read {tmp_path / 'my'}" in text and f"cannot read {tmp_path}/missing.png" in text
    assert "say which image and what to change: /edit PATH INSTRUCTION" in text
    store = await Store.open(engine.database_path)
    try:
        edit, guided = await store.jobs()
    finally:
        await store.close()
    assert (edit.request.task.value, edit.request.model) == ("edit", "kontext-pro")
    assert edit.request.prompt == "make the cat wear a hat"
    assert (guided.request.task.value, guided.request.prompt) == ("generate", "a cat in the style of this image")
    assert guided.request.input_image is not None and guided.backend is BackendKind.LOCAL


async def test_console_bad_input_gets_one_clear_line_each(make_engine: EngineFactory, tmp_path: Path) -> None:
    written = await run_console(
        make_engine,
        tmp_path,
        [
            "/imagine",
            "/imagine a cat steps=many",
            "/imagine a cat steps=3 steps=4",
            "/imagine a cat model=flux-9000",
            "/cancel",
            "/job jnope",
            "/frobnicate",
            "/admin quota show bob",
        ],
    )
    assert len(written) == 8
    assert all("not charged" in line.lower() or "can't" in line or "no job" in line.lower() for line in written)
    assert "only admins" in written[-1]
    assert "Traceback" not in "\n".join(written)


@pytest.mark.parametrize(
    "command",
    [
        "",
        "quota",
        "quota show",
        "quota set bob images_per_day",
        "quota grant bob coins 5",
        "quota grant bob images five",
        "spend 2026-13",
        "pause gpu",
        "ban",
        "quota show 'bob",
        "quota show bob extra words",
    ],
)
async def test_malformed_admin_commands(make_engine: EngineFactory, command: str) -> None:
    engine = await make_engine({})
    admin = Requester(Platform.CONSOLE, "root", is_admin=True)
    with pytest.raises(InvalidRequest) as caught:
        await Commands(engine).admin(admin, command)
    assert caught.value.problem


async def test_admin_commands_work_in_the_console(make_engine: EngineFactory, tmp_path: Path) -> None:
    written = await run_console(
        make_engine,
        tmp_path,
        [
            "/imagine a blue bird",
            "/admin quota grant alice images 5",
            "/admin quota set alice api_usd_per_month 1.50",
            "/admin quota show alice",
            "/admin spend",
            "/admin pause local",
            "/admin resume local",
        ],
        admin=True,
    )
    text = "\n".join(written)
    assert "Granted 5 images" in text
    assert "API spend this month: $0.00 of $1.50 used" in text
    assert "Routing to the local GPU paused" in text and "resumed" in text


def _cli(args: list[str], env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
        check=False,
    )


def _base_env(tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[bot]\nstate_dir = "{tmp_path / "state"}"\n[routing]\nlocal_enabled = false\n'
        "[bfl]\npoll_interval_s = 0.01\npoll_max_interval_s = 0.05\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_TOKEN", "_KEY", "_SECRET"))}
    env["FLUX_BOT_CONFIG"] = str(config)
    return env


def _first_start(tmp_path: Path) -> None:
    """The database the bot makes when it first starts: the admin CLI never creates one."""

    async def create() -> None:
        store = await Store.open(tmp_path / "state" / "flux-bot.db")
        await store.close()

    asyncio.run(create())


async def test_piped_console_against_the_fake_bfl_api(tmp_path: Path) -> None:
    """`printf '/imagine ...\\n/quota\\n' | flux-bot console --user alice --out DIR` as a real process."""
    async with FakeBfl(pending_polls=1) as bfl:
        env = _base_env(tmp_path) | {"BFL_API_KEY": API_KEY, "BFL_API_URL": bfl.api_url}
        out = tmp_path / "images"
        result = await asyncio.to_thread(
            _cli,
            ["console", "--user", "alice", "--out", str(out)],
            env,
            "/imagine a red cat model=pro\n/quota\n",
        )
    assert result.returncode == 0, result.stderr
    assert "queued on api" in result.stdout and "done on api" in result.stdout
    assert "API spend this month: $0.04" in result.stdout
    assert API_KEY not in result.stdout + result.stderr
    assert len(list(out.glob("*.png"))) == 1

    report = await asyncio.to_thread(_cli, ["admin", "spend"], _base_env(tmp_path))
    assert report.returncode == 0, report.stderr
    assert "console:alice on api: 1 images, $0.04" in report.stdout
    shown = await asyncio.to_thread(_cli, ["admin", "quota", "show", "console:alice"], _base_env(tmp_path))
    assert "images today: 1 of 50 images used" in shown.stdout
    bad = await asyncio.to_thread(_cli, ["admin", "quota", "sett", "alice"], _base_env(tmp_path))
    assert bad.returncode == 1 and "unknown or incomplete admin command" in bad.stderr


def test_bad_config_stops_with_one_line(tmp_path: Path) -> None:
    env = _base_env(tmp_path)
    Path(env["FLUX_BOT_CONFIG"]).write_text('[routing]\nmax_local_wait_s = "soon"\n')
    result = _cli(["console"], env)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "routing.max_local_wait_s" in result.stderr and env["FLUX_BOT_CONFIG"] in result.stderr

    Path(env["FLUX_BOT_CONFIG"]).write_text('[bfl]\napi_key = "sk-123"\n')
    result = _cli(["console"], env)
    assert result.returncode == 2 and "bfl.api_key" in result.stderr and "environment" in result.stderr
    assert "sk-123" not in result.stderr


def test_piped_console_image_text_chunks_survive(tmp_path: Path) -> None:
    """PNG text chunks are what other tools read; check one survives a plain Pillow round trip."""
    from engine.models import Job, JobState, Mode, ResolvedRequest
    from engine.results import png_with_parameters
    from tests.fakes.backends import tiny_png

    request = ResolvedRequest("a fox", "dev", 1024, 1024, "1:1", 28, 3.0, 99, Mode.AUTO)
    job = Job("j1", Requester(Platform.CONSOLE, "a"), request, JobState.DONE, BackendKind.LOCAL, "", 0.0)
    with Image.open(io.BytesIO(png_with_parameters(tiny_png(), job, "FLUX.1 [dev]"))) as image:
        assert image.text["guidance"] == "3.0" and image.text["steps"] == "28"


async def test_admin_user_ids_keep_their_case(make_engine: EngineFactory) -> None:
    """Slack user ids are upper case: a ban must land on the exact user, whatever case the keywords use."""
    engine = await make_engine({})
    admin = Requester(Platform.SLACK, "UADMIN", guild_id="T1", is_admin=True)
    await Commands(engine).admin(admin, "BAN U0BOB")
    record = await engine._store.get_user("slack:T1:U0BOB")
    assert record is not None and record.banned


def test_admin_backup_and_restore_from_the_shell(tmp_path: Path) -> None:
    env = _base_env(tmp_path)
    _first_start(tmp_path)
    assert _cli(["admin", "ban", "console:mallory"], env).returncode == 0
    made = _cli(["admin", "backup"], env)
    assert made.returncode == 0, made.stderr
    backup_file = made.stdout.strip().removeprefix("backup written: ")
    assert Path(backup_file).is_file()
    assert _cli(["admin", "unban", "console:mallory"], env).returncode == 0
    restored = _cli(["admin", "restore", backup_file], env)
    assert restored.returncode == 0 and "restored" in restored.stdout
    shown = _cli(["admin", "quota", "show", "console:mallory"], env)
    assert "BANNED" in shown.stdout  # the state of the backup, not the later unban
    refused = _cli(["admin", "restore", str(tmp_path / "missing.db")], env)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr


async def test_console_admin_report_saves_the_chart_and_alerts_are_printed(
    make_engine: EngineFactory, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings(ops={"failure_alert_rate": 0.5, "failure_alert_min_jobs": 1})
    backend = ScriptedBackend(plan=lambda job, attempt: fail(FailureReason.BAD_REQUEST, retryable=False))
    engine = await make_engine({BackendKind.LOCAL: backend}, settings)
    written: list[str] = []
    alerted = threading.Event()

    def write(line: str) -> None:
        written.append(line)
        if line.startswith("flux-bot alert:"):
            alerted.set()

    def lines() -> Iterator[str]:
        yield "/imagine a doomed cat\n"
        assert alerted.wait(30)  # stdin is read in a worker thread: the report is asked for once the alert is out
        yield "/admin report\n"

    requester = Requester(Platform.CONSOLE, "alice", display_name="alice", is_admin=True)
    console = Console(engine, requester, tmp_path / "out", write=write)
    typed = lines()
    assert await asyncio.wait_for(console.run(lambda: next(typed, "")), 60) == 0
    [alert] = [line for line in written if line.startswith("flux-bot alert:")]
    assert alert.startswith("flux-bot alert: 1 of the 1 jobs that ended in the last hour failed (100%")
    report = written[-1]
    [png] = list((tmp_path / "out").glob("flux-bot-report-*.png"))
    assert report.endswith(f"chart saved: {png}") and "Failures: 1 of 1 jobs (100.0%)" in report
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1200, 800)


def test_admin_report_from_the_shell(tmp_path: Path) -> None:
    env = _base_env(tmp_path)
    _first_start(tmp_path)
    out = tmp_path / "charts" / "report.png"
    result = _cli(["admin", "report", "--out", str(out)], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("flux-bot, last 30 days:") and f"chart written: {out}" in result.stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1200, 800)
    bad = _cli(["admin", "report", "--outfile", "x.png"], env)
    assert bad.returncode == 2 and "usage: flux-bot admin report [--out FILE.png]" in bad.stderr


class Process:
    """`python -m bot ...` as a real process, its output collected as it comes (read from a pipe or a pty)."""

    def __init__(self, proc: asyncio.subprocess.Process, output_fd: int) -> None:
        self.proc, self.fd, self.output = proc, output_fd, ""
        self._more = asyncio.Event()
        self._ended = asyncio.Event()  # the output's end: everything the process wrote has been read
        asyncio.get_running_loop().add_reader(output_fd, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # a pty answers EIO once the process has gone
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(self.fd)
            self._ended.set()
        self.output += chunk.decode(errors="replace")
        self._more.set()

    async def wait_for(self, text: str, after: int = 0, limit_s: float = 60) -> int:
        """Where text appears in the output (searching from after); the bound only guards against a hung test."""
        async with asyncio.timeout(limit_s):
            while text not in self.output[after:]:
                self._more.clear()
                await self._more.wait()
        return self.output.index(text, after)

    async def exit_status(self, limit_s: float = 60) -> int:
        """The exit status, once the output is read to its end too (the exit can be seen before the last output)."""
        async with asyncio.timeout(limit_s):
            status = await self.proc.wait()
            await self._ended.wait()
        return status

    def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.fd)


async def start(args: list[str], env: dict[str, str], *, pty_: bool = False) -> Process:
    if pty_:
        master, slave = pty.openpty()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", *args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO
        )
        os.close(slave)
        return Process(proc, master)
    read, write = os.pipe()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", *args, stdin=subprocess.PIPE, stdout=write, stderr=write, env=env, cwd=REPO
    )
    os.close(write)
    return Process(proc, read)


async def held_task(bfl: FakeBfl) -> FakeTask:
    """The one task the fake API holds Pending, once submitted (a job is "started" before its submit is sent)."""
    async with asyncio.timeout(60):
        while not (held := [task for task in bfl.tasks.values() if task.pending_polls == sys.maxsize]):
            await asyncio.sleep(0.01)
    [task] = held
    return task


async def test_ctrl_c_cancels_queued_jobs_and_the_next_start_delivers_the_running_one(tmp_path: Path) -> None:
    """Ctrl-C with stdin still open ends the process, cancelling the queued job and leaving the running one, which
    the next console resumes, waits for and shows; its image is the stored file, hard-linked into --out."""
    async with FakeBfl(pending_polls=sys.maxsize) as bfl:
        env = _base_env(tmp_path) | {"BFL_API_KEY": API_KEY, "BFL_API_URL": bfl.api_url}
        out = tmp_path / "out"
        first = await start(["console", "--user", "alice", "--out", str(out)], env)
        try:
            assert first.proc.stdin is not None
            first.proc.stdin.write(b"/imagine a red cat model=pro\n")
            await first.wait_for("started on")
            task = await held_task(bfl)
            first.proc.stdin.write(b"/imagine a blue cat model=pro\n")
            await first.wait_for("] queued", after=first.output.index("started on"))
            running, queued = [line.split("]")[0][1:] for line in first.output.splitlines() if "] queued" in line]
            first.proc.send_signal(signal.SIGINT)
            assert await first.exit_status() == 130, first.output
        finally:
            first.close()
        assert "Stopping" in first.output and "Traceback" not in first.output
        assert f"Job {queued} cancelled. You were not charged" in first.output
        assert f"Left running: {running}. The next start resumes it" in first.output

        task.pending_polls = 0  # the API finishes the task while no console runs
        second = await start(["console", "--user", "alice", "--out", str(out)], env)
        try:
            assert second.proc.stdin is not None
            second.proc.stdin.close()  # nothing to type: it waits for the resumed job, then ends
            assert await second.exit_status() == 0, second.output
        finally:
            second.close()
    assert f"Your jobs from an earlier session: {running} (running)" in second.output
    assert f"Waiting for 1 job to finish: {running}." in second.output
    stored = tmp_path / "state" / "images" / f"{running}.png"
    linked = out / f"{running}.png"
    assert f"[{running}] done on api" in second.output and f"saved {stored}, linked as {linked}" in second.output
    assert stored.stat().st_ino == linked.stat().st_ino and [p.name for p in out.glob("*.png")] == [linked.name]
    with Image.open(linked) as image:
        assert image.text["prompt"] == "a red cat" and image.text["model"] == "FLUX1.1 [pro]"


async def test_at_a_terminal_the_prompt_and_the_typed_text_come_back_after_a_job_event(tmp_path: Path) -> None:
    async with FakeBfl(pending_polls=sys.maxsize) as bfl:
        env = _base_env(tmp_path) | {"BFL_API_KEY": API_KEY, "BFL_API_URL": bfl.api_url, "TERM": "dumb"}
        console = await start(["console", "--user", "alice", "--out", str(tmp_path / "out")], env, pty_=True)
        try:
            await console.wait_for("> ")
            os.write(console.fd, b"/imagine a red cat model=pro\r")
            started = await console.wait_for("started on")
            task = await held_task(bfl)
            os.write(console.fd, b"half a li")  # typed, not yet entered, when the result arrives
            await console.wait_for("half a li", after=started)
            task.pending_polls = 0
            done = await console.wait_for("] done on api")
            await console.wait_for("> half a li", after=done)
            os.write(console.fd, b"ne\r")
            await console.wait_for("unknown command 'half'", after=done)
            console.proc.send_signal(signal.SIGINT)
            assert await console.exit_status() == 130, console.output
        finally:
            console.close()
            os.close(console.fd)
    assert "Stopping" in console.output and console.output.endswith("You had no jobs waiting or running.\r\n")


async def test_console_guidance_is_refused_where_ignored_and_saved_where_used(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    written = await run_console(
        make_engine, out, ["/imagine a red cat guidance=3", "/imagine a red cat model=dev guidance=4.5"]
    )
    assert "FLUX.1 [schnell] takes no guidance value" in written[0] and "not charged" in written[0]
    [png] = list(out.glob("*.png"))
    with Image.open(png) as image:
        assert image.text["model"] == "FLUX.1 [dev]" and image.text["guidance"] == "4.5"
