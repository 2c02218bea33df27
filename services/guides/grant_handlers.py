"""Coupon grants from the workstation: the monthly budgets of guides and stores,
and a grant that takes both (or neither) and has rewards issue the coupon at
most once per grant key.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from servicekit.db import Database, UnitOfWork
from servicekit.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)

from . import domain
from . import grant_repository as grant_repo
from . import repository as repo
from .workstation_handlers import WorkstationHandlers


class GrantHandlers(WorkstationHandlers):
    """Coupon budgets and grants."""

    async def set_budget(
        self, uow: UnitOfWork, scope: str, owner: str, month: str, coupons: int, actor: str
    ) -> Any:
        if scope not in ("staff", "store"):
            raise InvalidArgument("scope is staff or store", code="INVALID_SCOPE", field="scope")
        owner = domain.require_id(owner, "owner_id")
        actor = domain.require_id(actor, "actor")
        try:
            datetime.strptime(month, "%Y-%m")
        except ValueError:
            raise InvalidArgument("month is YYYY-MM", code="INVALID_MONTH", field="month") from None
        if coupons < 0 or coupons > 1_000_000:
            raise InvalidArgument(
                "coupons must be 0..1000000", code="INVALID_BUDGET", field="coupons"
            )
        try:
            async with uow.conn.transaction():
                row = await grant_repo.set_budget(uow.conn, scope, owner, month, coupons)
        except asyncpg.CheckViolationError:
            raise FailedPrecondition(
                "the budget would be below what is already used",
                code="BUDGET_BELOW_USED",
                field="coupons",
            ) from None
        await repo.audit(
            uow.conn,
            actor,
            "budget_set",
            f"{scope}:{owner}",
            {"month": month, "coupons": coupons},
            self.clock(),
        )
        return row

    async def grant_coupon(
        self, db: Database, token: str, member: str, template_id: str, grant_key: str
    ) -> tuple[str, str, int, int, bool]:
        """A coupon from the guide's budget and their store's, both taken in
        one transaction (or neither); then issued by rewards under a key derived
        from the grant key, so a retry after any failure issues at most once.
        A coupon rewards refuses gives the budget back."""
        if self.coupons is None:
            raise FailedPrecondition("coupon grants are not configured", code="GRANTS_DISABLED")
        template_id = domain.require_id(template_id, "template_id")
        grant_key = domain.require_id(grant_key, "grant_key")
        now = self.clock()
        month = domain.budget_month(now, self.tz)
        async with db.unit_of_work() as uow:
            staff, member_id, _, _ = await self._visible(uow, token, member)
            key = f"{staff.staff_id}:{grant_key}"
            prior = await grant_repo.get_grant(uow.conn, key, lock=True)
            if prior is not None and (prior["member_id"], prior["template_id"]) != (
                member_id,
                template_id,
            ):
                raise AlreadyExists(
                    "grant_key was used for another grant",
                    code="GRANT_KEY_REUSED",
                    field="grant_key",
                )
            if prior is not None and prior["status"] == "issued":
                return (
                    prior["coupon_id"],
                    prior["coupon_code"],
                    await grant_repo.remaining(uow.conn, "staff", staff.staff_id, prior["month"]),
                    await grant_repo.remaining(uow.conn, "store", staff.store_id, prior["month"]),
                    True,
                )
            if prior is None or prior["status"] == "released":
                # Staff row first, then store: one lock order, no deadlock.
                staff_left = await grant_repo.take_budget(uow.conn, "staff", staff.staff_id, month)
                store_left = (
                    await grant_repo.take_budget(uow.conn, "store", staff.store_id, month)
                    if staff_left is not None
                    else None
                )
                if staff_left is None or store_left is None:
                    # Raising rolls back the staff budget taken above too.
                    raise ResourceExhausted(
                        f"no coupon budget left this month for the "
                        f"{'guide' if staff_left is None else 'store'}",
                        code="BUDGET_EXHAUSTED",
                        field="template_id",
                    )
                await grant_repo.upsert_grant(
                    uow.conn,
                    key,
                    staff.staff_id,
                    staff.store_id,
                    member_id,
                    template_id,
                    month,
                    now,
                )
            else:
                month = prior["month"]  # reserved earlier; the issue is retried below
        try:
            coupon_id, code = await self.coupons.issue(
                template_id, str(member_id), f"guide-grant:{key}"[:128], staff.staff_id
            )
        except FailedPrecondition:
            async with db.unit_of_work() as uow:
                await grant_repo.give_back_budget(uow.conn, "staff", staff.staff_id, month)
                await grant_repo.give_back_budget(uow.conn, "store", staff.store_id, month)
                await grant_repo.finish_grant(uow.conn, key, "released")
            raise
        async with db.unit_of_work() as uow:
            await grant_repo.finish_grant(uow.conn, key, "issued", coupon_id, code)
            await repo.audit(
                uow.conn, staff.staff_id, "coupon_granted", f"member:{member_id}",
                {"template_id": template_id, "coupon_id": coupon_id, "month": month}, now,
            )  # fmt: skip
            return (
                coupon_id,
                code,
                await grant_repo.remaining(uow.conn, "staff", staff.staff_id, month),
                await grant_repo.remaining(uow.conn, "store", staff.store_id, month),
                False,
            )
