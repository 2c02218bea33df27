"""Member tags, given a unit of work (or the Database for a batch): manual tags,
journeys' tags, rule tags computed from a member's orders in the window (on
each order and in a batch), MemberTagsChanged when a member's visible tags
change, and marking the changes on the member's WeCom contacts.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from loyalty.events.v1 import events_pb2
from servicekit.db import Database, UnitOfWork
from servicekit.errors import (
    InvalidArgument,
    parse_member_id,
)
from servicekit.events import ReceivedEvent
from servicekit.protos import timestamp

from . import domain, retries
from . import repository as repo
from . import tag_repository as tag_repo
from .domain import OrderFact
from .handlers_common import HandlersBase


@dataclass(frozen=True)
class TagBatchResult:
    members: int
    added: int
    removed: int


H = TypeVar("H", bound="TagHandlers")


def replace_window(handlers: H, window: timedelta) -> H:
    """The same handlers with another rule-tag window (a batch run's override)."""
    clone = object.__new__(type(handlers))
    clone.__dict__.update(handlers.__dict__)
    clone.tag_window = window
    return clone


def _json_list(value: object) -> list[tuple[str, int]]:
    """A JSONB [[category, quantity], ...] as asyncpg returns it (text)."""
    data = json.loads(value) if isinstance(value, str) else value
    return [(str(c), int(q)) for c, q in data]  # type: ignore[union-attr]


class TagHandlers(HandlersBase):
    """A member's tags: one model for manual, journey and rule tags."""

    async def _visible_tags(self, uow: UnitOfWork, member_id: uuid.UUID) -> set[str]:
        return {r["tag"] for r in await tag_repo.tags_of(uow.conn, member_id)}

    async def _tags_changed(
        self, uow: UnitOfWork, member_id: uuid.UUID, before: set[str], now: datetime
    ) -> tuple[list[str], list[str]]:
        after = await self._visible_tags(uow, member_id)
        added, removed = sorted(after - before), sorted(before - after)
        if added or removed:
            await uow.emit(
                events_pb2.MemberTagsChanged(
                    member_id=str(member_id),
                    added=added,
                    removed=removed,
                    tags=sorted(after),
                    changed_at=timestamp(now),
                ),
                member_id=str(member_id),
            )
            await tag_repo.enqueue_tag_push(uow.conn, member_id, added, removed, now)
        return added, removed

    async def list_tags(self, uow: UnitOfWork, member: str) -> list[Any]:
        return await tag_repo.tags_of(uow.conn, parse_member_id(member))

    async def set_tag(
        self,
        uow: UnitOfWork,
        member: str,
        tag: str,
        present: bool,
        actor: str,
        source: str = "manual",
    ) -> None:
        member_id = parse_member_id(member)
        tag = domain.normalise_tag(tag)
        actor = domain.require_id(actor, "actor")
        now = self.clock()
        await repo.lock_member(uow.conn, member_id)
        before = await self._visible_tags(uow, member_id)
        if present:
            changed = await tag_repo.add_tag(uow.conn, member_id, tag, source, actor, now)
        else:
            changed = await tag_repo.remove_tag(uow.conn, member_id, tag, source)
        if changed:
            await repo.audit(
                uow.conn,
                actor,
                "tag_added" if present else "tag_removed",
                f"member:{member_id}",
                {"tag": tag, "source": source},
                now,
            )
            await self._tags_changed(uow, member_id, before, now)

    async def on_journey_tagged(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        """A journey's `tag` step writes into the one tag model (source "journey")."""
        p = event.payload
        assert isinstance(p, events_pb2.JourneyTagged)
        try:
            async with uow.conn.transaction():
                await self.set_tag(uow, p.member_id, p.tag, True, "journey", source="journey")
        except InvalidArgument as exc:
            # A journey's tag this model cannot hold (too long, unprintable):
            # retrying cannot help, so it is recorded instead of dead-lettered.
            await repo.audit(
                uow.conn, "journey", "tag_refused", f"member:{p.member_id}",
                {"tag": p.tag[:100], "code": exc.code}, self.clock(),
            )  # fmt: skip

    async def refresh_rule_tags(
        self, uow: UnitOfWork, member_id: uuid.UUID, locked: bool = False
    ) -> tuple[int, int]:
        """One member's rule tags from their orders in the window (incremental
        on each order event; the batch calls the same for every member).
        `locked`: the caller holds the member's lock (repo.lock_member)."""
        now = self.clock()
        if not locked:
            await repo.lock_member(uow.conn, member_id)
        rows, tags = await tag_repo.recent_orders_and_tags(
            uow.conn, member_id, now - self.tag_window
        )
        return await self._apply_rule_tags(uow, member_id, rows, tags, now)

    async def refresh_rule_tags_of(self, uow: UnitOfWork, member_ids: list[uuid.UUID]) -> None:
        """refresh_rule_tags for several members whose locks the caller holds,
        their orders and tags read in one statement."""
        if len(member_ids) == 1:
            await self.refresh_rule_tags(uow, member_ids[0], locked=True)
            return
        now = self.clock()
        read = await tag_repo.recent_orders_and_tags_of(uow.conn, member_ids, now - self.tag_window)
        for member_id in member_ids:
            rows, tags = read[member_id]
            await self._apply_rule_tags(uow, member_id, rows, tags, now)

    async def _apply_rule_tags(
        self,
        uow: UnitOfWork,
        member_id: uuid.UUID,
        rows: list[Any],
        tags: list[tuple[str, str]],
        now: datetime,
    ) -> tuple[int, int]:
        facts = [
            OrderFact(
                str(r["order_id"]),
                r["store_id"],
                r["channel"],
                r["paid"],
                r["ordered_at"],
                tuple(_json_list(r["categories"])),
            )
            for r in rows
        ]
        want = domain.rule_tags(facts, self.tz, self.tag_rules)
        have = {tag for tag, source in tags if source == "rule"}
        if want == have:
            return 0, 0
        before = {tag for tag, _ in tags}  # read once: the rule tags and `before`
        for tag in want - have:
            await tag_repo.add_tag(uow.conn, member_id, tag, "rule", "rules", now)
        for tag in have - want:
            await tag_repo.remove_tag(uow.conn, member_id, tag, "rule")
        await self._tags_changed(uow, member_id, before, now)
        return len(want - have), len(have - want)

    async def run_tag_batch(self, db: Database, window_days: int = 0) -> TagBatchResult:
        handlers = self
        if window_days:
            if window_days < 1 or window_days > 3660:
                raise InvalidArgument(
                    "window_days must be 1..3660", code="INVALID_WINDOW", field="window_days"
                )
            handlers = replace_window(self, timedelta(days=window_days))
        async with db.reading() as uow:
            members = await tag_repo.members_for_tag_batch(
                uow.conn, self.clock() - handlers.tag_window
            )
        added = removed = 0
        # A transaction per member: a batch never holds many members' locks.
        for member_id in members:
            async with db.unit_of_work() as uow:
                a, r = await handlers.refresh_rule_tags(uow, member_id)
            added, removed = added + a, removed + r
        return TagBatchResult(len(members), added, removed)

    async def push_next_tags(self, db: Database) -> bool:
        """Mark one due tag change on the member's WeCom contacts; False when
        none is due (back-off, display names: retries.push_next_tags)."""
        return await retries.push_next_tags(self, db)
