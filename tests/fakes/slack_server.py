"""A fake Slack Web API on loopback, driven by the real slack_sdk AsyncWebClient (and so by slack-bolt's AsyncApp).

It answers the methods the Slack front-end calls, including the three steps of files_upload_v2 and views.open (a modal
opened from a button's trigger_id), records every call in
order with its fields (form or JSON, as the client sent them) and the uploaded bytes, and injects one 429 with
Retry-After for a chosen method.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TEAM_ID = "T0001"
BOT_USER_ID = "UBOT"
BOT_TOKEN = "xoxb-test"


@dataclass
class Call:
    method: str  # "chat.postMessage", or "upload" for the bytes POSTed to the upload URL
    fields: dict[str, Any]
    status: int = 200
    data: bytes = b""
    answer: dict[str, Any] = field(default_factory=dict)  # what the fake replied, e.g. the posted message's ts

    @property
    def blocks(self) -> list[dict[str, Any]]:
        raw = self.fields.get("blocks")
        if raw is None:
            return []
        return json.loads(raw) if isinstance(raw, str) else list(raw)


@dataclass
class FakeSlack:
    """`async with FakeSlack() as slack:` then `AsyncWebClient(base_url=slack.base_url)`."""

    calls: list[Call] = field(default_factory=list)
    rate_limit_once: set[str] = field(default_factory=set)  # methods whose next call gets a 429, Retry-After: 1
    admins: set[str] = field(default_factory=set)  # user ids users.info reports as workspace admins
    port: int = 0
    _ts: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    async def __aenter__(self) -> FakeSlack:
        app = web.Application(client_max_size=64 << 20)  # Slack takes files up to 1 GB; aiohttp stops at 1 MiB
        app.add_routes([web.route("*", "/api/{method}", self._api), web.post("/upload/{file_id}", self._upload)])
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def opened_views(self) -> list[dict[str, Any]]:
        """The modals views.open showed, as Slack answered them (with their view id), oldest first."""
        return [call.answer["view"] for call in self.named("views.open")]

    def named(self, method: str) -> list[Call]:
        return [call for call in self.calls if call.method == method and call.status == 200]

    async def _fields(self, request: web.Request) -> dict[str, Any]:
        # The client sends some methods' arguments in the query string (files.completeUploadExternal), most in the body.
        fields: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            return fields | await request.json()
        return fields | dict(await request.post())

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        fields = await self._fields(request)
        if method in self.rate_limit_once:
            self.rate_limit_once.discard(method)
            self.calls.append(Call(method, fields, status=429))
            return web.json_response({"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": "1"})
        if request.headers.get("Authorization") != f"Bearer {BOT_TOKEN}":
            answer: dict[str, Any] = {"ok": False, "error": "invalid_auth"}
        else:
            answer = {"ok": True, **self._answer(method, fields)}
        self.calls.append(Call(method, fields, answer=answer))
        return web.json_response(answer)

    def _answer(self, method: str, fields: dict[str, Any]) -> dict[str, Any]:
        channel = fields.get("channel") or fields.get("channel_id")
        match method:
            case "auth.test":
                return {"team_id": TEAM_ID, "user_id": BOT_USER_ID, "bot_id": "B1", "url": "https://fake.slack.com/"}
            case "chat.postMessage":
                return {"channel": channel, "ts": f"1700000000.{next(self._ts):06d}"}
            case "chat.update" | "chat.delete" | "files.delete":
                return {"channel": channel, "ts": fields.get("ts")}
            case "chat.postEphemeral":
                return {"message_ts": f"1700000000.{next(self._ts):06d}"}
            case "users.info":
                user = str(fields.get("user"))
                return {"user": {"id": user, "is_admin": user in self.admins, "is_owner": False}}
            case "files.getUploadURLExternal":
                file_id = f"F{next(self._ts)}"
                return {"file_id": file_id, "upload_url": f"http://127.0.0.1:{self.port}/upload/{file_id}"}
            case "views.open":
                view = json.loads(fields["view"]) if isinstance(fields["view"], str) else dict(fields["view"])
                return {"view": {"id": f"V{next(self._ts)}", "team_id": TEAM_ID, "state": {"values": {}}, **view}}
            case "files.completeUploadExternal":
                files = json.loads(fields["files"]) if isinstance(fields["files"], str) else fields["files"]
                return {"files": [{"id": f["id"], "title": f.get("title")} for f in files]}
        return {}

    async def _upload(self, request: web.Request) -> web.Response:
        self.calls.append(Call("upload", {"file_id": request.match_info["file_id"]}, data=await request.read()))
        return web.Response(text="OK - 0")
