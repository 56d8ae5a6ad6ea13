"""A fake Discord HTTP API on loopback, driven by the real discord.py client (no gateway).

It answers the REST calls an interactions-only bot makes (login, interaction callbacks, webhook edits and followups,
channel messages and their deletion (404 / 10008 once deleted), command sync), serves the attachments a test
registers from a CDN route with signed, expiring URLs (as cdn.discordapp.com does), records every request in order,
and injects the faults a long-running bot meets: an expired interaction token (401, code 50027) and a rate limit
(429 with `Via` and a JSON retry_after).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import discord
from aiohttp import BodyPartReader, web

APP_ID = "1000"
BOT_ID = "1001"
GUILD_ID = "2000"
CHANNEL_ID = "3000"
MANAGE_GUILD = 1 << 5


@dataclass(frozen=True)
class Part:
    """One part of a multipart request: `payload_json` or a file."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class Recorded:
    method: str
    path: str
    status: int
    json: Any = None
    parts: list[Part] = field(default_factory=list)

    @property
    def payload(self) -> Any:
        """The JSON body, whether sent plain or as the multipart `payload_json` part."""
        if self.json is not None:
            return self.json
        for part in self.parts:
            if part.name == "payload_json":
                return json.loads(part.data)
        return None

    @property
    def files(self) -> list[Part]:
        return [part for part in self.parts if part.filename is not None]


def _user(user_id: str, name: str, *, bot: bool = False) -> dict[str, Any]:
    return {"id": user_id, "username": name, "discriminator": "0", "global_name": name, "avatar": None, "bot": bot}


def bot_message(
    message_id: str, channel_id: str, *, content: str = "", components: list[Any] | None = None, flags: int = 0
) -> dict[str, Any]:
    """A message the bot posted, as Discord's API shows it (in answers, and inside a button press's interaction)."""
    return _message_payload(message_id, channel_id, _user(BOT_ID, "flux-bot", bot=True), content, components, flags)


def user_message(
    message_id: str, channel_id: str, user_id: str, *, content: str = "", attachments: list[Any] | None = None
) -> dict[str, Any]:
    """A message a user posted, with its attachments (Discord's attachment objects, see FakeDiscord.attachment)."""
    payload = _message_payload(message_id, channel_id, _user(user_id, f"user{user_id}"), content, None, 0)
    payload["attachments"] = attachments or []
    return payload


def _message_payload(
    message_id: str,
    channel_id: str,
    author: dict[str, Any],
    content: str,
    components: list[Any] | None,
    flags: int,
) -> dict[str, Any]:
    return {
        "id": message_id,
        "channel_id": channel_id,
        "author": author,
        "content": content,
        "timestamp": "2026-11-26T12:00:00+00:00",
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": False,
        "mentions": [],
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "components": components or [],
        "pinned": False,
        "type": 0,
        "flags": flags,
    }


_payload_ids = itertools.count(1)


def _snowflake(when: datetime | None = None) -> str:
    return str(discord.utils.time_snowflake(when or discord.utils.utcnow()) + next(_payload_ids))


def _member(user_id: str, roles: tuple[str, ...], permissions: int) -> dict[str, Any]:
    return {
        "user": {
            "id": user_id,
            "username": f"user{user_id}",
            "discriminator": "0",
            "global_name": None,
            "avatar": None,
        },
        "roles": list(roles),
        "permissions": str(permissions),
        "joined_at": "2026-01-01T00:00:00+00:00",
        "deaf": False,
        "mute": False,
        "flags": 0,
    }


