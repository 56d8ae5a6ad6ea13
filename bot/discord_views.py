"""The buttons under a Discord result and the modals that ask for a new prompt or an edit instruction.

The buttons are DynamicItems whose custom ids carry the job id ("flux:reroll:<job_id>"), so they keep working after a
restart with no view stored anywhere: the id alone says which job a click is about. The modals work the same way:
each one's custom id says what its submit is about, so a modal opened before a restart is still handled after it:

- "flux:editprompt:<job_id>": Edit prompt, a new prompt for that job's settings and seed;
- "flux:editresult:<job_id>": Edit, an instruction to edit that job's image;
- "flux:editmessage:<channel_id>:<message_id>:<attachment_id>": the "Edit with FLUX" message menu, an instruction to
  edit that attachment. Only ids travel, never the attachment's URL: Discord's CDN URLs are signed and expire, so the
  submit fetches the message again for a fresh one.

The review buttons under a held image in the admins' review channel ("flux:review-approve:<job_id>",
"flux:review-reject:<job_id>", "flux:review-ban:<job_id>") are DynamicItems too, so a review survives a restart, and
so are the appeal buttons: "flux:appeal:<appeal_id>" under a refused prompt, "flux:appeal-allow:<appeal_id>" and
"flux:appeal-deny:<appeal_id>" under the appeal in the review channel.

All of them only route to the front-end's `ResultActions`; what they do is decided there (and in the engine).
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Protocol

import discord
from discord import ui

from bot.commands import Variation

JOB_ID = r"(?P<job_id>j[0-9a-z]{1,40})"
APPEAL_ID = r"(?P<appeal_id>a[0-9a-z]{1,40})"
_SNOWFLAKE = r"[0-9]{1,20}"
EDIT_PROMPT = re.compile(r"flux:editprompt:" + JOB_ID)
EDIT_RESULT = re.compile(r"flux:editresult:" + JOB_ID)
EDIT_MESSAGE = re.compile(
    rf"flux:editmessage:(?P<channel_id>{_SNOWFLAKE}):(?P<message_id>{_SNOWFLAKE}):(?P<attachment_id>{_SNOWFLAKE})"
)
PROMPT_INPUT = "prompt"  # the text input's custom id in the edit-prompt modal
INSTRUCTION_INPUT = "instruction"  # the text input's custom id in both edit modals


class Verdict(StrEnum):
    """An admin's decision on a held image, as its review button names it."""

    APPROVE = "approve"
    REJECT = "reject"
    BAN = "ban"  # reject, and ban the requester


class ResultActions(Protocol):
    async def reroll(self, interaction: discord.Interaction, job_id: str) -> None: ...

    async def vary(self, interaction: discord.Interaction, job_id: str, variation: Variation) -> None: ...

    async def edit_prompt(self, interaction: discord.Interaction, job_id: str) -> None: ...

    async def edited_prompt(self, interaction: discord.Interaction, job_id: str, prompt: str) -> None: ...

    async def edit_result(self, interaction: discord.Interaction, job_id: str) -> None: ...

    async def edited_result(self, interaction: discord.Interaction, job_id: str, instruction: str) -> None: ...

    async def edited_message_image(
        self, interaction: discord.Interaction, channel_id: int, message_id: int, attachment_id: int, instruction: str
    ) -> None: ...

    async def delete(self, interaction: discord.Interaction, job_id: str) -> None: ...

    async def review(self, interaction: discord.Interaction, job_id: str, verdict: Verdict) -> None: ...

    async def appeal(self, interaction: discord.Interaction, appeal_id: str) -> None: ...

    async def decide_appeal(self, interaction: discord.Interaction, appeal_id: str, allow: bool) -> None: ...


class FluxClient(discord.Client):
    """A discord.Client that knows who handles result buttons (DynamicItems are built by discord.py, not by us)."""

    def __init__(self, actions: ResultActions, **options: Any) -> None:
        super().__init__(**options)
        self.actions = actions

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """Route modal submits by custom id (discord.py's modal store is in memory and empty after a restart)."""
        if interaction.type is not discord.InteractionType.modal_submit:
            return
        data: dict[str, Any] = dict(interaction.data or {})
        custom_id = str(data.get("custom_id", ""))
        components = data.get("components", [])
        if match := EDIT_PROMPT.fullmatch(custom_id):
            prompt = submitted_value(components, PROMPT_INPUT)
            await self.actions.edited_prompt(interaction, match["job_id"], prompt)
        elif match := EDIT_RESULT.fullmatch(custom_id):
            instruction = submitted_value(components, INSTRUCTION_INPUT)
            await self.actions.edited_result(interaction, match["job_id"], instruction)
        elif match := EDIT_MESSAGE.fullmatch(custom_id):
            instruction = submitted_value(components, INSTRUCTION_INPUT)
            ids = int(match["channel_id"]), int(match["message_id"]), int(match["attachment_id"])
            await self.actions.edited_message_image(interaction, *ids, instruction)


