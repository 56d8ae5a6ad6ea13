"""Appeals: a prompt the policy refused for a blocked word is kept, its requester may appeal it, an admin decides.

Only a blocked word is appealable: it is the operator's judgement, which an admin may overrule for one request
("a water gun" in a game-design brief); a prompt too long, too short or with control characters has nothing to
decide. An allowed appeal is submitted for the requester as if the policy had let it through (their limits apply,
it is charged as any of their images); each step is an audit line. The admin checks are the facade's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import NoReturn

from engine.errors import InvalidRequest, NotAllowed, PolicyBlocked
from engine.inputs import InputImages
from engine.models import Appeal, AppealState, AuditEntry, ImageRequest, JobQueued, Requester, new_appeal_id
from engine.policy import PolicyDecision
from engine.store import Store

# Submits a request for its requester past the policy, as the appeal allows (Engine._submit).
SubmitAllowed = Callable[[Requester, ImageRequest, Appeal], Awaitable[JobQueued]]


class AppealDesk:
    def __init__(
        self, store: Store, inputs: InputImages, clock: Callable[[], float], *, enabled: bool, submit: SubmitAllowed
    ) -> None:
        self._store = store
        self._inputs = inputs
        self._clock = clock
        self._enabled = enabled
        self._submit = submit
        self._deciding = asyncio.Lock()  # one decision at a time: two admins pressing Allow run it once

    async def refuse(
        self, requester: Requester, request: ImageRequest, decision: PolicyDecision, audit: AuditEntry
    ) -> NoReturn:
        """Refuse the prompt (PolicyBlocked, with the policy's audit line); a blocked word is kept for an appeal,
        its input image stored meanwhile, and the refusal names the appeal."""
        if decision.rule != "blocked_word" or not self._enabled:
            await self._store.audit(audit)
            raise PolicyBlocked(decision.rule, decision.detail)
        stored = None
        if request.input_image is not None:
            stored = await asyncio.to_thread(self._inputs.accept, request.input_image)
        appeal = Appeal(
            new_appeal_id(),
            requester,
            replace(request, input_image=None),
            decision.rule,
            decision.matched,
            AppealState.REFUSED,
            self._clock(),
            input_image=stored.sha256 if stored else None,
        )
        await self._store.add_refusal(appeal, audit)
        raise PolicyBlocked(decision.rule, decision.detail, appeal_id=appeal.id)

    async def file(self, requester: Requester, appeal_id: str) -> Appeal:
        """The requester (only they) asks an admin to allow their refused prompt, once."""
        appeal = await self._get(appeal_id)
        if appeal.requester.user_key != requester.user_key:
            raise NotAllowed("appeal", "only the person whose prompt was refused can appeal it")
        audit = AuditEntry(
            requester.user_key, "appeal.file", requester.user_key, detail={"appeal": appeal.id, "rule": appeal.rule}
        )
        if not await self._store.move_appeal(appeal.id, AppealState.REFUSED, AppealState.PENDING, audit):
            raise InvalidRequest(f"that prompt was appealed already ({(await self._get(appeal_id)).state})")
        return await self._get(appeal.id)

    async def pending(self, limit: int) -> list[Appeal]:
        return await self._store.pending_appeals(limit)

    async def allow(self, actor: Requester, appeal_id: str) -> tuple[Appeal, JobQueued]:
        """Submit the request for its requester; a refusal of the submit (their limits) leaves the appeal pending."""
        async with self._deciding:
            appeal = await self._pending(appeal_id)
            image = None
            if appeal.input_image is not None:
                image = await asyncio.to_thread(self._inputs.read, appeal.input_image)
            queued = await self._submit(appeal.requester, replace(appeal.request, input_image=image), appeal)
            audit = AuditEntry(
                actor.user_key, "appeal.allow", appeal.requester.user_key, queued.job_id, {"appeal": appeal.id}
            )
            await self._store.move_appeal(
                appeal.id, AppealState.PENDING, AppealState.ALLOWED, audit, job_id=queued.job_id
            )
        return await self._get(appeal.id), queued

    async def deny(self, actor: Requester, appeal_id: str, reason: str) -> Appeal:
        why = reason.strip() or "an admin kept the refusal"
        async with self._deciding:
            appeal = await self._pending(appeal_id)
            audit = AuditEntry(
                actor.user_key, "appeal.deny", appeal.requester.user_key, detail={"appeal": appeal.id, "reason": why}
            )
            await self._store.move_appeal(appeal.id, AppealState.PENDING, AppealState.DENIED, audit, reason=why)
        return await self._get(appeal.id)

    async def _get(self, appeal_id: str) -> Appeal:
        appeal = await self._store.get_appeal(appeal_id.strip())
        if appeal is None:
            raise InvalidRequest(f"no appeal has the id {appeal_id!r}", field="appeal")
        return appeal

    async def _pending(self, appeal_id: str) -> Appeal:
        appeal = await self._get(appeal_id)
        if appeal.state is not AppealState.PENDING:
            raise InvalidRequest(f"appeal {appeal.id} was {appeal.state.value}: nothing to decide", field="appeal")
        return appeal
