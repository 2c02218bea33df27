"""The guide's workstation (the WeCom sidebar): the OAuth code exchanged for a
session, which members a guide may see (bound to them or to their store), a
member's view, tagging and notes.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from servicekit.db import UnitOfWork
from servicekit.errors import (
    DomainError,
    InvalidArgument,
    PermissionDenied,
    parse_member_id,
)

from . import binding_repository as binding_repo
from . import domain
from . import repository as repo
from . import tag_repository as tag_repo
from . import workstation_repository as workstation_repo
from .tag_handlers import TagHandlers


class WorkstationHandlers(TagHandlers):
    """The sidebar's sessions and what a guide sees and writes there."""

    async def open_workstation(
        self, uow: UnitOfWork, code: str
    ) -> tuple[repo.StaffRow, str, datetime]:
        """WeCom's OAuth code exchange: the sidebar page's staff member gets a session."""
        if not code.strip():
            raise InvalidArgument("code is required", code="MISSING_FIELD", field="code")
        try:
            staff_id = await self.wecom.user_of_code(code.strip())
        except DomainError:
            raise PermissionDenied(
                "WeCom did not accept the OAuth code", code="INVALID_OAUTH_CODE", field="code"
            ) from None
        staff = await repo.get_staff(uow.conn, staff_id)
        if staff is None or staff.status != "active":
            raise PermissionDenied(
                f"{staff_id} is not an active staff member", code="NOT_STAFF", field="code"
            )
        expires = self.clock() + self.session_ttl
        token = domain.sign_session(self.session_secret, staff.staff_id, expires)
        await repo.audit(
            uow.conn,
            staff.staff_id,
            "workstation_opened",
            f"staff:{staff.staff_id}",
            {},
            self.clock(),
        )
        return staff, token, expires

    async def _session(self, uow: UnitOfWork, token: str) -> repo.StaffRow:
        staff_id = domain.verify_session(self.session_secret, token, self.clock())
        staff = await repo.get_staff(uow.conn, staff_id)
        if staff is None or staff.status != "active":
            raise PermissionDenied(
                "the staff member is no longer active", code="NOT_STAFF", field="token"
            )
        return staff

    async def _visible(
        self, uow: UnitOfWork, token: str, member: str
    ) -> tuple[repo.StaffRow, uuid.UUID, str, str]:
        """(staff, member id, relation, the member's guide): a guide sees the
        members bound to them, and those bound to a guide of their store."""
        staff = await self._session(uow, token)
        member_id = parse_member_id(member)
        binding = await binding_repo.get_binding(uow.conn, member_id)
        if binding is not None and binding.staff_id == staff.staff_id:
            return staff, member_id, "bound", binding.staff_id
        if binding is not None and binding.store_id == staff.store_id:
            return staff, member_id, "store", binding.staff_id
        raise PermissionDenied(
            "the member is not bound to you or your store",
            code="NOT_YOUR_CUSTOMER",
            field="member_id",
        )

    async def workstation_member(
        self, uow: UnitOfWork, token: str, member: str
    ) -> dict[str, object]:
        staff, member_id, relation, guide = await self._visible(uow, token, member)
        orders = await workstation_repo.member_orders(uow.conn, member_id, 10)
        await repo.audit(
            uow.conn, staff.staff_id, "member_viewed", f"member:{member_id}", {}, self.clock()
        )
        return {
            "member_id": str(member_id),
            "relation": relation,
            "guide": guide,
            "tags": await tag_repo.tags_of(uow.conn, member_id),
            "orders": orders,
            "notes": await workstation_repo.notes_of(uow.conn, member_id),
            "last_order_at": orders[0]["ordered_at"] if orders else None,
        }

    async def workstation_tag(
        self, uow: UnitOfWork, token: str, member: str, tag: str, present: bool
    ) -> str:
        staff, member_id, _, _ = await self._visible(uow, token, member)
        await self.set_tag(uow, str(member_id), tag, present, staff.staff_id)
        return str(member_id)

    async def add_note(
        self, uow: UnitOfWork, token: str, member: str, text: str
    ) -> tuple[str, datetime]:
        staff, member_id, _, _ = await self._visible(uow, token, member)
        text = text.strip()
        if not text or len(text) > 1000:
            raise InvalidArgument("a note is 1-1000 characters", code="INVALID_NOTE", field="text")
        now = self.clock()
        await workstation_repo.add_note(uow.conn, member_id, staff.staff_id, text, now)
        await repo.audit(
            uow.conn,
            staff.staff_id,
            "note_added",
            f"member:{member_id}",
            {"length": len(text)},
            now,
        )
        return staff.staff_id, now
