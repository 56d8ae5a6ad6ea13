"""`flux-bot` (== `python -m bot`): run | console | admin | doctor | worker."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from bot.commands import Commands
from bot.console import Console, Terminal
from bot.render import error_message
from bot.systemd_notify import Notifier, watchdog_interval_s, watchdog_loop
from engine.config import DEMO_MODEL, SYSTEM_CONFIG, Secrets, Settings, find_config, load_settings
from engine.errors import ConfigError, EngineError
from engine.models import Platform, Requester
from engine.service import (
    Engine,
    LocalLane,
    backup,
    backup_dir,
    backup_every,
    local_lane,
    local_off_line,
    restore,
    run_worker,
    serving_settings,
)

log = logging.getLogger(__name__)


class RedactSecrets(logging.Filter):
    """Replaces every configured secret in log records, whatever logged it (aiohttp, discord.py, ours)."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if len(s) >= 6]

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = record.getMessage()
            for secret in self._secrets:
                message = message.replace(secret, "[redacted]")
            record.msg, record.args = message, None
        return True


def setup_logging(level: str, secrets: Secrets) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secrets.values()))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


GLOBAL_OPTIONS = ("--config", "--log-level", "--verbose")


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every command takes, before or after its name. The subcommands' copies default to SUPPRESS so
    that an option given only before the name is not reset by the subcommand's own default."""
    suppress: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument(
        "--config",
        type=Path,
        help="config file (default: $FLUX_BOT_CONFIG, else ./config.toml, else /etc/flux-bot/config.toml, "
        "else built-in defaults)",
        **suppress,
    )
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default: INFO when serving a chat platform, WARNING at the console (its own output is the interface)",
        **suppress,
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="first print the config file and database in use (run and doctor always do)",
        **suppress,
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="flux-bot", description="FLUX.1 image generation for Discord and Slack")
    _global_options(top, top=True)
    sub = top.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        made = sub.add_parser(name, help=help)
        _global_options(made, top=False)
        return made

    run = command("run", "start the chat front-ends whose tokens are set (the console if none is)")
    run.add_argument("--sync-guild", type=int, help="sync Discord commands to this guild only (development)")
    run.add_argument("--admin", action="store_true", help="at the console (no chat token): allow /admin commands")
    run.add_argument(
        "--demo", action="store_true", help="use the built-in tiny demo model (its images are noise) and no API"
    )

    console = command("console", "the commands on stdin/stdout")
    console.add_argument("--user", default=None, help="who you are in quotas and jobs (default: your login name)")
    console.add_argument("--out", type=Path, default=None, help="folder for the images (default: STATE_DIR/out)")
    console.add_argument("--admin", action="store_true", help="allow /admin commands")
    console.add_argument("--demo", action="store_true", help="use the built-in tiny demo model and no API")

    admin = command("admin", "quota, spend and routing administration on the bot's database")
    admin.add_argument(
        "words",
        nargs=argparse.REMAINDER,
        help="e.g. quota show console:alice | spend --month 2026-11 | report --out FILE | backup | restore FILE",
    )

    command("doctor", "check the configuration, database, keys and GPU")
    # No option prefix of its own: REMAINDER would otherwise drop the worker's leading --flags (CPython issue 17050),
    # and the worker parses them itself (`flux-bot worker --help` shows its options). The global options do not
    # apply to a worker: it reads no config file.
    worker = sub.add_parser(
        "worker",
        help="run one local FLUX.1 worker process (spawned by the supervisor, or its own unit with --listen)",
        add_help=False,
        prefix_chars="\0",
    )
    worker.add_argument("worker_args", nargs=argparse.REMAINDER)
    return top


def _pull_global_options(args: argparse.Namespace) -> None:
    """Global options written after the admin words (`admin quota show X --config F`) apply too: REMAINDER keeps
    every word after the first positional one, and no admin word starts with these names."""
    words: list[str] = list(args.words)
    kept: list[str] = []
    while words:
        word = words.pop(0)
        name, has_value, value = word.partition("=")
        if name not in GLOBAL_OPTIONS:
            kept.append(word)
        elif name == "--verbose" and not has_value:
            args.verbose = True
        elif name == "--verbose" or not (has_value or words):
            raise SystemExit(f"flux-bot admin: {name} " + ("takes no value" if has_value else "needs a value"))
        else:
            value = value if has_value else words.pop(0)
            if name == "--config":
                args.config = Path(value)
            elif value.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"):
                args.log_level = value.upper()
            else:
                raise SystemExit(f"flux-bot admin: --log-level must be DEBUG, INFO, WARNING or ERROR, not {value!r}")
    args.words = kept


