"""The Slack front-end: slash commands, throttled progress updates, the result in a thread, buttons and admin commands.

Like the Discord adapter it only translates: a slash command or button click becomes a Requester and a bot.commands
call, engine events become chat.update calls and a files_upload_v2 with texts from bot.render. Admin rights, bounds
and quotas are decided by the engine.

Acknowledging: Slack drops a command not acknowledged within 3 seconds. Submitting a job is one SQLite write, well
inside that, so the command submits first and acknowledges with the queued note (route, reason, position, ETA, cost)
or the error: the user's one ephemeral answer arrives with the ack, and no response_url round trip is needed.

Text in and out: Slack escapes `&`, `<` and `>` in what users type and writes mentions and links as `<...>` markup;
`plain_text` (bot/slack_blocks.py, with the blocks and modals) turns that back into the words the user saw before
anything else reads it. Going out, every text is plain (bot.render's texts and the user's words in them alike) and
`markup` escapes it whole, so a prompt holding
`<!channel>` shows those characters and pings nobody; the only live markup is what the bot adds itself (the
requester's mention, a channel link). Every post goes through the `_post`, `_chat_update`, `_ephemeral`, `_upload` and
`_ack` helpers, which do that; tests/bot/test_slack.py fails if a Slack send method is called anywhere else.

Images in: slash commands cannot carry files, so an edit starts from the "Edit with FLUX" message shortcut on a message
with an image (or the Edit button under a result). Its modal keeps only the channel and the file's id; on submit the
file is looked up with files.info and downloaded with the bot token, and only the bytes go to the engine, which
checks them. Slack's file addresses need the token and are never stored or passed on. Without the files:read scope
Slack answers a download with its HTML login page, not an error: that is told to the user as a missing scope.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from bot import render
from bot.commands import Commands, TakeDown
from bot.delivery import ChannelDelivery, follow, forward_alerts, reviewer, warn_no_review_channel
from bot.slack_blocks import (
    EDIT_BLOCK,
    EDIT_IMAGE_SHORTCUT,
    EDIT_IMAGE_VIEW,
    EDIT_INPUT,
    EDIT_VIEW,
    INSTRUCTION_BLOCK,
    INSTRUCTION_INPUT,
    MAX_INPUT_CHARS,
    NO_IMAGE_IN_MESSAGE,
    NOT_AN_ADMIN_FOR_REVIEW,
    REJECTED_IN_REVIEW,
    VARIATIONS,
    AppealAction,
    Markup,
    ResultAction,
    ReviewAction,
    appeal_blocks,
    clip,
    edit_image_view,
    edit_prompt_view,
    escape,
    held_comment,
    markup,
    parse_imagine,
    result_blocks,
    review_blocks,
)
from bot.slack_files import SlackFileError, SlackFiles, first_image_file
from engine.errors import ConfigError, EngineError, InvalidRequest, PolicyBlocked
from engine.models import Job, JobDone, JobEvent, JobHeld, JobQueued, Platform, Posting, Requester, Review
from engine.service import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CommandNames:
    """Slash command names as registered in the Slack app's manifest (a workspace may already use /imagine)."""

    imagine: str = "/imagine"
    quota: str = "/imagine-quota"
    cancel: str = "/imagine-cancel"
    admin: str = "/imagine-admin"
    queue: str = "/imagine-queue"
    job: str = "/imagine-job"
    settings: str = "/imagine-settings"
    styles: str = "/imagine-styles"


