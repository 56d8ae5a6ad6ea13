"""The Discord front-end: slash commands, live progress edits, result buttons and admin commands.

It only translates: an interaction becomes a Requester and a bot.commands call, engine events become message edits
and followups with texts from bot.render. It decides nothing; admin rights, bounds and quotas are the engine's.

Images to work from (/imagine's `image`, /edit, the "Edit with FLUX" message menu) are downloaded as soon as the
request is made and only their bytes go on: Discord's CDN URLs are signed and expire, so none is stored or passed
to the engine, and a modal that is submitted later fetches its message again for a fresh URL.

Text out: the client's default `allowed_mentions` is none, so no message on any path (edits, followups, channel
posts, modals' answers) can notify anyone; where the bot mentions the requester itself, that message allows exactly
that user. User text inside the bot's texts (prompts in captions, /job and /queue, values echoed by error messages)
goes through `user_text`, so its markdown and mentions show as typed characters.

This module does not use `from __future__ import annotations`: discord.py reads the slash commands' options from
the callbacks' annotations, and the steps bound comes from the configured models, a value only known at run time.
"""

import asyncio
import io
import logging
import shlex
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Any, Literal

import discord
from discord import app_commands, ui

from bot import render
from bot.commands import ChartReply, Commands, ImagineArgs, TakeDown, Variation
from bot.delivery import ChannelDelivery, follow, forward_alerts, reviewer, warn_no_review_channel
from bot.discord_admin import admin_group
from bot.discord_views import (
    BUTTONS,
    EditInstructionModal,
    EditPromptModal,
    FluxClient,
    Verdict,
    appeal_decision_view,
    appeal_view,
    result_view,
    review_view,
)
from bot.images import fit_attachment
from engine.config import ASPECT_RATIOS
from engine.errors import EngineError, InvalidRequest, NotAllowed, PolicyBlocked
from engine.models import (
    BFL_STEPS_MIN,
    MAX_SEED,
    Capabilities,
    Job,
    JobDone,
    JobEvent,
    JobHeld,
    JobQueued,
    Platform,
    Posting,
    Requester,
)
from engine.service import Engine

log = logging.getLogger(__name__)

# Discord's own limits: a token lives 15 minutes (we stop trusting it a minute early), 2,000 characters a message,
# and 10 MiB an attachment where the interaction does not say more.
TOKEN_LIFETIME = timedelta(minutes=14)
MAX_CHARS = 2000
DEFAULT_FILESIZE_LIMIT = 10 * 1024 * 1024
DISCORD_ASPECTS = tuple(a for a in ASPECT_RATIOS if a != "9:21")  # the eight; 9:21 stays in config only
# A text input in a modal takes at most 4,000 characters.
MODAL_MAX_CHARS = 4000
EDIT_MENU = "Edit with FLUX"  # the message context menu's name, as Discord shows it
# The commands whose refusals say whether anything was charged (the ones that make images).
IMAGE_COMMANDS = frozenset({"imagine", "edit", EDIT_MENU})
# The bot itself, as the admin that reads a held image for the review channel (and for nothing else).
REVIEWER = reviewer(Platform.DISCORD)
REJECTED_IN_REVIEW = "rejected by an admin in review"


def user_text(text: str) -> str:
    """User text as Discord shows it literally: markdown escaped, and @everyone, @here and id mentions broken up
    (the allowed_mentions settings already stop every ping; this keeps them from even looking like one)."""
    return discord.utils.escape_markdown(discord.utils.escape_mentions(text))


def error_text(exc: EngineError, capabilities: Capabilities | None = None) -> str:
    """An error's one message; it can quote what the user typed, so it is shown literally as a whole."""
    return user_text(render.error_message(exc, capabilities))


def mentioning(user_id: str) -> discord.AllowedMentions:
    """For a message that mentions the requester: that one user may be notified, nobody else."""
    return discord.AllowedMentions(everyone=False, roles=False, users=[discord.Object(int(user_id))])


def requester_of(interaction: discord.Interaction) -> Requester:
    user = interaction.user
    # Role ids straight from the interaction payload: Member.roles needs the guild's role cache, which an
    # interaction can arrive without.
    roles = tuple(str(role_id) for role_id in user._roles) if isinstance(user, discord.Member) else ()
    return Requester(
        Platform.DISCORD,
        str(user.id),
        guild_id=str(interaction.guild_id) if interaction.guild_id else None,
        channel_id=str(interaction.channel_id) if interaction.channel_id else None,
        roles=roles,
        is_admin=interaction.guild_id is not None and interaction.permissions.manage_guild,
        display_name=user.display_name,
        age_restricted=age_restricted(interaction.channel),
    )