def _actions(interaction: discord.Interaction) -> ResultActions:
    client = interaction.client
    assert isinstance(client, FluxClient), "result buttons are only registered on a FluxClient"
    return client.actions


class _IdButton(ui.DynamicItem[ui.Button[ui.View]], template=r"flux:(?P<action>[\w-]+):(?P<id>[ja][0-9a-z]{1,40})"):
    """Base of every button: its custom id is "flux:<action>:<id>", the id a job's or an appeal's (the last group of
    each subclass's template)."""

    action = ""
    label = ""
    style = discord.ButtonStyle.secondary

    def __init__(self, item_id: str, row: int | None = None) -> None:
        button: ui.Button[ui.View] = ui.Button(
            label=self.label, style=self.style, custom_id=f"flux:{self.action}:{item_id}", row=row
        )
        super().__init__(button)
        self.item_id = item_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: ui.Item[Any], match: re.Match[str], /
    ) -> _IdButton:
        return cls(match[match.re.groups])


class _JobButton(_IdButton, template=r"flux:(?P<action>[\w-]+):" + JOB_ID):
    """Base of the result and review buttons: the action and job id both come from the custom id."""

    @property
    def job_id(self) -> str:
        return self.item_id


class RerollButton(_JobButton, template=r"flux:reroll:" + JOB_ID):
    action, label, style = "reroll", "Reroll", discord.ButtonStyle.primary

    async def callback(self, interaction: discord.Interaction) -> None:
        await _actions(interaction).reroll(interaction, self.job_id)


class _VaryButton(_JobButton, template=r"flux:(?P<action>vary[\w-]*):" + JOB_ID):
    """A variation of the result, as near to it as `variation` says."""

    variation = Variation.SUBTLE

    async def callback(self, interaction: discord.Interaction) -> None:
        await _actions(interaction).vary(interaction, self.job_id, self.variation)


class VarySubtleButton(_VaryButton, template=r"flux:vary-subtle:" + JOB_ID):
    action, label, variation = "vary-subtle", "Vary (subtle)", Variation.SUBTLE


class VaryStrongButton(_VaryButton, template=r"flux:vary-strong:" + JOB_ID):
    action, label, variation = "vary-strong", "Vary (strong)", Variation.STRONG


class LegacyVaryButton(_VaryButton, template=r"flux:vary:" + JOB_ID):
    """The single Vary button of results posted before there were two: still answered, as the subtle variation.

    Never put under new results (result_view leaves it out); registered only so old messages keep working.
    """

    action, label, variation = "vary", "Vary", Variation.SUBTLE


class EditResultButton(_JobButton, template=r"flux:edit-image:" + JOB_ID):
    action, label = "edit-image", "Edit"

    async def callback(self, interaction: discord.Interaction) -> None:
        await _actions(interaction).edit_result(interaction, self.job_id)


class EditPromptButton(_JobButton, template=r"flux:edit:" + JOB_ID):
    action, label = "edit", "Edit prompt"

    async def callback(self, interaction: discord.Interaction) -> None:
        await _actions(interaction).edit_prompt(interaction, self.job_id)


class DeleteButton(_JobButton, template=r"flux:delete:" + JOB_ID):
    action, label, style = "delete", "Delete", discord.ButtonStyle.danger

    async def callback(self, interaction: discord.Interaction) -> None:
        await _actions(interaction).delete(interaction, self.job_id)


class ReviewApproveButton(_JobButton, template=r"flux:review-approve:" + JOB_ID):
    action, label, style = "review-approve", "Approve", discord.ButtonStyle.success

    async def callback(self, interaction: discord.Interaction) -> None:
        await _actions(interaction).review(interaction, self.job_id, Verdict.APPROVE)


class ReviewRejectButton(_JobButton, template=r"flux:review-reject:" + JOB_ID):
    action, label, style = "review-reject", "Reject", discord.ButtonStyle.danger

    async def callback(self, interaction: discord.Interaction) -> None:
        await _actions(interaction).review(interaction, self.job_id, Verdict.REJECT)


class ReviewBanButton(_JobButton, template=r"flux:review-ban:" + JOB_ID):
    action, label, style = "review-ban", "Reject and ban", discord.ButtonStyle.danger

    async def callback(self, interaction: discord.Interaction) -> None:
        await _actions(interaction).review(interaction, self.job_id, Verdict.BAN)


