"""Slack payloads for flux-bot: action ids, the safe text helpers (`plain_text` in, `escape` / `markup` / `clip` out:
see bot/slack_app.py's docstring), and the blocks and modals the front-end sends. Builders only: nothing here calls
Slack."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from bot.commands import ImagineArgs, Variation, parse_imagine_text
from engine.models import Job

MAX_CHARS = 3000  # a section block's text limit; plain message text allows more, one limit keeps it simple


class ResultAction(StrEnum):
    """The action_ids of the result message's buttons. Posted messages keep their buttons, so each id stays answered
    for good: a button is never renamed, only added."""

    REROLL = "flux_reroll"
    VARY_SUBTLE = "flux_vary_subtle"
    VARY_STRONG = "flux_vary_strong"
    EDIT_IMAGE = "flux_edit_image"
    EDIT_PROMPT = "flux_edit"
    DELETE = "flux_delete"
    OLD_VARY = "flux_vary"  # the one Vary button of results posted before there were two: a subtle variation now


RESULT_BUTTONS = (  # in the order shown
    (ResultAction.REROLL, "Reroll"),
    (ResultAction.VARY_SUBTLE, "Vary (subtle)"),
    (ResultAction.VARY_STRONG, "Vary (strong)"),
    (ResultAction.EDIT_IMAGE, "Edit"),
    (ResultAction.EDIT_PROMPT, "Edit prompt"),
    (ResultAction.DELETE, "Delete"),
)
VARIATIONS = {
    ResultAction.VARY_SUBTLE: Variation.SUBTLE,
    ResultAction.VARY_STRONG: Variation.STRONG,
    ResultAction.OLD_VARY: Variation.SUBTLE,
}


class ReviewAction(StrEnum):
    """The action_ids of the review message's buttons in the admins' review channel; each button's value is the
    job id, so any process on the same database can act on it. As with ResultAction, ids are never renamed."""

    APPROVE = "flux_review_approve"
    REJECT = "flux_review_reject"
    BAN = "flux_review_ban"


REVIEW_BUTTONS = (  # in the order shown
    (ReviewAction.APPROVE, "Approve", "primary"),
    (ReviewAction.REJECT, "Reject", "danger"),
    (ReviewAction.BAN, "Reject and ban", "danger"),
)
REJECTED_IN_REVIEW = "rejected by an admin in review"


class AppealAction(StrEnum):
    """The action_ids of the appeal buttons: under a refused prompt, and under the appeal in the review channel.
    Each button's value is the appeal id."""

    FILE = "flux_appeal"
    ALLOW = "flux_appeal_allow"
    DENY = "flux_appeal_deny"


NOT_AN_ADMIN_FOR_REVIEW = "Only admins can decide on a held image; nothing was changed."

EDIT_VIEW = "flux_editprompt"  # the edit-prompt modal's callback_id; its private_metadata says which job and channel
EDIT_BLOCK, EDIT_INPUT = "prompt", "prompt"
MAX_INPUT_CHARS = 3000  # a plain_text_input's max_length limit

# The message shortcut's callback_id, as registered in the Slack app's configuration ("Edit with FLUX"). It is the
# result's Edit button's action_id too: both mean "edit this image", and bolt keeps shortcuts and actions apart.
EDIT_IMAGE_SHORTCUT = ResultAction.EDIT_IMAGE.value
# The edit-image modal's callback_id. Its private_metadata holds the channel and either the shared file's id (and the
# message's ts, for the log) or the result's job id: never a file's address, which only works with the bot token.
EDIT_IMAGE_VIEW = "flux_edit_image_view"
INSTRUCTION_BLOCK, INSTRUCTION_INPUT = "instruction", "instruction"
NO_IMAGE_IN_MESSAGE = (
    "That message has no image to edit. Use Edit with FLUX on a message with an image file (PNG, JPEG or WebP)"
    " attached."
)


def clip(text: str) -> str:
    """At most MAX_CHARS, never ending inside an escape such as `&amp;`."""
    if len(text) <= MAX_CHARS:
        return text
    return re.sub(r"&[a-z]*$", "", text[: MAX_CHARS - 1]) + "…"


# What Slack writes for the three characters it escapes, and its `<...>` markup: mentions of users (`<@U1|name>`),
# channels (`<#C1|name>`), groups (`<!subteam^S1|@team>`), `<!here>`, `<!channel>`, `<!everyone>`, dates and links.
_SLACK_TEXT = re.compile(r"&(amp|lt|gt);|<([^<>]*)>")
_ENTITIES = {"amp": "&", "lt": "<", "gt": ">"}


def plain_text(text: str) -> str:
    """Slack's command text as the words the user saw: escapes undone, markup replaced by what it displays.

    A mention becomes its label when Slack sent one (`<@U1|alice>` -> "@alice", `<#C1|art>` -> "#art"), else its
    id ("@U1", "#C1"); `<!here>`, `<!channel>` and `<!everyone>` become "@here", "@channel" and "@everyone", and
    other `<!...>` forms their label; a link becomes its label or, without one, its address.
    """

    def replace(match: re.Match[str]) -> str:
        if match[1]:
            return _ENTITIES[match[1]]
        target, label = (_SLACK_TEXT.sub(replace, part) for part in match[2].partition("|")[::2])
        if target.startswith("@"):
            return f"@{label}" if label and not label.startswith("@") else label or target
        if target.startswith("#"):
            return f"#{label}" if label else target
        if target.startswith("!"):
            name = target[1:].split("^")[0]
            if name in ("here", "channel", "everyone"):
                return f"@{name}"
            return label or "@" + target[1:].split("^")[-1]
        return label or target

    return _SLACK_TEXT.sub(replace, text)


