"""Guides' OrderCompleted applied a read at a time (the consumer's batch
handler, `on_orders_completed`: locks and bindings, orders and funnel, and
the members' window and tags each in one statement) against real PostgreSQL:
twin members end with the same orders, funnel, rule tags and
MemberTagsChanged events whether each order is its own read or the orders
come many per read, in runs of distinct members as servicekit/consumer.py
splits them."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from loyalty.events.v1 import events_pb2
from servicekit.db import Database
from services.guides import tag_repository as tag_repo
from services.guides.handlers import GuidesHandlers

from ..harness import Infra, ServiceClock
from .guides_support import guides_handlers
from .test_guides_tags_funnel import NOW, _event, _order
from .test_tiering_order_batches import reads_of

MEMBERS = 6


@pytest.fixture(scope="module")
def clock() -> ServiceClock:
    return ServiceClock()


@pytest.fixture(scope="module")
async def handlers(
    infra: Infra, clock: ServiceClock
) -> AsyncIterator[tuple[GuidesHandlers, Database]]:
    async with guides_handlers(infra, clock) as pair:
        yield pair


async def snapshot(db: Database, member: uuid.UUID) -> dict[str, Any]:
    conn = db.pool
    orders = await conn.fetch(
        "SELECT store_id, channel, paid_amount_fen, ordered_at, categories, staff_id,"
        " attributed_store_id, rule, day FROM guides.orders WHERE member_id = $1"
        " ORDER BY ordered_at, paid_amount_fen",
        member,
    )
    funnel = await conn.fetchrow(
        "SELECT first_order_at, repurchased_at FROM guides.funnel WHERE member_id = $1", member
    )
    async with db.reading() as uow:
        tags = sorted((r["tag"], r["source"]) for r in await tag_repo.tags_of(uow.conn, member))
    changed = await conn.fetchval(
        "SELECT count(*) FROM guides.outbox WHERE event_type = $1"
        " AND position($2::bytea IN envelope) > 0",
        events_pb2.MemberTagsChanged.DESCRIPTOR.full_name,
        str(member).encode(),
    )
    return {
        "orders": [dict(r) for r in orders],
        "funnel": dict(funnel) if funnel else None,
        "tags": tags,
        "tags_changed": changed,
    }


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_orders_many_per_read_equal_one_per_read(
    handlers: tuple[GuidesHandlers, Database], clock: ServiceClock, seed: int
) -> None:
    h, db = handlers
    rng = random.Random(seed)
    picks = [rng.randrange(MEMBERS) for _ in range(rng.randint(8, 30))]
    template = [_order(rng, "") for _ in picks]
    sizes = [rng.randint(1, 8) for _ in range(10)]
    twins = []
    for _ in range(2):
        members = [uuid.uuid4() for _ in range(MEMBERS)]
        events = []
        for m, t in zip(picks, template, strict=True):
            order = events_pb2.OrderCompleted()
            order.CopyFrom(t)
            order.order_id, order.member_id = str(uuid.uuid4()), str(members[m])
            events.append(_event(order, str(members[m])))
        twins.append((members, events))
    (one_members, one_events), (many_members, many_events) = twins
    with clock.pinned(NOW):
        for e in one_events:
            async with db.unit_of_work() as uow:
                await h.on_order_completed(uow, e)
        for read in reads_of(many_events, sizes):
            async with db.unit_of_work() as uow:
                for run in read:
                    if len(run) > 1:
                        await h.on_orders_completed(uow, run)
                    else:
                        await h.on_order_completed(uow, run[0])
    tagged = 0
    for a, b in zip(one_members, many_members, strict=True):
        one, many = await snapshot(db, a), await snapshot(db, b)
        assert one == many
        tagged += bool(one["tags"])
    assert tagged, "the data exercises the rule tags"
