"""Take-down: remove a result from every place it was posted, and from the state folder, and say what was removed.

The engine keeps each posting (platform, channel, message or file) and, on `Engine.take_down`, deletes the stored
image and records the reason. The deletions on the platforms are REST calls with the bot's own tokens, so the same
code serves `/admin takedown` in chat and `flux-bot admin takedown` at a shell (which runs no chat client): a
Discord message by `DELETE /channels/{channel}/messages/{message}`, a Slack message by `chat.delete` and its file
by `files.delete`. A place already gone (deleted by hand) is reported as such; any other failure is reported too,
and the take-down of the rest goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import discord
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from engine.models import Platform, Posting, Requester
from engine.service import Engine

log = logging.getLogger(__name__)

GONE_ON_SLACK = {"message_not_found", "file_not_found", "file_deleted", "cant_delete_message", "channel_not_found"}


@dataclass(frozen=True, slots=True)
class Outcome:
    place: str
    removed: bool
    why: str = ""  # when not removed: already gone, or what the platform said


def remover(
    engine: Engine, *, discord_token: str | None, slack_token: str | None, slack_api_url: str | None = None
) -> Callable[[Requester, str, str], Awaitable[str]]:
    """`take_down` with this host's tokens, as the chat front-ends' `/admin takedown` runs it."""

    async def remove(actor: Requester, job_id: str, reason: str) -> str:
        return await take_down(
            engine,
            actor,
            job_id,
            reason,
            discord_token=discord_token,
            slack_token=slack_token,
            slack_api_url=slack_api_url,
        )

    return remove


async def take_down(
    engine: Engine,
    actor: Requester,
    job_id: str,
    reason: str,
    *,
    discord_token: str | None,
    slack_token: str | None,
    slack_api_url: str | None = None,
) -> str:
    """Take the job's image down everywhere; the report for the admin (one line per place)."""
    job, postings, stored = await engine.take_down(actor, job_id, reason)
    outcomes = [await _remove(posting, discord_token, slack_token, slack_api_url) for posting in postings]
    lines = [f"Job {job.id} taken down ({reason.strip()}); its record keeps the reason."]
    lines.append("- stored image: " + ("deleted" if stored else "was no longer stored"))
    for outcome in outcomes:
        state = "removed" if outcome.removed else f"not removed: {outcome.why}"
        lines.append(f"- {outcome.place}: {state}")
    if not postings:
        lines.append("- it was not posted anywhere this bot knows of")
    return "\n".join(lines)


async def _remove(
    posting: Posting, discord_token: str | None, slack_token: str | None, slack_api_url: str | None
) -> Outcome:
    if posting.platform is Platform.DISCORD:
        return await _remove_discord(posting, discord_token)
    if posting.platform is Platform.SLACK:
        return await _remove_slack(posting, slack_token, slack_api_url)
    return Outcome(f"{posting.platform.value} {posting.channel_id}", False, "this platform has nothing to delete")


async def _remove_discord(posting: Posting, token: str | None) -> Outcome:
    place = f"Discord message {posting.message_id} in channel {posting.channel_id}"
    if not token:
        return Outcome(place, False, "DISCORD_TOKEN is not set here")
    # REST only, no gateway: `flux-bot admin` runs no chat client.
    http = discord.http.HTTPClient(asyncio.get_running_loop())
    try:
        await http.static_login(token)
        await http.delete_message(int(posting.channel_id), int(posting.message_id or 0), reason="take-down")
    except discord.NotFound:
        return Outcome(place, False, "already gone (deleted by hand?)")
    except discord.HTTPException as exc:
        log.warning("take-down of %s failed: %s %s", place, exc.status, exc.text)
        return Outcome(place, False, f"Discord answered {exc.status} ({exc.text or 'no detail'})")
    finally:
        await http.close()
    return Outcome(place, True)


async def _remove_slack(posting: Posting, token: str | None, api_url: str | None) -> Outcome:
    place = f"Slack message {posting.message_id} and file {posting.file_id} in {posting.channel_id}"
    if not token:
        return Outcome(place, False, "SLACK_BOT_TOKEN is not set here")
    client = AsyncWebClient(token=token, base_url=api_url or AsyncWebClient.BASE_URL)
    problems: list[str] = []
    gone = tried = 0
    for what, deleted in (("file", posting.file_id), ("message", posting.message_id)):
        if not deleted:
            continue
        tried += 1
        try:
            if what == "file":
                await client.files_delete(file=deleted)
            else:
                await client.chat_delete(channel=posting.channel_id, ts=deleted)
        except SlackApiError as exc:
            error = str(exc.response.get("error", "")) if exc.response is not None else ""
            if error in GONE_ON_SLACK:
                gone += 1
            else:
                problems.append(f"the {what}: Slack said {error or exc}")
    if problems:
        return Outcome(place, False, "; ".join(problems))
    if tried and gone == tried:
        return Outcome(place, False, "already gone (deleted by hand?)")
    return Outcome(place, True)
