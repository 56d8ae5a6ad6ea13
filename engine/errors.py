"""The one exception root of flux-bot and its structured subclasses.

Adapters turn each subclass into one friendly message (bot/render.py); the fields carry what that message needs,
so no adapter ever parses an exception's text.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_T = TypeVar("_T")


class EngineError(Exception):
    """Root of every error the engine raises on purpose.

    `charge_possible` is True when the error refused something that could have cost the user (an image): only then
    does their message say whether they were charged. Elsewhere (an admin typo, an unknown job) it would be noise.
    """

    charge_possible: bool = False


def refuses_a_charge(action: Callable[_P, Awaitable[_T]]) -> Callable[_P, Awaitable[_T]]:
    """Marks every EngineError that `action` (a coroutine that can start a paid job) raises as `charge_possible`."""

    @functools.wraps(action)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await action(*args, **kwargs)
        except EngineError as exc:
            exc.charge_possible = True
            raise

    return wrapper


class InvalidRequest(EngineError):
    """The user's input cannot be served as given (bad option, unknown model, malformed command)."""

    def __init__(self, problem: str, *, field: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.field = field


class PolicyBlocked(EngineError):
    """The prompt policy refused the prompt. `appeal_id` is set when the requester may appeal it to an admin."""

    def __init__(self, rule: str, detail: str, *, appeal_id: str | None = None) -> None:
        super().__init__(f"{rule}: {detail}")
        self.rule = rule
        self.detail = detail
        self.appeal_id = appeal_id


class QuotaExceeded(EngineError):
    """A reservation would cross a limit. `remaining` is in the limit's own unit (images, ms, micro-dollars).

    `scope` says whose limit it is: "user" (the requester's own), "guild" (their server's or workspace's, shared by
    its members) or "global" (the whole bot's, shared by everyone).
    """

    def __init__(
        self,
        limit: str,
        *,
        unit: str,
        limit_value: int,
        remaining: int,
        resets_at: datetime | None,
        scope: str = "user",
    ) -> None:
        super().__init__(f"{limit}: {remaining} {unit} left of {limit_value}")
        self.limit = limit
        self.unit = unit
        self.limit_value = limit_value
        self.remaining = remaining
        self.resets_at = resets_at
        self.scope = scope


class BackendUnavailable(EngineError):
    """No backend can take the job now; `reason` says what would help."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JobNotFound(EngineError):
    """No job has that id (or it belongs to someone else and the caller is not an admin)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class NotAllowed(EngineError):
    """The requester lacks the right for this action (admin command, someone else's job, a banned user)."""

    def __init__(self, action: str, reason: str) -> None:
        super().__init__(f"{action}: {reason}")
        self.action = action
        self.reason = reason


class ConfigError(EngineError):
    """The configuration cannot be used; start-up stops with one message naming file, field and problem."""

    def __init__(self, file: str, field: str, problem: str) -> None:
        super().__init__(f"{file}: {field}: {problem}")
        self.file = file
        self.field = field
        self.problem = problem
