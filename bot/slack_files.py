"""Files users share in Slack, fetched for an edit: files.info for the address, a GET with the bot token.

Slack answers a download it will not serve (the app lacks the `files:read` scope, a revoked token) with HTTP 200
and an HTML login page, not an error: a page where an image should be is recognised (by its content type or its
first bytes) and told as the missing scope. The bot token goes only to Slack's own hosts, never to the address of
a file stored elsewhere (a Drive link), and a file past the input limit is refused before it is read into memory.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from engine.errors import InvalidRequest

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 60.0


def first_image_file(message: dict[str, Any]) -> dict[str, Any] | None:
    """The first file shared in a message that Slack calls an image; which kinds of image are accepted is the
    engine's call, on the downloaded bytes."""
    for file in message.get("files") or ():
        if isinstance(file, dict) and str(file.get("mimetype", "")).startswith("image/") and file.get("id"):
            return file
    return None


class SlackFileError(Exception):
    """A shared file that could not be fetched from Slack; `text` says why, for the user (plain text)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


_SCOPE_ADVICE = "ask an admin to add it and reinstall the app"
LOGIN_PAGE_ANSWER = (
    "flux-bot could not download the image: Slack answered with a login page, which means the app lacks the"
    f" files:read scope; {_SCOPE_ADVICE}."
)


def _files_info_problem(error: str, needed: str) -> str:
    if error == "missing_scope":
        return (
            f"flux-bot could not look the image up: the app lacks the {needed or 'files:read'} scope; {_SCOPE_ADVICE}."
        )
    if error in ("file_not_found", "file_deleted"):
        # A bot token sees only the files shared where the bot is a member.
        return (
            "flux-bot could not find the image on Slack: it was deleted, or the bot is not a member of the channel it"
            " was shared in (add the app to that channel and try again)."
        )
    return f"flux-bot could not look the image up on Slack (Slack said {error or 'nothing'}); try again later."


def _looks_like_html(data: bytes) -> bool:
    return data[:512].lstrip().lower().startswith((b"<!doctype html", b"<html"))


class SlackFiles:
    """Downloads of shared files for one Slack client (see the module docstring)."""

    def __init__(self, client: AsyncWebClient, *, max_bytes: int) -> None:
        self._client = client
        self._max_bytes = max_bytes
        # Downloads carry the bot token, so they go only to Slack: the API's own host or one under it (files.slack.com
        # under slack.com), or any *.slack.com host, over the API's scheme.
        api = urlsplit(client.base_url)
        self._api_scheme, self._api_host = api.scheme, (api.hostname or "").lower()

    async def download(self, file_id: str) -> bytes:
        """A shared file's bytes: files.info for its address, then a GET with the bot token; SlackFileError saying
        what Slack answered instead (see the module docstring on the login page)."""
        try:
            info = await self._client.files_info(file=file_id)
        except SlackApiError as exc:
            answer = exc.response.data if isinstance(exc.response.data, dict) else {}
            raise SlackFileError(
                _files_info_problem(str(answer.get("error", "")), str(answer.get("needed", "")))
            ) from exc
        file = info.get("file") or {}
        if file.get("is_external"):
            raise SlackFileError(
                f"flux-bot cannot edit that file: it is stored outside Slack ({file.get('external_type') or 'a link'})."
                " Upload the image itself to Slack and try again."
            )
        if file.get("mode") in ("tombstone", "hidden_by_limit"):
            raise SlackFileError("flux-bot cannot edit that file: Slack no longer shows it (deleted or hidden).")
        url = str(file.get("url_private_download") or file.get("url_private") or "")
        if not url:
            raise SlackFileError("flux-bot could not download the image: Slack gave no address to download it from.")
        if not self._is_slack_address(url):
            log.warning("slack: file %s is at %s, outside Slack: the bot token is not sent there", file_id, url)
            raise SlackFileError(
                "flux-bot could not download the image: Slack gave an address outside Slack for it, and flux-bot"
                " sends its token only to Slack. Upload the image itself to Slack and try again."
            )
        limit = self._max_bytes
        limit_mb = limit / 1_000_000
        too_large = InvalidRequest(
            f"the image is over {limit_mb:g} MB; at most {limit_mb:g} MB are accepted", field="image"
        )
        too_large.charge_possible = True  # a refused edit, told as the engine's own refusals of an image are
        # The engine refuses a file past its limit anyway; these stop one from being read into memory first.
        if int(file.get("size") or 0) > limit:
            raise too_large
        token = self._client.token or ""
        # aiohttp drops the Authorization header on a redirect to another origin, so a redirect cannot leak it.
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DOWNLOAD_TIMEOUT_S)) as session,
                session.get(url, headers={"Authorization": f"Bearer {token}"}) as response,
            ):
                if response.status in (401, 403):
                    raise SlackFileError(
                        f"flux-bot could not download the image: Slack refused the bot (HTTP {response.status}),"
                        f" which means the app lacks the files:read scope or its token is no longer valid;"
                        f" {_SCOPE_ADVICE}."
                    )
                if response.status != 200:
                    raise SlackFileError(
                        f"flux-bot could not download the image: Slack answered HTTP {response.status};"
                        " try again later."
                    )
                if response.content_type == "text/html":
                    raise SlackFileError(LOGIN_PAGE_ANSWER)
                data = bytearray()
                async for chunk in response.content.iter_chunked(1 << 16):
                    data += chunk
                    if len(data) > limit:
                        raise too_large
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("slack: downloading file %s failed: %r", file_id, exc)
            raise SlackFileError(
                "flux-bot could not download the image: the connection to Slack failed or timed out; try again."
            ) from exc
        if _looks_like_html(bytes(data[:512])):  # a login page under another content type
            raise SlackFileError(LOGIN_PAGE_ANSWER)
        return bytes(data)

    def _is_slack_address(self, url: str) -> bool:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme != self._api_scheme or not host:
            return False
        return host == self._api_host or host.endswith((f".{self._api_host}", ".slack.com"))