def age_restricted(channel: object) -> bool:
    """Discord's age-restricted ("NSFW") flag of the channel (a thread's is its parent's); False where unknown."""
    is_nsfw = getattr(channel, "is_nsfw", None)
    if callable(is_nsfw):
        return bool(is_nsfw())
    return bool(getattr(channel, "nsfw", False))


def clip(text: str) -> str:
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 1] + "…"


class DiscordFrontEnd:
    def __init__(
        self,
        engine: Engine,
        *,
        edit_interval_s: float = 1.5,
        take_down: TakeDown | None = None,
    ) -> None:
        self.engine = engine
        self.commands = Commands(engine, user_text, take_down=take_down)
        self.edit_interval_s = edit_interval_s
        # Interactions arrive whatever the intents; `guilds` (not privileged) keeps guild and channel caches warm.
        self.client = FluxClient(
            self, intents=discord.Intents(guilds=True), allowed_mentions=discord.AllowedMentions.none()
        )
        self.client.setup_hook = self._setup  # type: ignore[method-assign]
        self.tree = app_commands.CommandTree(self.client)
        self.tree.on_error = self._command_error  # type: ignore[method-assign]
        self._tasks: set[asyncio.Task[None]] = set()
        # Jobs an interaction follows are delivered there; the rest (a restart's) go to their channel.
        self._orphans = ChannelDelivery(engine, Platform.DISCORD, lambda job, event: self._deliver(event, None))
        self._add_commands()
        self.tree.add_command(
            admin_group(self._admin, lambda interaction: self._reply(interaction, self.commands.report))
        )

    # ---- life cycle ----

    async def start(self, token: str, sync_guild: int | None = None) -> None:
        """Log in, sync the commands (to one guild in development, else globally) and serve until closed."""
        await self.client.login(token)
        await self.sync_commands(sync_guild)
        await self.client.connect()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()

    async def sync_commands(self, guild_id: int | None) -> list[app_commands.AppCommand]:
        """Guild-scoped sync shows changes at once (development); a global one can take up to an hour to appear."""
        if guild_id is None:
            return await self.tree.sync()
        guild = discord.Object(guild_id)
        self.tree.copy_global_to(guild=guild)
        return await self.tree.sync(guild=guild)

    async def _setup(self) -> None:
        """Called by discord.py once logged in: listen to buttons, then deliver what ended while we were away."""
        self.client.add_dynamic_items(*BUTTONS)
        # Tasks take their first step in creation order: the event subscription exists before the backlog is
        # read, so a job ending in between is seen by one of them (ChannelDelivery stops a second post).
        self._spawn(self._orphans.run(), "discord: results for the channel")
        self._spawn(self._orphans.backlog(), "discord: results after a restart")
        self._spawn(self._orphans.sweep(), "discord: results decided by another process")
        alert_channel = self.engine.settings.ops.alert_discord_channel_id
        if alert_channel:
            self._spawn(self._forward_alerts(alert_channel), "discord: alerts")

    async def _forward_alerts(self, channel_id: str) -> None:
        try:
            channel = self.client.get_partial_messageable(int(channel_id))
        except ValueError:
            log.error("[ops] alert_discord_channel_id %r is not a Discord channel id: no alerts on Discord", channel_id)
            return

        async def post(text: str) -> None:
            await channel.send(clip(text), allowed_mentions=discord.AllowedMentions.none())

        await forward_alerts(self.engine, post, f"Discord channel {channel_id}")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- slash commands ----

    def _add_commands(self) -> None:
        models = self.engine.settings.models
        # The ranges Discord enforces are the widest any configured model accepts; validation then applies the
        # chosen model's own limits (whose defaults are BFL's, in engine.models).
        max_steps = max(model.max_steps for model in models.values())
        min_guidance = min(model.min_guidance for model in models.values())
        max_guidance = max(model.max_guidance for model in models.values())
        model_choices = [app_commands.Choice(name=m.display_name[:100], value=k) for k, m in models.items()][:25]
        aspect_choices = [app_commands.Choice(name=a, value=a) for a in DISCORD_ASPECTS]

        @self.tree.command(name="imagine", description="Make an image with FLUX.1")
        @app_commands.describe(
            prompt="What to draw",
            model="Which FLUX model (default: your /settings, else the server's)",
            aspect="Aspect ratio of the image",
            steps=f"Denoising steps ({BFL_STEPS_MIN}-{max_steps}; each model has its own maximum)",
            guidance=f"How closely to follow the prompt ({min_guidance:g}-{max_guidance:g})",
            seed="Seed, to repeat an image (random if left out)",
            mode="auto: the bot decides; fast: the API first (costs money); relax: the free local GPU only",
            image="An image to start from (PNG, JPEG or WebP)",
            style="A style this server's admins set up (see /styles); none for no style",
        )
        @app_commands.choices(model=model_choices, aspect=aspect_choices)
        async def imagine(
            interaction: discord.Interaction,
            prompt: str,
            model: str | None = None,
            aspect: str | None = None,
            steps: app_commands.Range[int, BFL_STEPS_MIN, max_steps] | None = None,
            guidance: app_commands.Range[float, min_guidance, max_guidance] | None = None,
            seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
            mode: Literal["auto", "fast", "relax"] | None = None,
            image: discord.Attachment | None = None,
            style: str | None = None,
        ) -> None:
            # Acknowledge first: Discord drops an interaction not answered within 3 seconds.
            await interaction.response.defer(thinking=True)
            chosen = {"model": model, "aspect": aspect, "steps": steps, "guidance": guidance, "seed": seed}
            chosen["style"] = style
            options = {k: str(v) for k, v in (chosen | {"mode": mode}).items() if v is not None}

            async def submit(requester: Requester) -> JobQueued:
                data = None if image is None else await self._download(image)
                return await self.commands.imagine(requester, prompt, options, image=data)

            await self._submit(interaction, submit)

        @imagine.autocomplete("style")
        async def style_choices(interaction: discord.Interaction, typed: str) -> list[app_commands.Choice[str]]:
            return self._style_choices(typed)

        @self.tree.command(name="styles", description="The styles this server's admins set up")
        async def styles(interaction: discord.Interaction) -> None:
            await interaction.response.send_message(
                clip(self.commands.styles()), embeds=self._style_samples(), ephemeral=True
            )

        @self.tree.command(name="edit", description="Edit an image with FLUX.1 Kontext, as you describe")
        @app_commands.describe(
            image="The image to edit (PNG, JPEG or WebP)", instruction="What to change, e.g. 'make it night time'"
        )
        async def edit(
            interaction: discord.Interaction,
            image: discord.Attachment,
            instruction: str,
        ) -> None:
            await interaction.response.defer(thinking=True)

            async def submit(requester: Requester) -> JobQueued:
                return await self.commands.edit(requester, await self._download(image), instruction)

            await self._submit(interaction, submit)

        @self.tree.context_menu(name=EDIT_MENU)
        async def edit_message_image(interaction: discord.Interaction, message: discord.Message) -> None:
            await self._edit_message_image(interaction, message)

        @self.tree.command(name="quota", description="Your usage, limits and when they reset")
        async def quota(interaction: discord.Interaction) -> None:
            await self._reply(interaction, self.commands.quota)

        @self.tree.command(name="queue", description="Your jobs and the length of the queue")
        async def queue(interaction: discord.Interaction) -> None:
            await self._reply(interaction, self.commands.queue)

        @self.tree.command(name="cancel", description="Cancel a queued or running job of yours")
        @app_commands.describe(job="The job id (see /queue)")
        async def cancel(interaction: discord.Interaction, job: str) -> None:
            async def run(r: Requester) -> str:
                return render.cancelled_text(await self.commands.cancel(r, job))

            await self._reply(interaction, run)

        @self.tree.command(name="job", description="A job's parameters, route and reason")
        @app_commands.describe(id="The job id (see /queue)")
        async def job(interaction: discord.Interaction, id: str) -> None:
            await self._reply(interaction, lambda r: self.commands.job(r, id))

        @self.tree.command(name="settings", description="Show or set your defaults: model, aspect, mode, style")
        @app_commands.describe(name="model, aspect, mode or style (leave out to show)", value="The new default")
        async def settings(
            interaction: discord.Interaction,
            name: Literal["model", "aspect", "mode", "style"] | None = None,
            value: str | None = None,
        ) -> None:
            await self._reply(interaction, lambda r: self.commands.settings(r, name, value))

    def _style_choices(self, typed: str) -> list[app_commands.Choice[str]]:
        """The configured styles whose name or display name contains what was typed (Discord shows at most 25)."""
        wanted = typed.strip().casefold()
        choices = [
            app_commands.Choice(name=f"{style.display_name} ({name})"[:100], value=name)
            for name, style in self.engine.settings.styles.items()
            if wanted in name or wanted in style.display_name.casefold()
        ]
        return [*choices, app_commands.Choice(name="No style", value="none")][:25]

    def _style_samples(self) -> list[discord.Embed]:
        """An embed with each style's sample image (Discord allows ten a message)."""
        return [
            discord.Embed(title=style.display_name, description=name).set_image(url=style.sample_image)
            for name, style in self.engine.settings.styles.items()
            if style.sample_image
        ][:10]

    async def _send_report(self, interaction: discord.Interaction) -> None:
        await self._reply(interaction, self.commands.report)

    async def _admin(self, interaction: discord.Interaction, *words: str) -> None:
        text = shlex.join(words)
        await self._reply(interaction, lambda r: self.commands.admin(r, text))

    async def _reply(
        self, interaction: discord.Interaction, handler: Callable[[Requester], Awaitable[str | ChartReply]]
    ) -> None:
        """An ephemeral answer from a Commands handler, with its chart if it has one.

        An EngineError becomes its one friendly message.
        """
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            answer = await handler(requester_of(interaction))
        except EngineError as exc:
            answer = error_text(exc, self.engine.capabilities())
        except Exception:
            log.exception("discord /%s failed", interaction.command.qualified_name if interaction.command else "?")
            answer = render.INTERNAL_ERROR
        if isinstance(answer, str):
            await interaction.followup.send(clip(answer), ephemeral=True)
        else:
            chart = discord.File(io.BytesIO(answer.png), answer.filename)
            await interaction.followup.send(clip(answer.text), file=chart, ephemeral=True)

    async def _command_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        """What slipped past the handlers (an option that failed to convert, a bug): logged, one line to the user."""
        log.error("discord command failed", exc_info=error)
        text = render.INTERNAL_ERROR
        if isinstance(error, app_commands.TransformerError):
            # Only a refused image command could have cost anything: elsewhere a word about charges would be noise.
            makes_images = interaction.command is not None and interaction.command.name in IMAGE_COMMANDS
            charge = f" {render.NOT_CHARGED}" if makes_images else ""
            text = f"That option can't be used: {user_text(repr(error.value))}.{charge}"
        await self._refuse(interaction, text)

    async def _refuse(self, interaction: discord.Interaction, text: str, view: ui.View | None = None) -> None:
        """An ephemeral message, removing the public 'thinking…' placeholder if there is one."""
        extra: dict[str, Any] = {"view": view} if view is not None else {}
        if not interaction.response.is_done():
            await interaction.response.send_message(clip(text), ephemeral=True, **extra)
            return
        try:
            await interaction.delete_original_response()
        except discord.HTTPException:
            log.debug("no original response to remove for interaction %s", interaction.id)
        await interaction.followup.send(clip(text), ephemeral=True, **extra)

    # ---- making an image: submit, follow, deliver ----

    async def _imagine(self, interaction: discord.Interaction, prompt: str, options: dict[str, str]) -> None:
        await self._submit(interaction, lambda requester: self.commands.imagine(requester, prompt, options))

    async def _submit(
        self, interaction: discord.Interaction, submission: Callable[[Requester], Awaitable[JobQueued]]
    ) -> None:
        """Submit for an interaction that is already deferred (publicly), then follow the job to its end."""
        try:
            queued = await submission(requester_of(interaction))
        except PolicyBlocked as exc:
            if exc.appeal_id is None:
                await self._refuse(interaction, error_text(exc))
            else:
                text = f"{error_text(exc)} {render.APPEAL_OFFER}"
                await self._refuse(interaction, text, appeal_view(exc.appeal_id))
            return
        except EngineError as exc:
            await self._refuse(interaction, error_text(exc, self.engine.capabilities()))
            return
        except Exception:
            log.exception("discord: a job could not be submitted for %s", interaction.user.id)
            await self._refuse(interaction, render.INTERNAL_ERROR)
            return
        self._orphans.follow(queued.job_id)
        self._spawn(self._follow(interaction, queued), f"discord: follow {queued.job_id}")

    # ---- images to work from ----

    async def _download(self, attachment: discord.Attachment) -> bytes:
        """The attachment's bytes, fetched now (its URL expires); InvalidRequest when it can't be had.

        An attachment past the engine's size limit is refused from the size Discord reports, before anything is
        downloaded; everything else about the bytes (their kind, pixels, damage) is the engine's to judge.
        """
        self._ensure_small_enough(attachment)
        try:
            return await attachment.read()
        except discord.HTTPException as exc:
            log.info("attachment %s could not be downloaded (%s %s)", attachment.id, exc.status, exc.code)
            raise _refused_image("the image could not be downloaded from Discord: attach it again") from exc

    def _ensure_small_enough(self, attachment: discord.Attachment) -> None:
        limit_mb = self.engine.settings.images.max_input_mb
        if attachment.size > limit_mb * 1_000_000:
            # Worded as the engine words its own size refusal (engine/inputs.py), which the bytes would meet.
            raise _refused_image(
                f"the image is {attachment.size / 1_000_000:.1f} MB; at most {limit_mb:g} MB are accepted"
            )

    async def _edit_message_image(self, interaction: discord.Interaction, message: discord.Message) -> None:
        """The "Edit with FLUX" message menu: ask for the instruction about the message's first image."""
        image = first_image(message)
        try:
            if image is None:
                raise InvalidRequest(
                    "that message has no image attached (Edit with FLUX works on a message with a PNG, JPEG or WebP"
                    " image)",
                    field="image",
                )
            self._ensure_small_enough(image)  # refused now, rather than after the user has typed an instruction
        except EngineError as exc:
            await self._refuse(interaction, error_text(exc))
            return
        modal = EditInstructionModal.for_message(message.channel.id, message.id, image.id, self._modal_chars())
        await interaction.response.send_modal(modal)

    async def edited_message_image(
        self, interaction: discord.Interaction, channel_id: int, message_id: int, attachment_id: int, instruction: str
    ) -> None:
        """The submit of the "Edit with FLUX" modal: fetch the message again (the URL Discord gave when the menu was
        opened may have expired since, or belong to a process that has restarted), then edit its image."""
        if channel_id != interaction.channel_id:
            # The menu is used on a message in the channel it is used in, so a genuine submit comes from there; one
            # naming another channel is forged, and would have the bot read a message its sender may not see.
            log.warning("edit-with-flux submit from channel %s names channel %s", interaction.channel_id, channel_id)
            await self._refuse(interaction, error_text(InvalidRequest("that image is not in this channel")))
            return
        await interaction.response.defer(thinking=True)

        async def submit(requester: Requester) -> JobQueued:
            attachment = await self._attachment_of(channel_id, message_id, attachment_id)
            return await self.commands.edit(requester, await self._download(attachment), instruction)

        await self._submit(interaction, submit)

    async def _attachment_of(self, channel_id: int, message_id: int, attachment_id: int) -> discord.Attachment:
        channel = self.client.get_partial_messageable(channel_id)
        try:
            message = await channel.fetch_message(message_id)
        except discord.NotFound as exc:
            raise _refused_image("that message was deleted, so its image can't be edited") from exc
        except discord.Forbidden as exc:
            # Reading a message again needs Read Message History in its channel.
            raise _refused_image(
                "flux-bot may not read that message again (it needs Read Message History in this channel): use /edit"
                " with the image attached"
            ) from exc
        except discord.HTTPException as exc:
            log.info("message %s in %s could not be fetched (%s %s)", message_id, channel_id, exc.status, exc.code)
            raise _refused_image("Discord did not give flux-bot that message just now: try again") from exc
        for attachment in message.attachments:
            if attachment.id == attachment_id:
                return attachment
        raise _refused_image("that message no longer has the image (it was edited away)")

    def _modal_chars(self) -> int:
        """The longest text a modal here asks for: Discord's limit for a text input, or the prompt policy's."""
        return min(MODAL_MAX_CHARS, self.engine.settings.policy.max_prompt_chars)

    async def _follow(self, interaction: discord.Interaction, queued: JobQueued) -> None:
        try:
            job = await self.engine.get_job(queued.job_id)
            await follow(
                self.engine,
                queued,
                self.commands.model_display(job.request.model),
                show=lambda text, preview: self._edit(interaction, text, preview),
                deliver=lambda event: self._deliver(event, interaction),
                interval_s=self.edit_interval_s,
            )
        except Exception:
            log.exception("job %s: following it on Discord failed", queued.job_id)

    async def _edit(self, interaction: discord.Interaction, text: str, preview: bytes | None) -> None:
        """A progress edit; lost ones only cost a stale bar, so failures are logged, not raised."""
        if self._token_too_old(interaction):
            return
        files = [discord.File(io.BytesIO(preview), "preview.png")] if preview else []
        try:
            await interaction.edit_original_response(content=clip(text), attachments=files)
        except discord.HTTPException as exc:
            log.info("interaction %s: progress edit failed (%s %s)", interaction.id, exc.status, exc.code)

    @staticmethod
    def _token_too_old(interaction: discord.Interaction) -> bool:
        return discord.utils.utcnow() - interaction.created_at > TOKEN_LIFETIME

    async def _deliver(self, event: JobEvent, interaction: discord.Interaction | None) -> None:
        """The terminal message: through the interaction while its token lives, else to the channel; then recorded."""
        job = await self.engine.get_job(event.job_id)
        delivered = False
        if interaction is not None and not self._token_too_old(interaction):
            try:
                await self._deliver_to_interaction(job, event, interaction)
                delivered = True
            except discord.HTTPException as exc:
                # 401 / 50027 is the expired token; any other refusal (a deleted original, an outage of the
                # webhook) gets the same answer, since the channel is the last place the user can still be told.
                log.info(
                    "job %s: interaction answered %s (code %s), posting to the channel", job.id, exc.status, exc.code
                )
        if not delivered:
            await self._deliver_to_channel(job, event)
        if isinstance(event, JobHeld):
            await self._post_for_review(job)
        # Shielded: close() cancels this task, and a write cut off mid-transaction would leave the store's
        # connection inside it (the store's transactions are not safe against cancellation).
        await asyncio.shield(self.engine.mark_delivered(job.id))

    async def _deliver_to_interaction(self, job: Job, event: JobEvent, interaction: discord.Interaction) -> None:
        if isinstance(event, JobDone):
            data, filename, caption = await self._result(job, event, interaction.filesize_limit)
            await interaction.edit_original_response(content=clip(render.event_line(event)), attachments=[])
            message = await interaction.followup.send(
                clip(f"<@{job.requester.user_id}> {caption}"),
                file=discord.File(io.BytesIO(data), filename),
                view=result_view(job.id),
                allowed_mentions=mentioning(job.requester.user_id),
                wait=True,
            )
            await self._record_posting(job, message)
        else:
            await interaction.delete_original_response()
            await interaction.followup.send(clip(render.ended_text(event, self.engine.capabilities())), ephemeral=True)

    async def _deliver_to_channel(self, job: Job, event: JobEvent) -> None:
        if job.requester.channel_id is None:
            log.warning("job %s: no channel to deliver to", job.id)
            return
        channel = self.client.get_partial_messageable(int(job.requester.channel_id))
        mention = f"<@{job.requester.user_id}>"
        if isinstance(event, JobDone):
            data, filename, caption = await self._result(job, event, DEFAULT_FILESIZE_LIMIT)
            message = await channel.send(
                clip(f"{mention} {caption}"),
                file=discord.File(io.BytesIO(data), filename),
                view=result_view(job.id),
                allowed_mentions=mentioning(job.requester.user_id),
            )
            await self._record_posting(job, message)
        else:
            text = clip(f"{mention} {render.ended_text(event, self.engine.capabilities())}")
            await channel.send(text, allowed_mentions=mentioning(job.requester.user_id))

    async def _record_posting(self, job: Job, message: discord.Message) -> None:
        """Remember where the result went, for a take-down; a failure here never undoes the delivery."""
        try:
            posting = Posting(job.id, Platform.DISCORD, str(message.channel.id), str(message.id))
            await asyncio.shield(self.engine.record_posting(posting))
        except Exception:
            log.exception("job %s: could not record its Discord posting (message %s)", job.id, message.id)

    async def _post_for_review(self, job: Job) -> None:
        """A held image to the admins' review channel, as a spoiler with the review buttons; never raises."""
        channel_id = self.engine.settings.review.discord_channel_id
        if not channel_id:
            warn_no_review_channel(job.id, "discord_channel_id", "/admin review")
            return
        try:
            channel = self.client.get_partial_messageable(int(channel_id))
            image = await self.engine.held_image(REVIEWER, job.id)
            data, filename = await asyncio.to_thread(fit_attachment, image, DEFAULT_FILESIZE_LIMIT, job.id)
            message = await channel.send(
                clip(review_caption(job)),
                file=discord.File(io.BytesIO(data), filename, spoiler=True),
                view=review_view(job.id),
                allowed_mentions=discord.AllowedMentions.none(),
            )
            # A posting too: an approved image stays under its review message, which a take-down must remove.
            await self._record_posting(job, message)
        except Exception:
            log.exception("job %s: could not post it to the review channel %s", job.id, channel_id)

    async def _result(self, job: Job, event: JobDone, limit: int) -> tuple[bytes, str, str]:
        display = self.commands.model_display(job.request.model)
        png = event.image  # the stored result, which already carries its parameters (engine.results)
        data, filename = await asyncio.to_thread(fit_attachment, png, limit, job.id)
        return data, filename, render.done_caption(job, event, display, user_text, demo=self.engine.demo)

    # ---- result buttons (bot.discord_views routes clicks here) ----

    async def reroll(self, interaction: discord.Interaction, job_id: str) -> None:
        await interaction.response.defer(thinking=True)
        args = await self._remake(interaction, self.commands.reroll(job_id))
        if args is not None:
            await self._imagine(interaction, args.prompt, args.options)

    async def vary(self, interaction: discord.Interaction, job_id: str, variation: Variation) -> None:
        await interaction.response.defer(thinking=True)
        await self._submit(interaction, lambda requester: self.commands.vary(requester, job_id, variation))

    async def edit_result(self, interaction: discord.Interaction, job_id: str) -> None:
        """The Edit button: ask for the instruction, unless the result's image is gone (then say so at once, before
        the user types anything)."""
        try:
            await self.engine.result_image(job_id)
        except EngineError as exc:
            await self._refuse(interaction, error_text(exc))
            return
        await interaction.response.send_modal(EditInstructionModal.for_result(job_id, self._modal_chars()))

    async def edited_result(self, interaction: discord.Interaction, job_id: str, instruction: str) -> None:
        await interaction.response.defer(thinking=True)
        await self._submit(interaction, lambda requester: self.commands.edit_result(requester, job_id, instruction))

    async def edit_prompt(self, interaction: discord.Interaction, job_id: str) -> None:
        try:
            job = await self.engine.get_job(job_id)
        except EngineError as exc:
            await self._refuse(interaction, error_text(exc))
            return
        await interaction.response.send_modal(EditPromptModal(job_id, job.request.prompt, self._modal_chars()))

    async def edited_prompt(self, interaction: discord.Interaction, job_id: str, prompt: str) -> None:
        await interaction.response.defer(thinking=True)
        args = await self._remake(interaction, self.commands.edited_prompt(job_id, prompt))
        if args is not None:
            await self._imagine(interaction, args.prompt, args.options)

    async def delete(self, interaction: discord.Interaction, job_id: str) -> None:
        requester = requester_of(interaction)
        try:
            await self.commands.deletable(requester, job_id)
        except EngineError as exc:
            await self._refuse(interaction, error_text(exc))
            return
        await interaction.response.defer()
        await self.engine.delete_result(requester, job_id)  # the stored image too, not only the message
        if interaction.message is not None:
            await interaction.message.delete()
        log.info("job %s: result deleted on Discord by %s", job_id, requester.user_key)

    async def review(self, interaction: discord.Interaction, job_id: str, verdict: Verdict) -> None:
        """A review button: admins only (checked on every press), then the engine decides and the message says so."""
        actor = requester_of(interaction)
        if not self.engine.is_admin(actor):
            await self._refuse(interaction, error_text(NotAllowed("review", "only admins can review held images")))
            return
        await interaction.response.defer()
        try:
            if verdict is Verdict.APPROVE:
                job = await self.engine.approve(actor, job_id)
            else:
                job = await self.engine.reject(actor, job_id, REJECTED_IN_REVIEW, ban=verdict is Verdict.BAN)
        except EngineError as exc:
            await interaction.followup.send(clip(error_text(exc)), ephemeral=True)
            return
        who = user_text(actor.display_name or actor.user_id)
        asked = f"{user_text(job.requester.display_name or job.requester.user_id)} ({job.requester.user_key})"
        if verdict is Verdict.APPROVE:
            text = f"Job {job.id}: approved by {who}; the image has gone to {asked} in the channel it was asked in."
            await interaction.edit_original_response(content=clip(text), view=None)
        else:
            banned = f", and {asked} is banned" if verdict is Verdict.BAN else ""
            text = f"Job {job.id}: rejected by {who}; the image is deleted and {asked} was told{banned}."
            await interaction.edit_original_response(content=clip(text), attachments=[], view=None)
        log.info("job %s: %s in review on Discord by %s", job.id, verdict.value, actor.user_key)

    # ---- appeals ----

    async def appeal(self, interaction: discord.Interaction, appeal_id: str) -> None:
        """The Appeal button under a refused prompt: to the admins, and the button goes (one appeal per refusal)."""
        try:
            appeal = await self.engine.appeal(requester_of(interaction), appeal_id)
        except EngineError as exc:
            await self._refuse(interaction, error_text(exc))
            return
        await interaction.response.edit_message(content=clip(render.APPEAL_FILED), view=None)
        log.info("appeal %s filed on Discord by %s", appeal.id, appeal.requester.user_key)
        channel_id = self.engine.settings.review.discord_channel_id
        if not channel_id:
            log.warning(
                "appeal %s waits for an admin and no [review] discord_channel_id is set: /admin review lists it",
                appeal.id,
            )
            return
        try:
            channel = self.client.get_partial_messageable(int(channel_id))
            await channel.send(
                clip(render.appeal_caption(appeal, user_text)),
                view=appeal_decision_view(appeal.id),
                allowed_mentions=discord.AllowedMentions.none(),
            )
        except Exception:
            log.exception("appeal %s: could not post it to the review channel %s", appeal.id, channel_id)

    async def decide_appeal(self, interaction: discord.Interaction, appeal_id: str, allow: bool) -> None:
        """Allow and run / Keep refused: admins only (checked on every press); the requester hears where they asked."""
        actor = requester_of(interaction)
        if not self.engine.is_admin(actor):
            await self._refuse(interaction, error_text(NotAllowed("review", "only admins can decide appeals")))
            return
        await interaction.response.defer()
        try:
            appeal = await self.commands.decide_appeal(actor, appeal_id, allow)
        except EngineError as exc:
            await interaction.followup.send(clip(error_text(exc)), ephemeral=True)
            return
        who = user_text(actor.display_name or actor.user_id)
        await interaction.edit_original_response(content=clip(render.appeal_decided_text(appeal, who)), view=None)
        if appeal.requester.channel_id and appeal.requester.platform is Platform.DISCORD:
            try:
                channel = self.client.get_partial_messageable(int(appeal.requester.channel_id))
                await channel.send(
                    clip(render.appeal_outcome_text(appeal, user_text)),
                    allowed_mentions=discord.AllowedMentions.none(),
                )
            except Exception:
                log.exception("appeal %s: could not tell its requester in %s", appeal.id, appeal.requester.channel_id)

    async def _remake(self, interaction: discord.Interaction, args: Awaitable[ImagineArgs]) -> ImagineArgs | None:
        """A button's new request, or None once the refusal (the job is gone) is shown."""
        try:
            return await args
        except EngineError as exc:
            await self._refuse(interaction, error_text(exc))
            return None


def review_caption(job: Job) -> str:
    """What the admins read above a held image: the job, who asked (as text, never a mention), the prompt, why."""
    requester = job.requester
    who = f"{user_text(requester.display_name or requester.user_id)} ({requester.user_key})"
    detail = user_text(job.review_detail or job.review_reason or "no detail recorded")
    return f'Held for review: job {job.id}, asked by {who}.\nPrompt: "{user_text(job.request.prompt)}"\nWhy: {detail}'


def first_image(message: discord.Message) -> discord.Attachment | None:
    """The message's first attachment that Discord says is an image (the engine checks what it really is)."""
    return next((a for a in message.attachments if (a.content_type or "").startswith("image/")), None)


def _refused_image(problem: str) -> InvalidRequest:
    """Why an image to work from can't be used, as the engine's own refusals of an image are worded and marked."""
    refusal = InvalidRequest(problem, field="image")
    refusal.charge_possible = True  # a refused image request: the user wants to know that it cost nothing
    return refusal
