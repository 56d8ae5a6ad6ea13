"""A fake Slack Web API on loopback, driven by the real slack_sdk AsyncWebClient (and so by slack-bolt's AsyncApp).

It answers the methods the Slack front-end calls, including the three steps of files_upload_v2, views.open (a modal
opened from a button's trigger_id), files.info with the download of a registered file, and chat.delete and
files.delete of what it posted or stored (message_not_found / file_not_found for anything else, e.g. once deleted);
it records every call in order with its fields (form or JSON, as the client sent them) and the uploaded bytes, and
injects one 429 with Retry-After for a chosen method. Downloads behave as Slack's do: the bytes only for
`Authorization: Bearer` with the bot token of an app that has the files:read scope, otherwise a 200 with an HTML
login page (not an error).
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
LOGIN_PAGE = (
    b'<!DOCTYPE html><html lang="en-US"><head><title>Slack</title></head>'
    b"<body><h1>Sign in to your workspace</h1></body></html>"
)


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
class SharedFile:
    """A file a user shared in a channel, as files.info describes it (the `url_*` addresses are filled in by
    FakeSlack.add_file, on the fake itself)."""

    id: str
    name: str
    mimetype: str
    data: bytes
    extra: dict[str, Any] = field(default_factory=dict)  # more fields for files.info (e.g. is_external, mode)

    def described(self, base: str) -> dict[str, Any]:
        private = f"{base}/files-pri/{TEAM_ID}-{self.id}"
        return {
            "id": self.id,
            "name": self.name,
            "title": self.name,
            "mimetype": self.mimetype,
            "filetype": self.name.rpartition(".")[2],
            "size": len(self.data),
            "url_private": f"{private}/{self.name}",
            "url_private_download": f"{private}/download/{self.name}",
            **self.extra,
        }


@dataclass
class FakeSlack:
    """`async with FakeSlack() as slack:` then `AsyncWebClient(base_url=slack.base_url)`."""

    calls: list[Call] = field(default_factory=list)
    rate_limit_once: set[str] = field(default_factory=set)  # methods whose next call gets a 429, Retry-After: 1
    admins: set[str] = field(default_factory=set)  # user ids users.info reports as workspace admins
    # Files users shared (add_file), by id: files.info describes them, /files-pri/ serves their bytes.
    files: dict[str, SharedFile] = field(default_factory=dict)
    # False: the app was installed without files:read, so files.info answers missing_scope and every download the
    # login page, as Slack does.
    files_read_scope: bool = True
    download_token: str = BOT_TOKEN  # the token downloads accept: set another to see a good token refused
    download_status: int = 200  # another status (401, 403, 404, 503) answers every download with it
    # What chat.delete and files.delete can remove: the ts of every message chat.postMessage posted, the id of every
    # file uploaded (files.getUploadURLExternal) or shared (add_file). A deletion (or delete_by_hand) takes it out,
    # and deleting it again answers message_not_found / file_not_found, as Slack does.
    posted: set[str] = field(default_factory=set)
    stored_files: set[str] = field(default_factory=set)
    port: int = 0
    _ts: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    async def __aenter__(self) -> FakeSlack:
        app = web.Application(client_max_size=64 << 20)  # Slack takes files up to 1 GB; aiohttp stops at 1 MiB
        app.add_routes(
            [
                web.route("*", "/api/{method}", self._api),
                web.post("/upload/{file_id}", self._upload),
                web.get("/files-pri/{owner}/download/{name}", self._download),
                web.get("/files-pri/{owner}/{name}", self._download),
            ]
        )
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def add_file(self, name: str, data: bytes, mimetype: str = "image/png", **extra: Any) -> dict[str, Any]:
        """Share a file: it is what files.info describes and the download serves; returns the file object as it
        appears in the `files` of the message it was shared in (what a message shortcut's payload carries)."""
        shared = SharedFile(f"F{next(self._ts):08d}", name, mimetype, data, extra)
        self.files[shared.id] = shared
        self.stored_files.add(shared.id)
        return shared.described(f"http://127.0.0.1:{self.port}")

    def delete_by_hand(self, *, ts: str | None = None, file_id: str | None = None) -> None:
        """A person deleted this message or file in Slack: chat.delete / files.delete of it now find nothing."""
        self.posted.discard(ts or "")
        self.stored_files.discard(file_id or "")

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
            answer = {"ok": True} | self._answer(method, fields)  # an answer may say "ok": false itself
        self.calls.append(Call(method, fields, answer=answer))
        return web.json_response(answer)

    def _answer(self, method: str, fields: dict[str, Any]) -> dict[str, Any]:
        channel = fields.get("channel") or fields.get("channel_id")
        match method:
            case "auth.test":
                return {"team_id": TEAM_ID, "user_id": BOT_USER_ID, "bot_id": "B1", "url": "https://fake.slack.com/"}
            case "chat.postMessage":
                ts = f"1700000000.{next(self._ts):06d}"
                self.posted.add(ts)
                return {"channel": channel, "ts": ts}
            case "chat.update":
                return {"channel": channel, "ts": fields.get("ts")}
            case "chat.delete":
                if str(fields.get("ts")) not in self.posted:
                    return {"ok": False, "error": "message_not_found"}
                self.posted.discard(str(fields.get("ts")))
                return {"channel": channel, "ts": fields.get("ts")}
            case "files.delete":
                if str(fields.get("file")) not in self.stored_files:
                    return {"ok": False, "error": "file_not_found"}
                self.stored_files.discard(str(fields.get("file")))
                return {}
            case "chat.postEphemeral":
                return {"message_ts": f"1700000000.{next(self._ts):06d}"}
            case "users.info":
                user = str(fields.get("user"))
                return {"user": {"id": user, "is_admin": user in self.admins, "is_owner": False}}
            case "files.getUploadURLExternal":
                file_id = f"F{next(self._ts)}"
                self.stored_files.add(file_id)
                return {"file_id": file_id, "upload_url": f"http://127.0.0.1:{self.port}/upload/{file_id}"}
            case "views.open":
                view = json.loads(fields["view"]) if isinstance(fields["view"], str) else dict(fields["view"])
                return {"view": {"id": f"V{next(self._ts)}", "team_id": TEAM_ID, "state": {"values": {}}, **view}}
            case "files.info":
                shared = self.files.get(str(fields.get("file")))
                if not self.files_read_scope:
                    return {"ok": False, "error": "missing_scope", "needed": "files:read", "provided": "chat:write"}
                if shared is None:
                    return {"ok": False, "error": "file_not_found"}
                return {"file": shared.described(f"http://127.0.0.1:{self.port}")}
            case "files.completeUploadExternal":
                files = json.loads(fields["files"]) if isinstance(fields["files"], str) else fields["files"]
                return {"files": [{"id": f["id"], "title": f.get("title")} for f in files]}
        return {}

    async def _upload(self, request: web.Request) -> web.Response:
        self.calls.append(Call("upload", {"file_id": request.match_info["file_id"]}, data=await request.read()))
        return web.Response(text="OK - 0")

    async def _download(self, request: web.Request) -> web.Response:
        """A file's bytes, only for the bot token of an app with files:read; anything else gets the login page with a
        200, as Slack answers (the token's value is not recorded, only whether it was the one accepted)."""
        file_id = request.match_info["owner"].rpartition("-")[2]
        authorized = request.headers.get("Authorization") == f"Bearer {self.download_token}"
        self.calls.append(Call("download", {"file_id": file_id, "authorized": authorized}, status=self.download_status))
        shared = self.files.get(file_id)
        if self.download_status != 200:
            return web.Response(status=self.download_status, text=f"HTTP {self.download_status}")
        if not (authorized and self.files_read_scope) or shared is None:
            return web.Response(body=LOGIN_PAGE, content_type="text/html", charset="utf-8")
        return web.Response(body=shared.data, content_type=shared.mimetype)
