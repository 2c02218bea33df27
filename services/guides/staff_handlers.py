"""The staff directory: saving one staff member, reading them, syncing WeCom's
directory (leavers resigned), and resigning a staff member with WeCom's
resigned-staff transfer of their customers, whose bindings follow.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import asyncpg

from servicekit.db import Database, UnitOfWork
from servicekit.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)

from . import binding_repository as binding_repo
from . import domain, retries
from . import repository as repo
from .binding_handlers import BindingHandlers
from .domain import Role

log = logging.getLogger(__name__)


class StaffHandlers(BindingHandlers):
    """Staff and their directory."""

    async def upsert_staff(
        self,
        uow: UnitOfWork,
        staff_id: str,
        name: str,
        store_id: str,
        role: str,
        staff_code: str,
        actor: str,
    ) -> repo.StaffRow:
        staff_id = domain.require_id(staff_id, "staff_id")
        store_id = domain.require_id(store_id, "store_id")
        actor = domain.require_id(actor, "actor")
        if not name.strip():
            raise InvalidArgument("name is required", code="MISSING_FIELD", field="name")
        parsed = domain.parse_role(role)
        code = domain.require_id(staff_code, "staff_code") if staff_code.strip() else staff_id
        now = self.clock()
        before = await repo.get_staff(uow.conn, staff_id, lock=True)
        if before is not None and before.status == "resigned":
            raise FailedPrecondition(
                f"staff {staff_id} has resigned", code="STAFF_RESIGNED", field="staff_id"
            )
        row = repo.StaffRow(
            staff_id, name.strip(), store_id, parsed.value, "active", code, actor, now
        )
        try:
            async with uow.conn.transaction():
                saved = await repo.upsert_staff(uow.conn, row)
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(
                f"staff code {code} belongs to another staff member",
                code="STAFF_CODE_TAKEN",
                field="staff_code",
            ) from None
        if before is None or replace(before, updated_at=now, updated_by=actor) != saved:
            await repo.audit(
                uow.conn,
                actor,
                "staff_created" if before is None else "staff_updated",
                f"staff:{staff_id}",
                {"name": saved.name, "store_id": store_id, "role": parsed.value, "code": code},
                now,
            )
        return saved

    async def get_staff(self, uow: UnitOfWork, staff_id: str) -> repo.StaffRow:
        row = await repo.get_staff(uow.conn, staff_id)
        if row is None:
            raise NotFound(f"no staff {staff_id}", code="UNKNOWN_STAFF", field="staff_id")
        return row

    async def list_staff(self, uow: UnitOfWork, store_id: str) -> list[repo.StaffRow]:
        return await repo.list_staff(uow.conn, store_id.strip())

    async def sync_directory(self, db: Database, actor: str) -> dict[str, int]:
        """WeCom's directory into the staff table. Staff gone from it, or
        disabled there, are resigned; their customers go to the store manager
        where the store has one (otherwise they wait for ResignStaff)."""
        users = await self.wecom.list_users()
        if not users:
            # An empty answer is a misconfigured app (no directory permission),
            # never "everyone left": resigning all staff would move every customer.
            raise FailedPrecondition(
                "WeCom's directory came back empty; check the app's directory permission",
                code="DIRECTORY_EMPTY",
            )
        counts = {"created": 0, "updated": 0, "resigned": 0, "unchanged": 0}
        seen: set[str] = set()
        leavers: list[repo.StaffRow] = []
        now = self.clock()
        async with db.unit_of_work() as uow:
            for user in users:
                seen.add(user.staff_id)
                before = await repo.get_staff(uow.conn, user.staff_id, lock=True)
                if not user.active:
                    if before is not None and before.status == "active":
                        leavers.append(before)
                    continue
                if not user.store_id:
                    log.warning("directory user %s has no store; skipped", user.staff_id)
                    continue
                try:
                    role = Role(user.role)
                except ValueError:
                    role = Role.GUIDE
                if before is not None and (before.name, before.store_id, before.role) == (
                    user.name,
                    user.store_id,
                    role.value,
                ):
                    counts["unchanged"] += 1
                    continue
                if before is not None and before.status == "resigned":
                    counts["unchanged"] += 1
                    continue
                await self.upsert_staff(
                    uow,
                    user.staff_id,
                    user.name,
                    user.store_id,
                    role.value,
                    before.staff_code if before else "",
                    actor,
                )
                counts["created" if before is None else "updated"] += 1
            for row in await repo.list_staff(uow.conn, ""):
                if row.status == "active" and row.staff_id not in seen:
                    leavers.append(row)
        for leaver in leavers:
            takeover = await self._store_manager(db, leaver)
            if takeover is None:
                async with db.unit_of_work() as uow:
                    await repo.upsert_staff(
                        uow.conn,
                        replace(leaver, status="resigned", updated_by=actor, updated_at=now),
                    )
                    await repo.audit(
                        uow.conn,
                        actor,
                        "staff_resigned",
                        f"staff:{leaver.staff_id}",
                        {
                            "takeover": None,
                            "note": "no store manager: customers wait for ResignStaff",
                        },
                        now,
                    )
            else:
                await self.resign_staff(db, leaver.staff_id, takeover, actor)
            counts["resigned"] += 1
        return counts

    async def _store_manager(self, db: Database, leaver: repo.StaffRow) -> str | None:
        async with db.reading() as uow:
            for row in await repo.list_staff(uow.conn, leaver.store_id):
                if (
                    row.role == Role.STORE_MANAGER.value
                    and row.status == "active"
                    and row.staff_id != leaver.staff_id
                ):
                    return row.staff_id
        return None

    async def resign_staff(
        self, db: Database, staff_id: str, takeover_id: str, actor: str
    ) -> tuple[int, list[str]]:
        """Mark the staff member resigned and move their customers (WeCom's
        resigned-staff transfer): each customer WeCom accepts is a pending
        transfer whose binding follows when WeCom reports the takeover done
        (retries.poll_transfers). Customers WeCom refuses stay where they are
        and are returned; calling again retries only them."""
        actor = domain.require_id(actor, "actor")
        takeover_id = domain.require_id(takeover_id, "takeover_staff_id")
        async with db.reading() as uow:
            leaver = await self.get_staff(uow, staff_id)
            takeover = await repo.get_staff(uow.conn, takeover_id)
            customers = await binding_repo.customers_of(uow.conn, staff_id)
            pending = await retries.pending_transfers_of(uow.conn, staff_id)
            customers = [(ext, m) for ext, m in customers if ext not in pending]
        if takeover is None or takeover.status != "active" or takeover_id == staff_id:
            raise FailedPrecondition(
                "the takeover staff member must be another active staff member",
                code="INVALID_TAKEOVER",
                field="takeover_staff_id",
            )
        results = (
            await self.wecom.transfer_resigned(staff_id, takeover_id, [ext for ext, _ in customers])
            if customers
            else {}
        )
        now = self.clock()
        moved = 0
        failed: list[str] = []
        async with db.unit_of_work() as uow:
            if leaver.status != "resigned":
                await repo.upsert_staff(
                    uow.conn, replace(leaver, status="resigned", updated_by=actor, updated_at=now)
                )
            for ext, member_id in customers:
                if results.get(ext, -1) != 0:
                    failed.append(ext)
                    continue
                # errcode 0 only starts WeCom's 24-hour takeover: the binding
                # moves when transfer_result says it is done (retries.py).
                await retries.record_transfer(
                    uow, staff_id, takeover_id, ext, member_id, actor, now
                )
                moved += 1
            await repo.audit(
                uow.conn,
                actor,
                "staff_resigned",
                f"staff:{staff_id}",
                {"takeover": takeover_id, "transferred": moved, "failed": failed},
                now,
            )
        return moved, failed
