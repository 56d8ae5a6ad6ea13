"""The buttons under a Discord result and the edit-prompt modal.

The buttons are DynamicItems whose custom ids carry the job id ("flux:reroll:<job_id>"), so they keep working after a
restart with no view stored anywhere: the id alone says which job a click is about. The edit-prompt modal works the
same way: its custom id ("flux:editprompt:<job_id>") routes the submit, so a modal opened before a restart is still
handled after it. Both only route to the front-end's `ResultActions`; what they do is decided there (and in the
engine).
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import discord
from discord import ui

JOB_ID = r"(?P<job_id>j[0-9a-z]{1,40})"
EDIT_PROMPT = re.compile(r"flux:editprompt:" + JOB_ID)
PROMPT_INPUT = "prompt"  # the text input's custom id in the edit-prompt modal


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

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """Route edit-prompt submits by custom id (discord.py's modal store is in memory and empty after a restart)."""
        if interaction.type is not discord.InteractionType.modal_submit:
            return
        data: dict[str, Any] = dict(interaction.data or {})
        match = EDIT_PROMPT.fullmatch(str(data.get("custom_id", "")))
        if match is not None:
            prompt = submitted_value(data.get("components", []), PROMPT_INPUT)
            await self.actions.edited_prompt(interaction, match["job_id"], prompt)


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
    """Asks for a new prompt; the job is made again with the same seed and settings.

    Sent finished, so discord.py keeps no copy of it: the submit is routed by its custom id (FluxClient.on_interaction),
    by whichever process is running when the user submits.
    """

    def __init__(self, job_id: str, prompt: str, max_chars: int) -> None:
        super().__init__(title="Edit prompt", custom_id=f"flux:editprompt:{job_id}")
        self.add_item(
            ui.TextInput(
                label="Prompt",
                custom_id=PROMPT_INPUT,
                style=discord.TextStyle.paragraph,
                default=prompt[:max_chars],
                max_length=max_chars,
            )
        )
        self.stop()


def submitted_value(components: list[dict[str, Any]], custom_id: str) -> str:
    """A text input's value in a modal submit: inputs sit in action rows ("components") or labels ("component")."""
    for component in components:
        if component.get("custom_id") == custom_id:
            return str(component.get("value") or "")
        inner = component.get("components") or ([component["component"]] if "component" in component else [])
        if value := submitted_value(inner, custom_id):
            return value
    return ""
