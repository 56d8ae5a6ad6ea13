"""Discord's /admin command group: each subcommand's options become the words that Commands.admin reads, so the
group only translates (rights are checked at run time, by the engine, whatever Discord's UI shows)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

import discord
from discord import app_commands

AdminWords = Callable[..., Awaitable[None]]  # (interaction, *words): the front-end runs Commands.admin on them
Report = Callable[[discord.Interaction], Awaitable[None]]


def admin_group(admin_words: AdminWords, send_report: Report) -> app_commands.Group:
    """/admin and its subcommands; each runs as `admin_words(interaction, *words)`, the words Commands.admin reads."""
    # Only a hint to Discord's UI (server admins can change it): Commands.admin checks rights at run time.
    group = app_commands.Group(
        name="admin",
        description="flux-bot administration (admins only)",
        default_permissions=discord.Permissions(manage_guild=True),
        guild_only=True,
    )
    quota = app_commands.Group(name="quota", description="A user's quota", parent=group)

    def command(parent: app_commands.Group, name: str, description: str) -> Callable[[Any], Any]:
        return parent.command(name=name, description=description)

    def key(user: discord.User) -> str:
        return f"discord:{user.id}"

    @command(quota, "show", "Show a user's usage and limits")
    @app_commands.describe(user="Whose quota")
    async def quota_show(interaction: discord.Interaction, user: discord.User) -> None:
        await admin_words(interaction, "quota", "show", key(user))

    @command(quota, "set", "Override one of a user's limits")
    @app_commands.describe(
        user="Whose limit",
        limit="images_per_day, gpu_seconds_per_day, api_usd_per_month or concurrent_jobs",
        value="The new limit ('none' removes it)",
    )
    async def quota_set(interaction: discord.Interaction, user: discord.User, limit: str, value: str) -> None:
        await admin_words(interaction, "quota", "set", key(user), limit, value)

    @command(quota, "grant", "Give a user extra for the current period")
    @app_commands.describe(user="Who gets it", resource="What to grant", amount="How much")
    async def quota_grant(
        interaction: discord.Interaction,
        user: discord.User,
        resource: Literal["images", "gpu-seconds", "usd"],
        amount: str,
    ) -> None:
        await admin_words(interaction, "quota", "grant", key(user), resource, amount)

    @command(quota, "reset", "Start a user's current day and month afresh")
    @app_commands.describe(user="Whose usage")
    async def quota_reset(interaction: discord.Interaction, user: discord.User) -> None:
        await admin_words(interaction, "quota", "reset", key(user))

    @command(group, "spend", "Spend report for a month, per user and backend")
    @app_commands.describe(month="YYYY-MM (default: this month)")
    async def spend(interaction: discord.Interaction, month: str | None = None) -> None:
        await admin_words(interaction, "spend", *([month] if month else []))

    @command(group, "credits", "The BFL API credits balance")
    async def credits(interaction: discord.Interaction) -> None:
        await admin_words(interaction, "credits")

    @command(group, "pause", "Stop routing new jobs to the local GPU or the API")
    @app_commands.describe(backend="local or api")
    async def pause(interaction: discord.Interaction, backend: Literal["local", "api"]) -> None:
        await admin_words(interaction, "pause", backend)

    @command(group, "resume", "Route jobs to the local GPU or the API again")
    @app_commands.describe(backend="local or api")
    async def resume(interaction: discord.Interaction, backend: Literal["local", "api"]) -> None:
        await admin_words(interaction, "resume", backend)

    @command(group, "ban", "Stop a user from generating images")
    @app_commands.describe(user="Who")
    async def ban(interaction: discord.Interaction, user: discord.User) -> None:
        await admin_words(interaction, "ban", key(user))

    @command(group, "unban", "Let a banned user generate images again")
    @app_commands.describe(user="Who")
    async def unban(interaction: discord.Interaction, user: discord.User) -> None:
        await admin_words(interaction, "unban", key(user))

    @command(group, "jobs", "Every job waiting or running")
    async def jobs(interaction: discord.Interaction) -> None:
        await admin_words(interaction, "jobs")

    @command(group, "report", "Spend, images, failures and latency over the last 30 days, as a chart")
    async def report(interaction: discord.Interaction) -> None:
        await send_report(interaction)

    @command(group, "cancel", "Cancel any job")
    @app_commands.describe(job="The job id")
    async def cancel(interaction: discord.Interaction, job: str) -> None:
        await admin_words(interaction, "cancel", job)

    @command(group, "review", "Held images and appeals: list them, or decide one")
    @app_commands.describe(
        decision="What to do (list: what waits)",
        target="The held job's id, or the appeal's (for allow and deny)",
        reason="Why (for a rejection or a denial; the requester reads it)",
    )
    async def review(
        interaction: discord.Interaction,
        decision: Literal["list", "approve", "reject", "reject-and-ban", "allow", "deny"] = "list",
        target: str | None = None,
        reason: str | None = None,
    ) -> None:
        await admin_words(interaction, "review", decision, *([target] if target else []), *([reason] if reason else []))

    @command(group, "styles", "The styles and the GPU slots serving each; reload them, or check their files")
    @app_commands.describe(action="list (default), reload ([styles.*] read again) or check (files and a render)")
    async def styles(interaction: discord.Interaction, action: Literal["list", "reload", "check"] = "list") -> None:
        await admin_words(interaction, "styles", action)

    @command(group, "takedown", "Delete a posted image everywhere it was posted, and from the state folder")
    @app_commands.describe(job="The job id", reason="Why (kept with the job's record)")
    async def takedown(interaction: discord.Interaction, job: str, reason: str) -> None:
        await admin_words(interaction, "takedown", job, reason)

    @command(group, "audit", "Who did what: reviews, take-downs, appeals, bans, limits")
    @app_commands.describe(since="YYYY-MM-DD (UTC)", action="An action or a family of them, e.g. review")
    async def audit(interaction: discord.Interaction, since: str | None = None, action: str | None = None) -> None:
        filters = [*(["--since", since] if since else []), *(["--action", action] if action else [])]
        await admin_words(interaction, "audit", *filters)

    return group