def main(argv: Sequence[str] | None = None, *, system_config: Path = SYSTEM_CONFIG) -> int:
    args = parser().parse_args(argv)
    if args.command == "worker":
        code = run_worker(list(args.worker_args))
        # As `python -m engine.backends.local` does: skip the interpreter's teardown (1-2 s with torch loaded),
        # since the supervisor waits for this exit before starting a successor.
        logging.shutdown()
        os._exit(code)
    if args.command == "admin":
        _pull_global_options(args)
    source = find_config(args.config, system=system_config)
    try:
        settings, secrets = load_settings(source.path)
    except ConfigError as exc:
        if args.command == "doctor":
            from bot.doctor import config_failure

            print(config_failure(exc).line())
            return 1
        print(f"flux-bot: configuration error in {exc.file}: {exc.field}: {exc.problem}", file=sys.stderr)
        return 2
    if args.command in ("run", "doctor") or args.verbose:
        # The first line: which file and which database, so that an edit to the wrong file is seen at once.
        print(f"flux-bot: config {source.describe()}; database {settings.bot.database_path}", flush=True)
    if args.command in ("run", "console") and args.demo:
        settings, secrets = demo_settings(settings, secrets)
    at_the_console = args.command in ("console", "admin") or (
        args.command == "run" and not (secrets.discord_token or secrets.slack_bot_token)
    )
    setup_logging(args.log_level or ("WARNING" if at_the_console else "INFO"), secrets)
    if args.command in ("run", "console") and local_lane(settings, secrets) is LocalLane.NO_WEIGHTS:
        print(local_off_line(settings, secrets), flush=True)
        settings = serving_settings(settings, secrets)
    try:
        match args.command:
            case "run":
                return asyncio.run(run(settings, secrets, args.sync_guild, admin=args.admin, config=source.path))
            case "console":
                user = args.user or getpass.getuser()
                out = args.out or settings.bot.state_dir / "out"
                return asyncio.run(console(settings, secrets, user, out, admin=args.admin, config=source.path))
            case "admin":
                return asyncio.run(admin(settings, secrets, list(args.words)))
            case "doctor":
                return asyncio.run(doctor(settings, secrets))
    except KeyboardInterrupt:
        return 130
    except EngineError as exc:
        print(f"flux-bot: {error_message(exc)}", file=sys.stderr)
        return 1
    return 2


def demo_settings(settings: Settings, secrets: Secrets) -> tuple[Settings, Secrets]:
    """`--demo`: the built-in tiny model on the local backend only, and no API (the BFL key is dropped)."""
    local = settings.local.model_copy(update={"model": DEMO_MODEL, "worker_sockets": ()})
    routing = settings.routing.model_copy(update={"local_enabled": True, "api_enabled": False})
    return settings.model_copy(update={"local": local, "routing": routing}), replace(secrets, bfl_api_key=None)


async def run(
    settings: Settings,
    secrets: Secrets,
    sync_guild: int | None = None,
    *,
    admin: bool = False,
    config: Path | None = None,
) -> int:
    """`config`: the file the settings came from, which a reload of the styles reads again."""
    if secrets.discord_token or secrets.slack_bot_token:
        return await chat(settings, secrets, sync_guild, config=config)
    print("No chat token is set (DISCORD_TOKEN, SLACK_BOT_TOKEN): starting the console front-end.")
    out = settings.bot.state_dir / "out"
    return await console(settings, secrets, getpass.getuser(), out, admin=admin, config=config)