class ChannelPacer:
    """Spaces chat.update calls in one channel by at least the interval: Slack rate-limits updates per channel."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._next: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def turn(self, channel: str) -> None:
        async with self._locks.setdefault(channel, asyncio.Lock()):
            wait = self._next.get(channel, 0.0) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._next[channel] = time.monotonic() + self._interval_s


class SlackFrontEnd:
    def __init__(
        self,
        engine: Engine,
        *,
        bot_token: str,
        signing_secret: str | None = None,
        app_token: str | None = None,
        client_base_url: str | None = None,
        command_names: CommandNames = CommandNames(),
        edit_interval_s: float = 1.5,
        admin_via_users_info: bool = False,
        take_down: TakeDown | None = None,
    ) -> None:
        if app_token is None and not signing_secret:
            raise ConfigError(
                "environment", "SLACK_SIGNING_SECRET", "Slack HTTP mode needs the signing secret to verify requests"
            )
        self.engine = engine
        self.commands = Commands(engine, take_down=take_down)
        self.edit_interval_s = edit_interval_s
        self.admin_via_users_info = admin_via_users_info
        self.command_names = command_names
        self.alert_channel = engine.settings.ops.alert_slack_channel_id  # alerts and admin reports go here ("" = none)
        # The default client retries only connection errors; a 429 is waited out for its Retry-After.
        self.client = AsyncWebClient(
            token=bot_token,
            base_url=client_base_url or AsyncWebClient.BASE_URL,
            retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=2)],
        )
        self.app = AsyncApp(
            client=self.client,
            signing_secret=signing_secret or "",
            # Socket Mode frames arrive over an authenticated websocket and are not signed.
            request_verification_enabled=app_token is None,
            logger=log,
        )
        self.pacer = ChannelPacer(edit_interval_s)
        self.files = SlackFiles(self.client, max_bytes=round(engine.settings.images.max_input_mb * 1_000_000))
        self._tasks: set[asyncio.Task[None]] = set()
        # Jobs a command follows are delivered by it; the rest (a restart's) go to their channel.
        self._orphans = ChannelDelivery(engine, Platform.SLACK, lambda job, event: self._deliver(job, event, None))
        self._runner: web.AppRunner | None = None
        # Built here, connected by start(): the websocket needs Slack itself, construction does not.
        self.socket_mode = None if app_token is None else AsyncSocketModeHandler(self.app, app_token)
        self._add_listeners()

    # ---- life cycle ----

    async def start(self, *, host: str = "127.0.0.1", port: int = 3000, path: str = "/slack/events") -> None:
        """Start delivering, then serve: Socket Mode with an app token, else HTTP on host:port (loopback default)."""
        self._spawn(self._orphans.run(), "slack: results for the channel")
        self._spawn(self._orphans.backlog(), "slack: results after a restart")
        self._spawn(self._orphans.sweep(), "slack: results decided by another process")
        if self.alert_channel:
            self._spawn(
                forward_alerts(self.engine, self._post_alert, f"Slack channel {self.alert_channel}"), "slack: alerts"
            )
        if self.socket_mode is not None:
            await self.socket_mode.connect_async()  # type: ignore[no-untyped-call]  # bolt leaves it unannotated
            return
        server = web.Application()
        server.router.add_post(path, self._http)
        self._runner = web.AppRunner(server)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()

    @property
    def http_address(self) -> tuple[str, int]:
        """Where HTTP mode listens (the real port when started on port 0)."""
        if self._runner is None:
            raise RuntimeError("HTTP mode is not running")
        host, port = self._runner.addresses[0][:2]
        return str(host), int(port)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.socket_mode is not None:
            await self.socket_mode.close_async()  # type: ignore[no-untyped-call]
        if self._runner is not None:
            await self._runner.cleanup()

    async def _http(self, request: web.Request) -> web.Response:
        # Bolt's request verification middleware answers 401 to unsigned, badly signed and stale (> 5 min) requests.
        return await to_aiohttp_response(await self.app.async_dispatch(await to_bolt_request(request)))

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- commands ----

    def _add_listeners(self) -> None:
        names = self.command_names
        self.app.command(names.imagine)(self._on_imagine)
        self.app.command(names.quota)(self._on_quota)
        self.app.command(names.cancel)(self._on_cancel)
        self.app.command(names.admin)(self._on_admin)
        self.app.command(names.queue)(self._on_queue)
        self.app.command(names.job)(self._on_job)
        self.app.command(names.settings)(self._on_settings)
        self.app.command(names.styles)(self._on_styles)
        for action in ResultAction:
            self.app.action(action.value)(self._on_action)
        for review in ReviewAction:
            self.app.action(review.value)(self._on_review)
        self.app.action(AppealAction.FILE.value)(self._on_appeal)
        for decision in (AppealAction.ALLOW, AppealAction.DENY):
            self.app.action(decision.value)(self._on_appeal_decision)
        self.app.view(EDIT_VIEW)(self._on_edited_prompt)
        self.app.shortcut(EDIT_IMAGE_SHORTCUT)(self._on_edit_image_shortcut)
        self.app.view(EDIT_IMAGE_VIEW)(self._on_edit_image_submitted)

    async def _requester(
        self, context: AsyncBoltContext, name: object, *, check_admin: bool = False, channel: str | None = None
    ) -> Requester:
        """Who asked, from the ids bolt read out of the payload; `name` is the payload's user name, which bolt does
        not keep, and `channel` stands in for the context's (a modal's submit has none)."""
        user_id = context.user_id or ""
        channel = channel or context.channel_id
        is_admin = check_admin and self.admin_via_users_info and await self._workspace_admin(user_id)
        return Requester(
            Platform.SLACK,
            user_id,
            guild_id=context.team_id or None,
            channel_id=channel or None,
            is_admin=is_admin,
            display_name=str(name) if name else None,
            age_restricted=bool(channel) and channel in self.engine.settings.review.age_restricted_slack_channels,
        )

    async def _workspace_admin(self, user_id: str) -> bool:
        """Asked on every admin check, so a demoted admin loses rights at once; a failed lookup grants nothing."""
        try:
            info = await self.client.users_info(user=user_id)
        except Exception:
            log.exception("users.info failed for %s; treating them as not an admin", user_id)
            return False
        user = info.get("user") or {}
        return bool(user.get("is_admin") or user.get("is_owner"))

    async def _answer(
        self,
        ack: AsyncAck,
        command: dict[str, Any],
        context: AsyncBoltContext,
        handler: Callable[[Requester], Awaitable[str | Markup]],
        *,
        check_admin: bool = False,
    ) -> None:
        """Ack with the handler's text (ephemeral: the default for a slash command's answer).

        check_admin: where admin rights matter (admin commands, cancelling another's job), so users.info is only
        asked then and stays off the 3-second path of /imagine.
        """
        answer: str | Markup
        try:
            answer = await handler(await self._requester(context, command.get("user_name"), check_admin=check_admin))
        except PolicyBlocked as exc:
            if exc.appeal_id is None:
                answer = render.error_message(exc)
            else:
                await self._ack(ack, f"{render.error_message(exc)} {render.APPEAL_OFFER}", appeal=exc.appeal_id)
                return
        except EngineError as exc:
            answer = render.error_message(exc, self.engine.capabilities())
        except Exception:
            log.exception("slack %s failed", command.get("command", "?"))
            answer = render.INTERNAL_ERROR
        await self._ack(ack, answer)

    @staticmethod
    async def _ack(ack: AsyncAck, answer: str | Markup, *, appeal: str | None = None) -> None:
        """`appeal` (an appeal id) adds the requester's Appeal button under the same text."""
        text = answer.text if isinstance(answer, Markup) else markup(answer)
        blocks = appeal_blocks(text, appeal, for_admins=False) if appeal else None
        await ack(text=text, blocks=blocks, response_type="ephemeral")

    async def _on_quota(self, ack: AsyncAck, command: dict[str, Any], context: AsyncBoltContext) -> None:
        await self._answer(ack, command, context, self.commands.quota)

    async def _on_queue(self, ack: AsyncAck, command: dict[str, Any], context: AsyncBoltContext) -> None:
        await self._answer(ack, command, context, self.commands.queue)

    async def _on_job(self, ack: AsyncAck, command: dict[str, Any], context: AsyncBoltContext) -> None:
        job_id = str(command.get("text", "")).strip()
        await self._answer(ack, command, context, lambda r: self.commands.job(r, job_id))

    async def _on_settings(self, ack: AsyncAck, command: dict[str, Any], context: AsyncBoltContext) -> None:
        name, _, value = str(command.get("text", "")).strip().partition(" ")
        await self._answer(
            ack, command, context, lambda r: self.commands.settings(r, name or None, value.strip() or None)
        )

    async def _on_styles(self, ack: AsyncAck, command: dict[str, Any], context: AsyncBoltContext) -> None:
        async def styles(_requester: Requester) -> str:
            return self.commands.styles()

        await self._answer(ack, command, context, styles)

    async def _on_cancel(self, ack: AsyncAck, command: dict[str, Any], context: AsyncBoltContext) -> None:
        async def run(requester: Requester) -> str:
            return render.cancelled_text(await self.commands.cancel(requester, str(command.get("text", "")).strip()))

        await self._answer(ack, command, context, run, check_admin=True)

    async def _on_admin(self, ack: AsyncAck, command: dict[str, Any], context: AsyncBoltContext) -> None:
        text = str(command.get("text", ""))
        if text.strip().lower() != "report":
            await self._answer(ack, command, context, lambda r: self.commands.admin(r, text), check_admin=True)
            return

        async def start_report(requester: Requester) -> Markup:
            # Drawing the chart can take longer than Slack's 3 seconds: ack now (after the rights check), post later.
            # A file cannot be ephemeral on Slack, so the chart goes to the admin channel when there is one, else to
            # the channel the admin asked in.
            self.engine.require_admin(requester, "report")
            channel = self.alert_channel or requester.channel_id
            if channel is None:
                raise InvalidRequest("this command needs a channel to post the chart in")
            self._spawn(self._post_report(requester, channel), "slack: admin report")
            return Markup(
                escape("Building the report; the chart and its summary will be posted in ") + f"<#{channel}>."
            )

        await self._answer(ack, command, context, start_report, check_admin=True)

    async def _post_report(self, requester: Requester, channel: str) -> None:
        try:
            reply = await self.commands.report(requester)
            await self._upload(channel, reply.png, reply.filename, reply.text)
        except Exception:
            log.exception("could not post the admin report to %s", channel)
            with contextlib.suppress(Exception):  # Slack itself may be what failed; the log has it either way
                await self._ephemeral(requester, render.INTERNAL_ERROR)

    async def _post_alert(self, text: str) -> None:
        await self._post(self.alert_channel, text)

    async def _on_imagine(self, ack: AsyncAck, command: dict[str, Any], context: AsyncBoltContext) -> None:
        async def run(requester: Requester) -> str:
            args = parse_imagine(str(command.get("text", "")))
            return await self._imagine(requester, args.prompt, args.options)

        await self._answer(ack, command, context, run)

    async def _imagine(self, requester: Requester, prompt: str, options: dict[str, str]) -> str:
        """Submit and start following; the queued note for the user."""
        return await self._following(await self.commands.imagine(requester, prompt, options))

    async def _following(self, queued: JobQueued) -> str:
        """Follow a submitted job into its channel as /imagine's are; the queued note for the user."""
        self._orphans.follow(queued.job_id)
        self._spawn(self._follow(queued), f"slack: follow {queued.job_id}")
        job = await self.engine.get_job(queued.job_id)
        return render.queued_text(queued, self.commands.model_display(job.request.model))

    # ---- following a job: progress message, throttled updates, result in its thread ----

    async def _follow(self, queued: JobQueued) -> None:
        try:
            job = await self.engine.get_job(queued.job_id)
            channel = job.requester.channel_id
            if channel is None:
                raise ValueError("a Slack job without a channel")
            mention = job.requester.user_id
            ts: str | None = None  # the progress message, once posted

            async def show(text: str, _preview: bytes | None) -> None:
                nonlocal ts
                if ts is None:
                    ts = await self._post(channel, text, mention=mention)
                else:
                    await self._update(channel, ts, text, mention=mention)

            await follow(
                self.engine,
                queued,
                self.commands.model_display(job.request.model),
                show=show,
                deliver=lambda event: self._deliver(job, event, ts),
                interval_s=self.edit_interval_s,
            )
        except Exception:
            log.exception("job %s: following it on Slack failed", queued.job_id)

    async def _update(self, channel: str, ts: str, text: str, *, mention: str | None = None) -> None:
        """A progress update; a lost one only costs a stale bar, so failures are logged, not raised."""
        await self.pacer.turn(channel)
        try:
            await self._chat_update(channel, ts, text, mention=mention)
        except Exception as exc:
            log.info("slack progress update in %s failed: %s", channel, exc)

    # ---- the only calls that send text to Slack: plain text in, escaped here (see the module's docstring) ----

    async def _post(
        self,
        channel: str,
        text: str,
        *,
        mention: str | None = None,
        review: str | None = None,
        appeal: str | None = None,
    ) -> str:
        """chat.postMessage; `review` (a job id) adds the review buttons under the same text, `appeal` (an appeal id)
        the admins' Allow / Keep refused. The new message's ts."""
        shown = markup(text, mention=mention)
        blocks = None
        if review:
            blocks = review_blocks(shown, review)
        elif appeal:
            blocks = appeal_blocks(shown, appeal, for_admins=True)
        posted = await self.client.chat_postMessage(channel=channel, text=shown, blocks=blocks)
        return str(posted["ts"])

    async def _chat_update(
        self,
        channel: str,
        ts: str,
        text: str,
        *,
        mention: str | None = None,
        buttons: tuple[str, str] | None = None,
        without_buttons: bool = False,
    ) -> None:
        """chat.update; `buttons` (job id, file id) adds the result's blocks, which show the same text;
        `without_buttons` replaces a message's blocks (the review buttons) with the text alone."""
        shown = markup(text, mention=mention)
        blocks: list[dict[str, Any]] | None = None
        if buttons:
            blocks = result_blocks(shown, *buttons)
        elif without_buttons:
            blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": shown}}]
        await self.client.chat_update(channel=channel, ts=ts, text=shown, blocks=blocks)

    async def _upload(
        self, channel: str, data: bytes, filename: str, comment: str, thread_ts: str | None = None
    ) -> str:
        """files_upload_v2 with its comment; the uploaded file's id."""
        uploaded = await self.client.files_upload_v2(
            channel=channel, thread_ts=thread_ts, file=data, filename=filename, initial_comment=markup(comment)
        )
        return str(uploaded["files"][0]["id"])

    async def _deliver(self, job: Job, event: JobEvent, ts: str | None) -> None:
        """The terminal message on the progress message (a new one after a restart), the image in its thread."""
        channel = job.requester.channel_id
        if channel is None:
            log.warning("job %s: no channel to deliver to", job.id)
        else:
            mention = job.requester.user_id
            if ts is None:
                ts = await self._post(channel, f"job {job.id}", mention=mention)
            if isinstance(event, JobDone):
                display = self.commands.model_display(job.request.model)
                # Plain here: the whole caption is escaped when sent.
                caption = render.done_caption(job, event, display, render.plain, demo=self.engine.demo)
                png = event.image  # the stored result, which already carries its parameters (engine.results)
                file_id = await self._upload(channel, png, f"{job.id}.png", caption, thread_ts=ts)
                await self._record_posting(Posting(job.id, Platform.SLACK, channel, ts, file_id))
                await self._chat_update(channel, ts, caption, mention=mention, buttons=(job.id, file_id))
            else:
                ended = render.ended_text(event, self.engine.capabilities())
                await self._chat_update(channel, ts, ended, mention=mention)
        if isinstance(event, JobHeld):
            await self._send_to_review(job)
        # Shielded: close() cancels this task, and a store write cut off mid-transaction would break the store.
        await asyncio.shield(self.engine.mark_delivered(job.id))

    async def _record_posting(self, posting: Posting) -> None:
        """Remember the result's message (its ts) and file, for a take-down; a failure never undoes the delivery."""
        try:
            await asyncio.shield(self.engine.record_posting(posting))
        except Exception:
            log.exception("job %s: could not record its Slack posting (file %s)", posting.job_id, posting.file_id)

    # ---- result buttons ----

    async def _on_action(
        self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        await ack()
        job_id, _, file_id = str(action.get("value", "")).partition(":")
        action_id = str(action.get("action_id"))
        requester = await self._requester(context, _user_name(body), check_admin=action_id == ResultAction.DELETE)
        try:
            match action_id:
                case ResultAction.DELETE:
                    await self._delete(body, requester, job_id, file_id)
                    return
                case ResultAction.EDIT_PROMPT:
                    await self._open_edit_prompt(body, requester, job_id)
                    return
                case ResultAction.EDIT_IMAGE:
                    await self._open_edit_result(body, requester, job_id)
                    return
                case ResultAction.VARY_SUBTLE | ResultAction.VARY_STRONG | ResultAction.OLD_VARY:
                    queued = await self.commands.vary(requester, job_id, VARIATIONS[ResultAction(action_id)])
                case _:
                    args = await self.commands.reroll(job_id)
                    queued = await self.commands.imagine(requester, args.prompt, args.options)
            note = await self._following(queued)
        except EngineError as exc:
            note = render.error_message(exc, self.engine.capabilities())
        except Exception:
            log.exception("slack button %s on job %s failed", action_id, job_id)
            note = render.INTERNAL_ERROR
        await self._ephemeral(requester, note)

    # ---- review: held images in the admins' review channel, decided with its buttons ----

    async def _send_to_review(self, job: Job) -> None:
        """The held image and its Approve / Reject buttons in the review channel; nowhere else. A failure is logged:
        the image still waits for `/imagine-admin review` or `flux-bot admin review`."""
        channel = self.engine.settings.review.slack_channel_id
        if not channel:
            warn_no_review_channel(job.id, "slack_channel_id", "/imagine-admin review")
            return
        try:
            # The bot reads the image for the admins' channel; only this read uses its admin rights.
            image = await self.engine.held_image(reviewer(Platform.SLACK), job.id)
            job = await self.engine.get_job(job.id)  # as stored now: a follower's copy predates the review
            file_id = await self._upload(channel, image, f"{job.id}-held.png", held_comment(job))
            # A posting too: an approved image stays in the review channel, which a take-down must clear.
            await self._record_posting(Posting(job.id, Platform.SLACK, channel, None, file_id))
            await self._post(
                channel,
                f"Job {job.id} is held for review. Approve posts it in the channel it was asked in; Reject deletes"
                " it and tells the requester; Reject and ban also bans them.",
                review=job.id,
            )
        except Exception:
            log.exception(
                "job %s: could not post it to the review channel %s; it waits for `/imagine-admin review`",
                job.id,
                channel,
            )

    async def _on_review(
        self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        """Approve, Reject or Reject and ban: admin rights are checked on every press (the engine checks again)."""
        await ack()
        job_id = str(action.get("value", "")).strip()
        decision = ReviewAction(str(action.get("action_id")))
        admin = await self._requester(context, _user_name(body), check_admin=True)
        if not self.engine.is_admin(admin):
            await self._ephemeral(admin, NOT_AN_ADMIN_FOR_REVIEW)
            return
        who = f"{admin.display_name} ({admin.user_id})" if admin.display_name else admin.user_id
        try:
            job = await self.engine.get_job(job_id)
            if job.review is not Review.HELD:
                state = job.review.value or "not held for review"
                await self._ephemeral(admin, f"Job {job_id} was already {state}; nothing was changed.")
                return
            if decision is ReviewAction.APPROVE:
                await self.engine.approve(admin, job_id)
                verdict = f"Job {job_id}: approved by {who}; it is posted in the channel it was asked in."
            else:
                ban = decision is ReviewAction.BAN
                await self.engine.reject(admin, job_id, REJECTED_IN_REVIEW, ban=ban)
                banned = " and its requester banned" if ban else ""
                verdict = f"Job {job_id}: rejected by {who}{banned}; the image is deleted."
        except EngineError as exc:
            await self._ephemeral(admin, render.error_message(exc, self.engine.capabilities()))
            return
        except Exception:
            log.exception("slack review button %s on job %s failed", decision.value, job_id)
            await self._ephemeral(admin, render.INTERNAL_ERROR)
            return
        log.info("job %s: %s in review on Slack by %s", job_id, decision.value, admin.user_key)
        ts = (body.get("message") or {}).get("ts") or (body.get("container") or {}).get("message_ts")
        if admin.channel_id and ts:
            try:
                await self._chat_update(admin.channel_id, str(ts), verdict, without_buttons=True)
            except Exception:
                log.exception("job %s: the review message could not be updated", job_id)

    # ---- appeals: a refused prompt to the admins, who allow it (it runs, charged as usual) or keep it refused ----

    async def _on_appeal(
        self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        """The Appeal button under a refused prompt (a second press is answered: appealed already)."""
        await ack()
        requester = await self._requester(context, _user_name(body))
        try:
            appeal = await self.engine.appeal(requester, str(action.get("value", "")))
        except EngineError as exc:
            await self._ephemeral(requester, render.error_message(exc))
            return
        await self._ephemeral(requester, render.APPEAL_FILED)
        log.info("appeal %s filed on Slack by %s", appeal.id, requester.user_key)
        channel = self.engine.settings.review.slack_channel_id
        if not channel:
            log.warning("appeal %s waits for an admin and no [review] slack_channel_id is set", appeal.id)
            return
        try:
            await self._post(channel, render.appeal_caption(appeal, render.plain), appeal=appeal.id)
        except Exception:
            log.exception("appeal %s: could not post it to the review channel %s", appeal.id, channel)

    async def _on_appeal_decision(
        self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        """Allow and run / Keep refused: admin rights checked on every press (the engine checks again)."""
        await ack()
        appeal_id = str(action.get("value", "")).strip()
        admin = await self._requester(context, _user_name(body), check_admin=True)
        if not self.engine.is_admin(admin):
            await self._ephemeral(admin, "Only admins can decide appeals; nothing was changed.")
            return
        allow = AppealAction(str(action.get("action_id"))) is AppealAction.ALLOW
        try:
            appeal = await self.commands.decide_appeal(admin, appeal_id, allow)
        except EngineError as exc:
            await self._ephemeral(admin, render.error_message(exc, self.engine.capabilities()))
            return
        except Exception:
            log.exception("slack appeal button on %s failed", appeal_id)
            await self._ephemeral(admin, render.INTERNAL_ERROR)
            return
        who = f"{admin.display_name} ({admin.user_id})" if admin.display_name else admin.user_id
        ts = (body.get("message") or {}).get("ts") or (body.get("container") or {}).get("message_ts")
        with contextlib.suppress(Exception):
            if admin.channel_id and ts:
                await self._chat_update(
                    admin.channel_id, str(ts), render.appeal_decided_text(appeal, who), without_buttons=True
                )
        if appeal.requester.platform is Platform.SLACK:
            try:
                await self._ephemeral(appeal.requester, render.appeal_outcome_text(appeal, render.plain))
            except Exception:
                log.exception("appeal %s: could not tell its requester", appeal.id)

    async def _open_edit_prompt(self, body: dict[str, Any], requester: Requester, job_id: str) -> None:
        if requester.channel_id is None:
            raise InvalidRequest("this button needs the channel it was pressed in")
        job = await self.engine.get_job(job_id)
        limit = min(MAX_INPUT_CHARS, self.engine.settings.policy.max_prompt_chars)
        view = edit_prompt_view(job, requester.channel_id, limit)
        await self.client.views_open(trigger_id=str(body.get("trigger_id", "")), view=view)

    async def _on_edited_prompt(
        self, ack: AsyncAck, body: dict[str, Any], view: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        """The modal's submit: a refusal is shown in the modal, next to the prompt; success closes it and answers
        ephemerally in the channel, as the other buttons do."""
        try:
            meta = json.loads(str(view.get("private_metadata") or "{}"))
            job_id, channel = str(meta["job"]), str(meta["channel"])
            prompt = str(view["state"]["values"][EDIT_BLOCK][EDIT_INPUT].get("value") or "")
        except (ValueError, KeyError, TypeError):
            log.warning("slack: an edit-prompt submit without its job, channel or prompt: %r", view.get("id"))
            await ack(response_action="errors", errors={EDIT_BLOCK: render.INTERNAL_ERROR})
            return
        requester = await self._requester(context, _user_name(body), channel=channel)
        try:
            args = await self.commands.edited_prompt(job_id, prompt)
            note = await self._imagine(requester, args.prompt, args.options)
        except EngineError as exc:
            await ack(response_action="errors", errors={EDIT_BLOCK: clip(render.error_message(exc))})
            return
        except Exception:
            log.exception("slack edit-prompt submit on job %s failed", job_id)
            await ack(response_action="errors", errors={EDIT_BLOCK: render.INTERNAL_ERROR})
            return
        await ack()
        await self._ephemeral(requester, note)

    # ---- editing an image: the message shortcut on a shared image, the Edit button on a result ----

    def _instruction_chars(self) -> int:
        return min(MAX_INPUT_CHARS, self.engine.settings.policy.max_prompt_chars)

    async def _on_edit_image_shortcut(self, ack: AsyncAck, body: dict[str, Any], context: AsyncBoltContext) -> None:
        """The "Edit with FLUX" shortcut on a message: a modal for the instruction when the message has an image file,
        else one ephemeral refusal. The file is fetched on submit: the trigger_id that opens the modal lasts 3 s."""
        await ack()
        requester = await self._requester(context, _user_name(body))
        message = body.get("message") or {}
        image = first_image_file(message)
        try:
            if requester.channel_id is None:
                raise InvalidRequest("this shortcut needs the channel of the message it was used on")
            if image is None:
                await self._ephemeral(requester, NO_IMAGE_IN_MESSAGE)
                return
            source = {"channel": requester.channel_id, "file": str(image["id"]), "ts": str(message.get("ts", ""))}
            view = edit_image_view(source, self._instruction_chars())
            await self.client.views_open(trigger_id=str(body.get("trigger_id", "")), view=view)
        except EngineError as exc:
            await self._ephemeral(requester, render.error_message(exc, self.engine.capabilities()))
        except Exception:
            log.exception("slack: Edit with FLUX on a message in %s failed", requester.channel_id)
            await self._ephemeral(requester, render.INTERNAL_ERROR)

    async def _open_edit_result(self, body: dict[str, Any], requester: Requester, job_id: str) -> None:
        if requester.channel_id is None:
            raise InvalidRequest("this button needs the channel it was pressed in")
        # Asked before the modal opens, so nobody types an instruction for an image that is gone.
        await self.engine.result_image(job_id)
        view = edit_image_view({"channel": requester.channel_id, "job": job_id}, self._instruction_chars())
        await self.client.views_open(trigger_id=str(body.get("trigger_id", "")), view=view)

    async def _on_edit_image_submitted(
        self, ack: AsyncAck, body: dict[str, Any], view: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        """The edit-image modal's submit. The modal closes at once and the answer comes ephemerally in the channel:
        fetching a large image from Slack and checking it can take longer than the 3 seconds a submit's ack has."""
        try:
            source = json.loads(str(view.get("private_metadata") or "{}"))
            channel = str(source["channel"])
            instruction = str(view["state"]["values"][INSTRUCTION_BLOCK][INSTRUCTION_INPUT].get("value") or "")
            if "job" not in source and "file" not in source:
                raise KeyError("job or file")
        except (ValueError, KeyError, TypeError):
            log.warning("slack: an edit-image submit without its channel, image or instruction: %r", view.get("id"))
            await ack(response_action="errors", errors={INSTRUCTION_BLOCK: render.INTERNAL_ERROR})
            return
        await ack()
        requester = await self._requester(context, _user_name(body), channel=channel)
        self._spawn(self._edit_image(requester, source, instruction), "slack: edit an image")

    async def _edit_image(self, requester: Requester, source: dict[str, Any], instruction: str) -> None:
        try:
            if "job" in source:
                queued = await self.commands.edit_result(requester, str(source["job"]), instruction)
            else:
                image = await self.files.download(str(source["file"]))
                queued = await self.commands.edit(requester, image, instruction)
                log.info("job %s edits file %s of message %s", queued.job_id, source["file"], source.get("ts"))
            note = await self._following(queued)
        except SlackFileError as exc:
            log.info("slack: file %s could not be fetched for %s: %s", source.get("file"), requester.user_key, exc)
            note = f"{exc.text} {render.NOT_CHARGED}"
        except EngineError as exc:
            note = render.error_message(exc, self.engine.capabilities())
        except Exception:
            log.exception("slack: editing %s for %s failed", source, requester.user_key)
            note = render.INTERNAL_ERROR
        await self._ephemeral(requester, note)

    async def _delete(self, body: dict[str, Any], requester: Requester, job_id: str, file_id: str) -> None:
        job = await self.commands.deletable(requester, job_id)
        # The message under the button; bolt's context has its channel but not its ts.
        ts = (body.get("message") or {}).get("ts") or (body.get("container") or {}).get("message_ts")
        await self.engine.delete_result(requester, job.id)  # the stored image too, not only the message
        await self.client.chat_delete(channel=str(requester.channel_id), ts=str(ts))
        if file_id:
            await self.client.files_delete(file=file_id)
        log.info("job %s: result deleted on Slack by %s", job.id, requester.user_key)

    async def _ephemeral(self, requester: Requester, text: str) -> None:
        if requester.channel_id is None:
            log.warning("no channel for an ephemeral answer to %s: %s", requester.user_key, text)
            return
        await self.client.chat_postEphemeral(channel=requester.channel_id, user=requester.user_id, text=markup(text))


def _user_name(body: dict[str, Any]) -> object:
    """An interaction's user name (bolt's context keeps the user's id only)."""
    user = body.get("user") or {}
    return user.get("username") or user.get("name")
