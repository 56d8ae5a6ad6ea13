"""The buttons under a Discord result and the edit-prompt modal.

The buttons are DynamicItems whose custom ids carry the job id ("flux:reroll:<job_id>"), so they keep working after a
restart with no view stored anywhere: the id alone says which job a click is about. They only route the click to
the front-end's `ResultActions`; what a click does is decided there (and in the engine).
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import discord
from discord import ui

JOB_ID = r"(?P<job_id>j[0-9a-z]{1,40})"


class ResultActions(Protocol):
    async def reroll(self, interaction: discord.Interaction, job_id: str, *, vary: bool) -> None: ...

    async def edit_prompt(self, interaction: discord.Interaction, job_id: str) -> None: ...

    async def edited_prompt(self, interaction: discord.Interaction, job_id: str, prompt: str) -> None: ...

    async def delete(self, interaction: discord.Interaction, job_id: str) -> None: ...


class FluxClient(discord.Client):
    """A discord.Client that knows who handles result buttons (DynamicItems are built by discord.py, not by us)."""

    def __init__(self, actions: ResultActions, **options: Any) -> None:
        super().__init__(**options)
        self.actions = actions


def _actions(interaction: discord.Interaction) -> ResultActions:
    client = interaction.client
    assert isinstance(client, FluxClient), "result buttons are only registered on a FluxClient"
    return client.actions


class _JobButton(ui.DynamicItem[ui.Button[ui.View]], template=r"flux:(?P<action>\w+):" + JOB_ID):
    """Base of the result buttons: the action and job id both come from the custom id."""

    action = ""
    label = ""
    style = discord.ButtonStyle.secondary

    def __init__(self, job_id: str) -> None:
        super().__init__(ui.Button(label=self.label, style=self.style, custom_id=f"flux:{self.action}:{job_id}"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: ui.Item[Any], match: re.Match[str], /
    ) -> _JobButton:
        return cls(match["job_id"])


class RerollButton(_JobButton, template=r"flux:reroll:" + JOB_ID):
    action, label, style = "reroll", "Reroll", discord.ButtonStyle.primary

    async def callback(self, interaction: discord.Interaction) -> None:
        await _actions(interaction).reroll(interaction, self.job_id, vary=False)


class VaryButton(_JobButton, template=r"flux:vary:" + JOB_ID):
    action, label = "vary", "Vary"

    async def callback(self, interaction: discord.Interaction) -> None:
        await _actions(interaction).reroll(interaction, self.job_id, vary=True)


class EditPromptButton(_JobButton, template=r"flux:edit:" + JOB_ID):
    action, label = "edit", "Edit prompt"

    async def callback(self, interaction: discord.Interaction) -> None:
        await _actions(interaction).edit_prompt(interaction, self.job_id)


class DeleteButton(_JobButton, template=r"flux:delete:" + JOB_ID):
    action, label, style = "delete", "Delete", discord.ButtonStyle.danger

    async def callback(self, interaction: discord.Interaction) -> None:
        await _actions(interaction).delete(interaction, self.job_id)


BUTTONS: tuple[type[_JobButton], ...] = (RerollButton, VaryButton, EditPromptButton, DeleteButton)


def result_view(job_id: str) -> ui.View:
    view = ui.View(timeout=None)
    for button in BUTTONS:
        view.add_item(button(job_id))
    return view


class EditPromptModal(ui.Modal):
    """Asks for a new prompt; the job is made again with the same seed and settings."""

    def __init__(self, job_id: str, prompt: str, max_chars: int) -> None:
        super().__init__(title="Edit prompt", custom_id=f"flux:editprompt:{job_id}")
        self.job_id = job_id
        self.prompt: ui.TextInput[EditPromptModal] = ui.TextInput(
            label="Prompt", style=discord.TextStyle.paragraph, default=prompt[:max_chars], max_length=max_chars
        )
        self.add_item(self.prompt)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await _actions(interaction).edited_prompt(interaction, self.job_id, self.prompt.value)