async def chat(settings: Settings, secrets: Secrets, sync_guild: int | None, *, config: Path | None = None) -> int:
    """Serve Discord and/or Slack (whichever tokens are set) on one engine until stopped (SIGTERM or SIGINT);
    SIGHUP (`systemctl reload flux-bot`) reloads the styles."""
    engine = await Engine.open(settings, secrets, config_path=config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def reload_on_hangup() -> None:
        task = asyncio.create_task(reload_styles(engine), name="reload styles")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_on_hangup)
    closers: list[Callable[[], Awaitable[None]]] = []
    serving: list[asyncio.Task[None]] = []
    from bot.takedown import remover

    # One take-down for both front-ends: a result posted on both platforms is removed from both.
    take_down = remover(engine, discord_token=secrets.discord_token, slack_token=secrets.slack_bot_token)
    try:
        if secrets.slack_bot_token:
            from bot.slack_app import CommandNames, SlackFrontEnd

            slack_settings = settings.slack
            slack = SlackFrontEnd(
                engine,
                bot_token=secrets.slack_bot_token,
                signing_secret=secrets.slack_signing_secret,
                app_token=secrets.slack_app_token,
                command_names=CommandNames(
                    slack_settings.command_imagine,
                    slack_settings.command_quota,
                    slack_settings.command_cancel,
                    slack_settings.command_admin,
                    slack_settings.command_queue,
                    slack_settings.command_job,
                    slack_settings.command_settings,
                    slack_settings.command_styles,
                ),
                admin_via_users_info=slack_settings.workspace_admins,
                take_down=take_down,
            )
            closers.append(slack.close)
            await slack.start(host=slack_settings.host, port=slack_settings.port, path=slack_settings.path)
            log.info("Slack front-end serving")
        if secrets.discord_token:
            from bot.discord_app import DiscordFrontEnd

            discord_front_end = DiscordFrontEnd(engine, take_down=take_down)
            closers.append(discord_front_end.close)
            serving.append(asyncio.create_task(discord_front_end.start(secrets.discord_token, sync_guild)))
        async with systemd_service(engine), operations(settings, engine):
            # Discord's client runs until it is closed or fails; Slack serves in the background.
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([*serving, stopped], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            for task in done:
                task.result()  # a front-end that failed (e.g. a refused token) ends the process with its error
            log.info("stopping: %s", "signal received" if stop.is_set() else "a front-end ended")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        for close in reversed(closers):
            await close()
        await asyncio.gather(*serving, return_exceptions=True)
        await engine.close()
    return 0


async def reload_styles(engine: Engine) -> None:
    """SIGHUP: [styles.*] read again; the outcome (or why not) goes to the log, as for any signal."""
    try:
        log.info("%s", await engine.reload_styles(Requester(Platform.CONSOLE, "sighup", is_admin=True)))
    except EngineError as exc:
        log.error("styles not reloaded: %s", error_message(exc))
    except Exception:
        log.exception("styles not reloaded")


@asynccontextmanager
async def operations(settings: Settings, engine: Engine) -> AsyncIterator[None]:
    """The operator's side while serving: /healthz and /metrics, scheduled backups."""
    tasks: list[asyncio.Task[None]] = []
    ops = settings.ops
    ops_server = None
    if ops.http_port:  # 0 = no health and metrics endpoint
        from bot.ops_http import OpsServer

        ops_server = OpsServer(engine)
        port = await ops_server.start(ops.http_host, ops.http_port)
        log.info("health and metrics on http://%s:%d/healthz and /metrics", ops.http_host, port)
    if ops.backup_every_hours:
        every_s = ops.backup_every_hours * 3600
        directory = backup_dir(settings.bot.state_dir)
        tasks.append(
            asyncio.create_task(
                backup_every(engine.database_path, directory, every_s=every_s, keep=ops.backups_keep), name="backups"
            )
        )
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if ops_server is not None:
            await ops_server.close()


@asynccontextmanager
async def systemd_service(engine: Engine) -> AsyncIterator[None]:
    """Under systemd (Type=notify): READY=1 once serving, watchdog pings only while the loop and database answer."""
    notifier = Notifier.from_env()
    interval = watchdog_interval_s()
    watchdog = asyncio.create_task(watchdog_loop(notifier, engine, interval)) if interval else None
    notifier.ready()
    notifier.status("serving")
    try:
        yield
    finally:
        notifier.stopping()
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
        notifier.close()


async def console(
    settings: Settings, secrets: Secrets, user: str, out: Path, *, admin: bool, config: Path | None = None
) -> int:
    engine = await Engine.open(settings, secrets, config_path=config)
    try:
        requester = Requester(Platform.CONSOLE, user, is_admin=admin, display_name=user)
        return await Console(engine, requester, out, terminal=Terminal()).run()
    finally:
        await engine.close()


async def admin(settings: Settings, secrets: Secrets, words: list[str]) -> int:
    """Admin commands at a shell: the same handlers as /admin, on the same database, without dispatching jobs."""
    # Backups work on the database file itself; a restore must not open (and so migrate) the file it replaces.
    if words[:1] == ["restore"] and len(words) == 2:
        restore(Path(words[1]), settings.bot.database_path)
        print(f"restored {words[1]} into {settings.bot.database_path}; start the bot again")
        return 0
    if not settings.bot.database_path.is_file():
        # Opening it would create an empty database: quotas "reset", jobs "gone", on what is only a wrong path.
        print(f"flux-bot: {no_database(settings)}", file=sys.stderr)
        return 1
    if words[:1] == ["backup"] and len(words) == 1:
        directory = backup_dir(settings.bot.state_dir)
        written = await backup(settings.bot.database_path, directory, keep=settings.ops.backups_keep)
        print(f"backup written: {written}")
        return 0
    # `spend --month 2026-11` is `spend 2026-11`; a flag without its value is an error, not "this month".
    if "--month" in words:
        at = words.index("--month")
        if at + 1 >= len(words) or words[at + 1].startswith("-"):
            print("flux-bot admin: --month needs a month, as in: spend --month 2026-11", file=sys.stderr)
            return 2
        words = [*words[:at], *words[at + 1 :]]
    engine = await Engine.open_admin(settings, secrets)
    try:
        operator = Requester(Platform.CONSOLE, f"cli-{getpass.getuser()}", is_admin=True)
        if words[:1] == ["report"]:
            # `admin report [--out FILE]`: the chart to FILE (default: STATE_DIR/out/), the summary to stdout.
            match words[1:]:
                case [] | ["--out", _]:
                    reply = await Commands(engine).report(operator)
                    out = Path(words[2]) if len(words) == 3 else settings.bot.state_dir / "out" / reply.filename
                    out.parent.mkdir(parents=True, exist_ok=True)
                    await asyncio.to_thread(out.write_bytes, reply.png)
                    print(f"{reply.text}\nchart written: {out}")
                    return 0
            print("usage: flux-bot admin report [--out FILE.png]", file=sys.stderr)
            return 2
        if words == ["styles", "reload"]:
            # This process serves no worker: the running bot reloads its own, on SIGHUP.
            print(
                "flux-bot admin: reload the running bot's styles with `systemctl reload flux-bot` (SIGHUP), or"
                " /admin styles reload in chat",
                file=sys.stderr,
            )
            return 2
        if words[:1] == ["takedown"]:
            # `admin takedown JOB --reason WHY...`: the platforms' REST APIs with this host's tokens (no chat client).
            match words[1:]:
                case [job_id, "--reason", *why] if why:
                    from bot.takedown import take_down  # the chat platforms' clients, needed only here

                    report = await take_down(
                        engine,
                        operator,
                        job_id,
                        " ".join(why),
                        discord_token=secrets.discord_token,
                        slack_token=secrets.slack_bot_token,
                    )
                    print(report)
                    return 0
            print("usage: flux-bot admin takedown JOB --reason WHY", file=sys.stderr)
            return 2
        text = " ".join(_quote(word) for word in words)
        print(await Commands(engine).admin(operator, text))
        return 0
    except EngineError as exc:
        print(error_message(exc), file=sys.stderr)
        return 1
    finally:
        await engine.close()


def no_database(settings: Settings) -> str:
    path = settings.bot.database_path
    return (
        f"no database at {path}: the bot creates it when it first starts (`flux-bot run`); if it is somewhere "
        "else, select that config file (--config, $FLUX_BOT_CONFIG) or fix [bot] state_dir and database"
    )


def _quote(word: str) -> str:
    return word if word and " " not in word else repr(word)


async def doctor(settings: Settings, secrets: Secrets) -> int:
    """One line per check, with a fix hint; non-zero exit when any check fails."""
    from bot.doctor import failed, run_checks

    checks = await run_checks(settings, secrets)
    for check in checks:
        print(check.line())
    return 1 if failed(checks) else 0


if __name__ == "__main__":
    sys.exit(main())