def parse_imagine(text: str) -> ImagineArgs:
    """/imagine's text as Slack sends it -> the user's prompt and options (see bot.commands.parse_imagine_text)."""
    return parse_imagine_text(plain_text(text))


def escape(text: str) -> str:
    """Plain text for a Slack message: `&`, `<` and `>` escaped, so nothing in it is markup (mentions included)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def markup(text: str, *, mention: str | None = None) -> str:
    """A plain text as a Slack message, clipped, after a live mention of the user id `mention` if one is given."""
    return clip((f"<@{mention}> " if mention else "") + escape(text))


@dataclass(frozen=True, slots=True)
class Markup:
    """A command's answer that is already Slack markup (the bot's own channel link), sent as it is."""

    text: str


def result_blocks(text: str, job_id: str, file_id: str) -> list[dict[str, Any]]:
    """The caption (already markup) with the RESULT_BUTTONS; each button's value is the job id, its action_id the
    action.

    Delete's value also names the uploaded image, which lives in the thread and would outlive its parent message.
    """
    buttons = [
        _button(action_id, label, f"{job_id}:{file_id}", "danger")
        if action_id is ResultAction.DELETE
        else _button(action_id, label, job_id)
        for action_id, label in RESULT_BUTTONS
    ]
    return _with_buttons(text, f"flux_result_{job_id}", buttons)


def review_blocks(text: str, job_id: str) -> list[dict[str, Any]]:
    """The review message (text already markup) with the REVIEW_BUTTONS, each valued with the job id."""
    buttons = [_button(action_id, label, job_id, style) for action_id, label, style in REVIEW_BUTTONS]
    return _with_buttons(text, f"flux_review_{job_id}", buttons)


def appeal_blocks(text: str, appeal_id: str, *, for_admins: bool) -> list[dict[str, Any]]:
    """A message (text already markup) with the requester's Appeal button, or the admins' Allow / Keep refused."""
    choices = (
        [(AppealAction.ALLOW, "Allow and run", "primary"), (AppealAction.DENY, "Keep refused", "danger")]
        if for_admins
        else [(AppealAction.FILE, "Appeal", "primary")]
    )
    buttons = [_button(action_id, label, appeal_id, style) for action_id, label, style in choices]
    return _with_buttons(text, f"flux_appeal_{appeal_id}", buttons)


def _button(action_id: StrEnum, label: str, value: str, style: str | None = None) -> dict[str, Any]:
    button: dict[str, Any] = {
        "type": "button",
        "action_id": action_id.value,
        "text": {"type": "plain_text", "text": label},
        "value": value,
    }
    return button | ({"style": style} if style else {})


def _with_buttons(text: str, block_id: str, buttons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A section with the text, and under it an actions block with the buttons."""
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
        {"type": "actions", "block_id": block_id, "elements": buttons},
    ]


def held_comment(job: Job) -> str:
    """The held image's comment in the review channel (plain text: it is escaped whole when sent). Slack cannot
    blur an image, so it says first that this one is held and shown to the admins only."""
    who = job.requester
    name = f"{who.display_name} ({who.user_id})" if who.display_name else who.user_id
    where = f" in channel {who.channel_id}" if who.channel_id else ""
    return (
        f"HELD FOR REVIEW (shown here only, not to the requester): job {job.id} by {name}{where}\n"
        f"Prompt: {job.request.prompt}\n"
        f"Why: {job.review_detail or job.review_reason or 'not recorded'}"
    )


def text_modal(
    callback_id: str,
    metadata: dict[str, str],
    title: str,
    submit: str,
    field: tuple[str, str],
    label: str,
    hint: str,
    max_chars: int,
    *,
    initial: str | None = None,
    placeholder: str | None = None,
) -> dict[str, Any]:
    """A modal with one multi-line plain-text input (`field` is its block and action id); `metadata`, its
    private_metadata, says what it is about, so whichever process is running when it is submitted can act on it."""
    element: dict[str, Any] = {
        "type": "plain_text_input",
        "action_id": field[1],
        "multiline": True,
        "max_length": max_chars,
    }
    if initial is not None:
        element["initial_value"] = initial[:max_chars]
    if placeholder is not None:
        element["placeholder"] = {"type": "plain_text", "text": placeholder}
    return {
        "type": "modal",
        "callback_id": callback_id,
        "private_metadata": json.dumps(metadata),
        "title": {"type": "plain_text", "text": title},
        "submit": {"type": "plain_text", "text": submit},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            {
                "type": "input",
                "block_id": field[0],
                "label": {"type": "plain_text", "text": label},
                "hint": {"type": "plain_text", "text": hint},
                "element": element,
            }
        ],
    }


def edit_prompt_view(job: Job, channel: str, max_chars: int) -> dict[str, Any]:
    """The edit-prompt modal: the old prompt as plain input text (never rendered as mrkdwn)."""
    return text_modal(
        EDIT_VIEW,
        {"job": job.id, "channel": channel},
        "Edit prompt",
        "Make it",
        (EDIT_BLOCK, EDIT_INPUT),
        "Prompt",
        "Made again with the same seed and settings.",
        max_chars,
        initial=job.request.prompt,
    )


def edit_image_view(source: dict[str, str], max_chars: int) -> dict[str, Any]:
    """The edit-image modal, asking for the instruction. `source` says which image: the channel with a shared
    file's id ("file", "ts") or a result's job id ("job")."""
    return text_modal(
        EDIT_IMAGE_VIEW,
        source,
        "Edit with FLUX",
        "Edit it",
        (INSTRUCTION_BLOCK, INSTRUCTION_INPUT),
        "What should change?",
        "The new image is posted in the channel, as /imagine's are.",
        max_chars,
        placeholder="make the sky stormy, keep everything else",
    )