REVIEW_BUTTONS: tuple[type[_JobButton], ...] = (ReviewApproveButton, ReviewRejectButton, ReviewBanButton)


class _AppealButton(_IdButton, template=r"flux:(?P<action>appeal[\w-]*):" + APPEAL_ID):
    """Base of the appeal buttons: a refused prompt's Appeal, and Allow / Keep refused for the admins."""

    @property
    def appeal_id(self) -> str:
        return self.item_id


class AppealButton(_AppealButton, template=r"flux:appeal:" + APPEAL_ID):
    action, label, style = "appeal", "Appeal", discord.ButtonStyle.primary

    async def callback(self, interaction: discord.Interaction) -> None:
        await _actions(interaction).appeal(interaction, self.appeal_id)


class AppealAllowButton(_AppealButton, template=r"flux:appeal-allow:" + APPEAL_ID):
    action, label, style = "appeal-allow", "Allow and run", discord.ButtonStyle.success

    async def callback(self, interaction: discord.Interaction) -> None:
        await _actions(interaction).decide_appeal(interaction, self.appeal_id, True)


class AppealDenyButton(_AppealButton, template=r"flux:appeal-deny:" + APPEAL_ID):
    action, label, style = "appeal-deny", "Keep refused", discord.ButtonStyle.danger

    async def callback(self, interaction: discord.Interaction) -> None:
        await _actions(interaction).decide_appeal(interaction, self.appeal_id, False)


# Under each result, one row per kind of button (Discord allows five a row): new images from this one, then the
# ones that change or remove it.
RESULT_ROWS: tuple[tuple[type[_JobButton], ...], ...] = (
    (RerollButton, VarySubtleButton, VaryStrongButton),
    (EditResultButton, EditPromptButton, DeleteButton),
)
# Every button a click can arrive from, the old messages' too.
BUTTONS: tuple[type[_IdButton], ...] = (
    *(button for row in RESULT_ROWS for button in row),
    LegacyVaryButton,
    *REVIEW_BUTTONS,
    AppealButton,
    AppealAllowButton,
    AppealDenyButton,
)


def result_view(job_id: str) -> ui.View:
    view = ui.View(timeout=None)
    for row, buttons in enumerate(RESULT_ROWS):
        for button in buttons:
            view.add_item(button(job_id, row=row))
    return view


def review_view(job_id: str) -> ui.View:
    """Approve, Reject, Reject and ban: under a held image in the admins' review channel."""
    view = ui.View(timeout=None)
    for button in REVIEW_BUTTONS:
        view.add_item(button(job_id))
    return view


def appeal_view(appeal_id: str) -> ui.View:
    """Under a prompt refused for a blocked word: the requester may ask an admin to allow it."""
    view = ui.View(timeout=None)
    view.add_item(AppealButton(appeal_id))
    return view


def appeal_decision_view(appeal_id: str) -> ui.View:
    """Under an appeal in the admins' review channel."""
    view = ui.View(timeout=None)
    view.add_item(AppealAllowButton(appeal_id))
    view.add_item(AppealDenyButton(appeal_id))
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


class EditInstructionModal(ui.Modal):
    """Asks how to change an image. Sent finished and routed by its custom id, as EditPromptModal; build it with
    `for_result` (the Edit button) or `for_message` (the "Edit with FLUX" message menu)."""

    def __init__(self, title: str, custom_id: str, max_chars: int) -> None:
        super().__init__(title=title, custom_id=custom_id)
        self.add_item(
            ui.TextInput(
                label="What should change?",
                custom_id=INSTRUCTION_INPUT,
                style=discord.TextStyle.paragraph,
                placeholder="e.g. make it night time, add a red scarf",
                max_length=max_chars,
            )
        )
        self.stop()

    @classmethod
    def for_result(cls, job_id: str, max_chars: int) -> EditInstructionModal:
        return cls("Edit this image", f"flux:editresult:{job_id}", max_chars)

    @classmethod
    def for_message(cls, channel_id: int, message_id: int, attachment_id: int, max_chars: int) -> EditInstructionModal:
        return cls("Edit with FLUX", f"flux:editmessage:{channel_id}:{message_id}:{attachment_id}", max_chars)


def submitted_value(components: list[dict[str, Any]], custom_id: str) -> str:
    """A text input's value in a modal submit: inputs sit in action rows ("components") or labels ("component")."""
    for component in components:
        if component.get("custom_id") == custom_id:
            return str(component.get("value") or "")
        inner = component.get("components") or ([component["component"]] if "component" in component else [])
        if value := submitted_value(inner, custom_id):
            return value
    return ""
