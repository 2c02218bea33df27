"""Settling WeCom sends from their tasks' results.

`add_msg_template` only creates a task: the staff member sends it (or not)
from their WeCom client. So a WeCom send waits `sending` (reason TASK_CREATED,
provider_ref = the task's msgid) and this job reads the task's per-contact
result when it is due, as WeCom documents it: `get_groupmsg_task` lists the
staff members the task went to, then `get_groupmsg_send_result` (which needs
the sender's userid) per sender, every page: status 1 (sent)
→ `delivered`; 2 (not the staff member's customer) or 3 (the customer's
limit) → `failed` with NOT_A_FRIEND / CONTACT_LIMIT; 0 (not sent yet) waits
and is read again, until the task's life (WECOM_TASK_LIFE_HOURS, by the
service clock) has passed: then `failed` NOT_SENT_BY_STAFF. A result that
cannot be read waits the same way; past the task's life it fails with the
provider's code. It runs in the service (periodic) and as the CLI command
`wecom-results`.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Any, Protocol

from servicekit.db import Database

from . import scheduler_repository as scheduler_repo
from .channels import poll_forever
from .domain import Clock
from .providers import TokenError, WeComContactProvider

log = logging.getLogger(__name__)

# get_groupmsg_send_result's per-contact status -> the send's error code.
REFUSED = {2: "NOT_A_FRIEND", 3: "CONTACT_LIMIT"}


class TaskResults(Protocol):
    async def task_results(self, msgid: str) -> list[dict[str, Any]]: ...


class WeComResults:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        provider: TaskResults,
        task_life: timedelta = timedelta(hours=72),
        poll: timedelta = timedelta(minutes=10),
        batch_size: int = 100,
        lease: timedelta = timedelta(minutes=2),
    ) -> None:
        self._db = db
        self._clock = clock
        self._provider = provider
        self._task_life = task_life
        self._poll = poll
        self._batch = batch_size
        self._lease = lease

    async def settle_once(self) -> int:
        """Read one batch of due tasks; returns how many were read."""
        now = self._clock.now()
        async with self._db.unit_of_work() as uow:
            tasks = await scheduler_repo.lease_wecom_tasks(
                uow.conn, now, now + self._lease, self._batch
            )
        if not tasks:
            return 0
        answers = await asyncio.gather(
            *(self._provider.task_results(t.msgid) for t in tasks),
            return_exceptions=True,
        )
        done = self._clock.now()
        settled: list[scheduler_repo.Outcome] = []
        waiting: list[str] = []
        for task, answer in zip(tasks, answers, strict=True):
            outcome = self._settle(task, answer, done)
            if outcome is None:
                waiting.append(task.send_key)
            else:
                settled.append(outcome)
        async with self._db.unit_of_work() as uow:
            await scheduler_repo.record_outcomes(uow.conn, settled, done)
            await scheduler_repo.postpone_wecom_tasks(uow.conn, waiting, done + self._poll)
        return len(tasks)

    def _settle(
        self,
        task: scheduler_repo.WeComTask,
        answer: list[dict[str, Any]] | BaseException,
        now: datetime,
    ) -> scheduler_repo.Outcome | None:
        """The send's final outcome, or None while the task may still be sent."""
        expired = now >= task.created_at + self._task_life
        if isinstance(answer, BaseException):
            if isinstance(answer, asyncio.CancelledError):
                raise answer
            code = answer.code if isinstance(answer, TokenError) else type(answer).__name__
            log.warning("WeCom task %s: result unreadable (%s)", task.msgid, code)
            if not expired:
                return None
            return scheduler_repo.Outcome(
                task.send_key, "failed", f"RESULT_UNREADABLE: {code}", task.msgid, code
            )
        # One contact per task (chat_type single): its rows, one per sender the
        # task went to; any sender having sent it delivers it.
        statuses = [int(r.get("status", 0) or 0) for r in answer]
        if 1 in statuses:
            return scheduler_repo.Outcome(task.send_key, "delivered", "SENT_BY_STAFF", task.msgid)
        # Refused only when every sender's attempt was refused (another may still send).
        refused = statuses[0] if statuses and all(s in REFUSED for s in statuses) else None
        if refused is not None:
            code = REFUSED[refused]
            return scheduler_repo.Outcome(
                task.send_key, "failed", f"{code}: status {refused}", task.msgid, code
            )
        if not expired:
            return None
        return scheduler_repo.Outcome(
            task.send_key, "failed", "NOT_SENT_BY_STAFF", task.msgid, "NOT_SENT_BY_STAFF"
        )

    async def run(self, poll_interval: float) -> None:
        await poll_forever(self.settle_once, poll_interval, log, "WeCom results")


def build_wecom_results(
    settings: Any, db: Database, clock: Clock, providers: dict[str, Any]
) -> WeComResults | None:
    """The job over the configured WeCom provider; None when WeCom is not configured."""
    provider = providers.get("wecom")
    if not isinstance(provider, WeComContactProvider):
        return None
    return WeComResults(
        db,
        clock,
        provider,
        task_life=timedelta(hours=settings.wecom_task_life_hours),
        poll=timedelta(minutes=settings.wecom_result_recheck_minutes),
    )
