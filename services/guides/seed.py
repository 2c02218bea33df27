"""Demo data: a guide and a store manager for each demo store (idempotent; an
existing staff member is left as an operator last saved them)."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from services.rewards.seed import DEMO_STORES

from . import repository as repo


async def seed_demo(conn: asyncpg.Connection) -> None:
    now = datetime.now(UTC)
    for store in DEMO_STORES:
        for role, prefix, name in (
            ("guide", "guide", "导购"),
            ("store_manager", "manager", "店长"),
        ):
            staff_id = f"{prefix}-{store.store_id.lower()}"
            if await repo.get_staff(conn, staff_id) is None:
                await repo.upsert_staff(
                    conn,
                    repo.StaffRow(
                        staff_id, f"{store.name}{name}", store.store_id, role, "active",
                        staff_id.upper(), "seed", now,
                    ),
                )  # fmt: skip
