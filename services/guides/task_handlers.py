"""Guide tasks: a journey's request gathered into the day's task of one guide,
sent to WeCom's message-task API, tracked per customer, and listed on the
workstation.
"""

from __future__ import annotations

import logging
import uuid
from datetime import date
from typing import Any

from loyalty.events.v1 import events_pb2
from servicekit.db import Database, UnitOfWork
from servicekit.errors import (
    DomainError,
)
from servicekit.events import ReceivedEvent
from servicekit.protos import to_datetime

from . import binding_repository as binding_repo
from . import domain, retries
from . import repository as repo
from . import task_repository as task_repo
from .workstation_handlers import WorkstationHandlers

log = logging.getLogger(__name__)


class TaskHandlers(WorkstationHandlers):
    """A journey's asks of a guide, through WeCom."""

    async def on_guide_task_requested(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        """A journey asks the member's guide to act: the member joins the day's
        task of that guide and journey step (sent to WeCom once gathered)."""
        p = event.payload
        assert isinstance(p, events_pb2.GuideTaskRequested)
        member_id = uuid.UUID(p.member_id)
        at = to_datetime(p.requested_at) or self.clock()
        binding = await binding_repo.get_binding(uow.conn, member_id)
        staff = await repo.get_staff(uow.conn, binding.staff_id) if binding else None
        ext = await binding_repo.live_link(uow.conn, member_id, staff.staff_id) if staff else None
        if staff is None or staff.status != "active" or ext is None:
            reason = "no_guide" if staff is None or staff.status != "active" else "not_a_contact"
            await repo.audit(
                uow.conn, "journey", "task_skipped", f"member:{member_id}",
                {"journey_id": p.journey_id, "step_id": p.step_id, "reason": reason}, at,
            )  # fmt: skip
            return
        task_id = await task_repo.open_task(
            uow.conn, staff.staff_id, p.journey_id, p.step_id,
            # Gathered from when it arrived here (the journey's clock may differ).
            date.fromisoformat(domain.local_day(at, self.tz)), p.title, p.script, self.clock(),
        )  # fmt: skip
        await task_repo.add_target(uow.conn, task_id, member_id, ext)

    async def send_next_task(self, db: Database) -> bool:
        """Hand one gathered, due task to WeCom's message-task API; False when
        none (a refused task backs off, never blocks: retries.send_next_task)."""
        return await retries.send_next_task(self, db)

    async def track_sent_tasks(self, db: Database) -> bool:
        """Per customer, whether the guide sent the message; a task is done when
        nobody is pending. One pass over the sent tasks; False (no hot loop)."""
        statuses = {1: "sent", 2: "not_contact", 3: "failed"}
        await retries.expire_tasks(self, db)  # past TASK_LIFE_HOURS: settled, not polled
        async with db.reading() as uow:
            task_ids = await task_repo.sent_task_ids(uow.conn)
        for task_id in task_ids:
            async with db.unit_of_work() as uow:
                row = await task_repo.lock_sent_task(uow.conn, task_id)
                if row is None:
                    continue  # another replica has it, or it is done
                try:
                    results = await self.wecom.send_results(row["msgid"], row["staff_id"])
                except DomainError as exc:
                    log.warning("guide task %s not checked: %s", task_id, exc.message)
                    continue
                pending = False
                for t in await task_repo.task_targets(uow.conn, task_id):
                    status = statuses.get(results.get(t["external_userid"], 0), "pending")
                    pending = pending or status == "pending"
                    if status != t["status"]:
                        await task_repo.set_target(uow.conn, task_id, t["external_userid"], status)
                if not pending:
                    await task_repo.set_task(uow.conn, task_id, "done")
        return False

    async def list_tasks(self, uow: UnitOfWork, token: str) -> list[tuple[Any, list[Any]]]:
        staff = await self._session(uow, token)
        return [
            (t, await task_repo.task_targets(uow.conn, t["task_id"]))
            for t in await task_repo.tasks_of(uow.conn, staff.staff_id)
        ]
