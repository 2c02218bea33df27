"""The exclusive guide (专属导购), given a unit of work: the first staff member
to add a customer on WeCom binds the member, later adders leave it; a rebind
is recorded in the history, audited and announced (GuideBound); an operator
reassigns a member's guide.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from loyalty.events.v1 import events_pb2
from servicekit.db import UnitOfWork
from servicekit.errors import (
    FailedPrecondition,
    parse_member_id,
)
from servicekit.protos import timestamp

from . import attribution_repository as attribution_repo
from . import binding_repository as binding_repo
from . import domain
from . import repository as repo
from .handlers_common import WECOM_ACTOR, HandlersBase


class BindingHandlers(HandlersBase):
    """Binding a member to one guide."""

    async def _bind_first(
        self, uow: UnitOfWork, member_id: uuid.UUID, staff: repo.StaffRow, now: datetime
    ) -> None:
        """The staff member who added the customer becomes the exclusive guide,
        unless the member already has one (the first guide keeps the member)."""
        await repo.lock_member(uow.conn, member_id)
        current = await binding_repo.get_binding(uow.conn, member_id)
        if current is None:
            await self._rebind(uow, member_id, "", staff, "wecom_add", WECOM_ACTOR, now)
            await attribution_repo.funnel_added(
                uow.conn, member_id, now, staff.staff_id, staff.store_id
            )
        elif current.staff_id != staff.staff_id:
            await repo.audit(
                uow.conn,
                WECOM_ACTOR,
                "binding_kept",
                f"member:{member_id}",
                {"guide": current.staff_id, "also_added_by": staff.staff_id},
                now,
            )

    async def _rebind(
        self,
        uow: UnitOfWork,
        member_id: uuid.UUID,
        from_staff: str,
        staff: repo.StaffRow,
        reason: str,
        actor: str,
        now: datetime,
    ) -> None:
        await binding_repo.set_binding(uow.conn, member_id, from_staff, staff, reason, actor, now)
        await repo.audit(
            uow.conn,
            actor,
            "guide_bound",
            f"member:{member_id}",
            {"from": from_staff, "to": staff.staff_id, "reason": reason},
            now,
        )
        await uow.emit(
            events_pb2.GuideBound(
                member_id=str(member_id),
                from_staff_id=from_staff,
                to_staff_id=staff.staff_id,
                store_id=staff.store_id,
                reason=reason,
                bound_at=timestamp(now),
            ),
            member_id=str(member_id),
        )

    async def reassign_guide(
        self, uow: UnitOfWork, member: str, staff_id: str, actor: str, reason: str
    ) -> None:
        member_id = parse_member_id(member)
        actor = domain.require_id(actor, "actor")
        staff = await repo.get_staff(uow.conn, staff_id)
        if staff is None or staff.status != "active":
            raise FailedPrecondition(
                f"staff {staff_id} is not an active staff member",
                code="UNKNOWN_STAFF",
                field="staff_id",
            )
        await repo.lock_member(uow.conn, member_id)
        current = await binding_repo.get_binding(uow.conn, member_id)
        if current is not None and current.staff_id == staff.staff_id:
            return
        await self._rebind(
            uow,
            member_id,
            current.staff_id if current else "",
            staff,
            f"operator:{reason.strip()}" if reason.strip() else "operator",
            actor,
            self.clock(),
        )