def interaction_payload(
    kind: int,
    data: dict[str, Any],
    *,
    user_id: str,
    roles: tuple[str, ...] = (),
    permissions: int = 0,
    size_limit: int = 10 * 1024 * 1024,
    created: datetime | None = None,
    message: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A raw interaction as Discord sends it (kind 2: a slash command or a context menu, 3: a button press, 5: a
    modal submit), for `client._connection.parse_interaction_create`."""
    payload: dict[str, Any] = {
        "id": _snowflake(created),
        "application_id": APP_ID,
        "type": kind,
        "token": f"token-{next(_payload_ids)}",
        "version": 1,
        "attachment_size_limit": size_limit,
        "guild_id": GUILD_ID,
        "channel_id": CHANNEL_ID,
        # discord.py 2.7 takes Interaction.channel_id from this object, as Discord sends it.
        "channel": {"id": CHANNEL_ID, "type": 0, "guild_id": GUILD_ID, "name": "art", "position": 0, "nsfw": False},
        "member": _member(user_id, roles, permissions),
        "locale": "en-US",
        "data": data,
    }
    if message is not None:
        payload["message"] = message
    return payload


@dataclass
class FakeAttachment:
    """A file on the fake CDN. `size` is what Discord reports, which a test may set apart from the bytes' length."""

    id: str
    channel_id: str
    filename: str
    content_type: str | None
    data: bytes
    size: int
    width: int | None
    height: int | None


class FakeDiscord:
    """`async with FakeDiscord() as fake:` points discord.py's Route.BASE at it for the duration."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.attachments: dict[str, FakeAttachment] = {}
        # Messages GET /channels/{channel}/messages/{id} answers: (channel id, message id) -> (author id, content,
        # attachment ids). Their attachments' URLs are signed when the message is fetched, as Discord does.
        self.messages: dict[tuple[str, str], tuple[str, str, list[str]]] = {}
        # Messages the fake posted (channel id, message id), and those deleted since: DELETE of a deleted one answers
        # 404 / 10008, as Discord does. Ids the fake never handed out (tests name results e.g. "4242") delete fine.
        self.sent: list[tuple[str, str]] = []
        self.deleted: set[tuple[str, str]] = set()
        self._url_signature = 1  # the `ex` every CDN URL carries; expire_attachment_urls() moves it on
        self.expired_tokens: set[str] = set()  # webhook calls with these tokens get 401 / 50027
        self.rate_limit_next: set[str] = set()  # methods ("PATCH", "POST") whose next webhook call gets one 429
        self.refused_bot_tokens: set[str] = set()  # GET /users/@me with these answers 401 (a reset token)
        self._ids = itertools.count(5000)
        self._runner: web.AppRunner | None = None
        self._old_base = ""
        self.port = 0

    async def __aenter__(self) -> FakeDiscord:
        # Discord takes attachments up to the guild's limit (10 MiB and more); aiohttp would stop at 1 MiB.
        app = web.Application(middlewares=[self._record], client_max_size=32 << 20)
        app.add_routes(
            [
                web.get("/api/v10/users/@me", self._me),
                web.get("/api/v10/oauth2/applications/@me", self._application),
                web.post("/api/v10/interactions/{id}/{token}/callback", self._callback),
                web.patch("/api/v10/webhooks/{app}/{token}/messages/{message}", self._webhook_message),
                web.delete("/api/v10/webhooks/{app}/{token}/messages/{message}", self._webhook_delete),
                web.post("/api/v10/webhooks/{app}/{token}", self._webhook_message),
                web.post("/api/v10/channels/{channel}/messages", self._channel_message),
                web.get("/api/v10/channels/{channel}/messages/{message}", self._get_message),
                web.delete("/api/v10/channels/{channel}/messages/{message}", self._delete_message),
                web.put("/api/v10/applications/{app}/commands", self._sync),
                web.put("/api/v10/applications/{app}/guilds/{guild}/commands", self._sync),
                web.get("/attachments/{channel}/{attachment}/{filename}", self._cdn),
            ]
        )
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._old_base = discord.http.Route.BASE
        discord.http.Route.BASE = f"http://127.0.0.1:{self.port}/api/v10"
        return self

    async def __aexit__(self, *exc: object) -> None:
        discord.http.Route.BASE = self._old_base
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- what tests read ----

    def matching(self, method: str, path_part: str, status: int | None = 200) -> list[Recorded]:
        return [
            r
            for r in self.requests
            if r.method == method and path_part in r.path and (status is None or r.status == status)
        ]

    async def wait_for(
        self, predicate: Callable[[list[Recorded]], bool], what: str, limit_s: float = 10.0
    ) -> list[Recorded]:
        """Bounded polling: the limit only guards against a hung test, it is never the expected path."""
        for _ in range(int(limit_s / 0.01)):
            if predicate(self.requests):
                return self.requests
            await asyncio.sleep(0.01)
        seen = [(r.method, r.path, r.status) for r in self.requests]
        raise AssertionError(f"timed out waiting for {what}; got {seen}")

    # ---- attachments and the messages that carry them ----

    def add_attachment(
        self,
        data: bytes,
        filename: str = "image.png",
        content_type: str | None = "image/png",
        *,
        channel_id: str = CHANNEL_ID,
        size: int | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> dict[str, Any]:
        """Put `data` on the CDN; returns Discord's attachment object for it (for `data.resolved.attachments`, or a
        message's `attachments`). `size` defaults to the bytes' length."""
        attachment_id = str(next(self._ids))
        self.attachments[attachment_id] = FakeAttachment(
            attachment_id, channel_id, filename, content_type, data, len(data) if size is None else size, width, height
        )
        return self.attachment(attachment_id)

    def attachment(self, attachment_id: str) -> dict[str, Any]:
        """The attachment object with a URL signed now: valid until the next expire_attachment_urls()."""
        a = self.attachments[attachment_id]
        url = f"http://127.0.0.1:{self.port}/attachments/{a.channel_id}/{a.id}/{a.filename}?ex={self._url_signature}"
        payload: dict[str, Any] = {"id": a.id, "filename": a.filename, "size": a.size, "url": url, "proxy_url": url}
        if a.content_type is not None:
            payload["content_type"] = a.content_type
        if a.width is not None and a.height is not None:
            payload |= {"width": a.width, "height": a.height}
        return payload

    def expire_attachment_urls(self) -> None:
        """Every CDN URL handed out so far now answers 404, as Discord's signed URLs do once they expire; a message
        fetched again carries fresh ones."""
        self._url_signature += 1

    def add_message(
        self, user_id: str, attachments: list[dict[str, Any]], *, content: str = "", channel_id: str = CHANNEL_ID
    ) -> dict[str, Any]:
        """A user's message with these attachments (from add_attachment); returns its payload as Discord sends it
        (e.g. in a message context menu's `data.resolved.messages`). GET on it answers it with fresh URLs."""
        message_id = str(next(self._ids))
        self.messages[(channel_id, message_id)] = (user_id, content, [a["id"] for a in attachments])
        return self._stored_message(channel_id, message_id)

    def delete_by_hand(self, channel_id: str, message_id: str) -> None:
        """A person deleted this message in Discord: DELETE of it now answers 404 Unknown Message."""
        self.deleted.add((channel_id, message_id))
        self.messages.pop((channel_id, message_id), None)

    def cdn_downloads(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "GET" and r.path.startswith("/attachments/")]

    def _stored_message(self, channel_id: str, message_id: str) -> dict[str, Any]:
        user_id, content, attachment_ids = self.messages[(channel_id, message_id)]
        attachments = [self.attachment(attachment_id) for attachment_id in attachment_ids]
        return user_message(message_id, channel_id, user_id, content=content, attachments=attachments)

    # ---- handlers ----

    @web.middleware
    async def _record(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        body: Any = None
        parts: list[Part] = []
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            async for part in reader:
                assert isinstance(part, BodyPartReader)
                parts.append(Part(part.name or "", part.filename, part.headers.get("Content-Type"), await part.read()))
        elif request.can_read_body:
            body = await request.json()
        response = self._fault(request)
        if response is None:
            response = await handler(request)
        self.requests.append(Recorded(request.method, request.path, response.status, body, parts))
        return response

    def _fault(self, request: web.Request) -> web.Response | None:
        if "/webhooks/" not in request.path:
            return None
        if request.match_info.get("token") in self.expired_tokens:
            return _json({"message": "Invalid Webhook Token", "code": 50027}, status=401)
        if request.method in self.rate_limit_next:
            self.rate_limit_next.discard(request.method)
            return _json(
                {"message": "You are being rate limited.", "retry_after": 0.05, "global": False},
                status=429,
                headers={"Via": "1.1 google"},
            )
        return None

    async def _me(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization", "").removeprefix("Bot ") in self.refused_bot_tokens:
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        return _json(_user(BOT_ID, "flux-bot", bot=True))

    async def _application(self, request: web.Request) -> web.Response:
        return _json(
            {
                "id": APP_ID,
                "name": "flux-bot",
                "icon": None,
                "description": "",
                "bot_public": True,
                "bot_require_code_grant": False,
                "verify_key": "0" * 64,
                "flags": 0,
                "owner": _user("9", "owner"),
                "interactions_endpoint_url": None,
            }
        )

    async def _callback(self, request: web.Request) -> web.Response:
        return _json({"interaction": {"id": request.match_info["id"], "type": 2}})

    def _message(self, channel_id: str, payload: Any, files: int = 0) -> dict[str, Any]:
        payload = payload if isinstance(payload, dict) else {}
        message_id = str(next(self._ids))
        self.sent.append((channel_id, message_id))
        return bot_message(
            message_id,
            channel_id,
            content=payload.get("content") or "",
            components=payload.get("components") or [],
            flags=payload.get("flags") or 0,
        )

    async def _webhook_message(self, request: web.Request) -> web.Response:
        # The body was consumed by the recorder; the reply only needs a plausible message.
        return _json(self._message(CHANNEL_ID, None))

    async def _webhook_delete(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _channel_message(self, request: web.Request) -> web.Response:
        return _json(self._message(request.match_info["channel"], None))

    async def _get_message(self, request: web.Request) -> web.Response:
        key = (request.match_info["channel"], request.match_info["message"])
        if key not in self.messages:
            return _json({"message": "Unknown Message", "code": 10008}, status=404)
        return _json(self._stored_message(*key))

    async def _cdn(self, request: web.Request) -> web.Response:
        found = self.attachments.get(request.match_info["attachment"])
        if (
            found is None
            or found.channel_id != request.match_info["channel"]
            or found.filename != request.match_info["filename"]
            or request.query.get("ex") != str(self._url_signature)
        ):
            # What the CDN answers for an unknown file and for an expired signature alike.
            return web.Response(status=404, text="This content is no longer available.")
        return web.Response(body=found.data, content_type=found.content_type or "application/octet-stream")

    async def _delete_message(self, request: web.Request) -> web.Response:
        key = (request.match_info["channel"], request.match_info["message"])
        if key in self.deleted:
            return _json({"message": "Unknown Message", "code": 10008}, status=404)
        self.delete_by_hand(*key)
        return web.Response(status=204)

    async def _sync(self, request: web.Request) -> web.Response:
        commands = await request.json()  # cached by aiohttp after the recorder read it
        # Discord answers every command with a description, "" for context menus (which are sent without one).
        answered = [
            {"description": "", **command, "id": str(next(self._ids)), "application_id": APP_ID, "version": "1"}
            for command in commands
        ]
        return _json(answered)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # Exactly application/json with no charset: discord.py reads anything else as text.
    return web.Response(
        body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json", **(headers or {})}
    )
