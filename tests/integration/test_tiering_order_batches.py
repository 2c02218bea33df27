"""Tiering's OrderCompleted applied a read at a time (the consumer's batch
handler, `on_orders_completed`) against real PostgreSQL: for random orders of
a few members (in and out of order, repeated order ids, orders without a
member, stores), twin members on twin programmes end with the same tier rows,
spend, growth, order store, history and TierChanged events whether each order
is its own read or the orders come many per read, split into runs of distinct
members as servicekit/consumer.py splits them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loyalty.events.v1 import events_pb2
from servicekit.db import Database, create_pool
from servicekit.events import ReceivedEvent, make_envelope
from servicekit.protos import timestamp as ts
from services.tiering import repository as repo
from services.tiering.domain import (
    Benefits,
    Ladder,
    PeriodUnit,
    ProgrammeRules,
    QualifyingMetric,
    Tier,
    TierProgramme,
)
from services.tiering.handlers import TieringHandlers

from ..harness import Infra

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SH = ZoneInfo("Asia/Shanghai")
T0 = datetime(2025, 3, 1, 10, tzinfo=SH)
LADDER = Ladder(
    (
        Tier("regular", "普通会员", 0, Benefits()),
        Tier("svip", "SVIP", 30_000, Benefits(12_000), retention=20_000),
        Tier("vip", "VIP", 90_000, Benefits(15_000), retention=60_000),
    )
)
MEMBERS = 3


@pytest.fixture
async def db(infra: Infra) -> AsyncIterator[Database]:
    pool = await create_pool(infra.database_url, 1, 4)
    database = Database(pool, "tiering", "tiering")
    yield database
    await database.close()


def programme(pid: str, metric: QualifyingMetric) -> TierProgramme:
    return TierProgramme(
        pid,
        1,
        datetime(2024, 1, 1, tzinfo=SH),
        metric,
        6,
        LADDER,
        ProgrammeRules(period_unit=PeriodUnit.MONTH, period_length=3),
    )


# (member index or None, hours after T0, paid fen, order number, store)
order = st.tuples(
    st.one_of(st.none(), st.integers(0, MEMBERS - 1)),
    st.integers(0, 24 * 200),
    st.integers(0, 60_000),
    st.integers(0, 40),
    st.sampled_from(["", "SH001", "SH002"]),
)


def received(member: uuid.UUID | None, hours: int, paid: int, order_id: str, store: str) -> Any:
    payload = events_pb2.OrderCompleted(
        order_id=order_id,
        member_id=str(member) if member else "",
        paid_amount_fen=paid,
        ordered_at=ts(T0 + timedelta(hours=hours)),
        store_id=store,
    )
    envelope = make_envelope("rewards", payload, str(member) if member else "")
    return ReceivedEvent("rewards", "0-1", envelope, payload)


def reads_of(events: list[Any], sizes: list[int]) -> list[list[list[Any]]]:
    """The events cut into reads of the given sizes, each read into runs of
    one type and distinct members (an event without a member alone), as the
    consumer does."""
    reads: list[list[list[Any]]] = []
    rest = list(events)
    for size in [*sizes, len(rest)]:
        chunk, rest = rest[:size], rest[size:]
        runs: list[list[Any]] = []
        seen: set[str] = set()
        for e in chunk:
            member = e.envelope.member_id
            if not runs or not member or not seen or member in seen:
                runs.append([])
                seen = set()
            runs[-1].append(e)
            if member:
                seen.add(member)
        if runs:
            reads.append(runs)
        if not rest:
            break
    return reads


async def snapshot(db: Database, member: uuid.UUID) -> dict[str, Any]:
    """What tiering holds for a member, without the ids and write times."""

    def plain(row: Any) -> dict[str, Any]:
        return {
            k: v
            for k, v in dict(row).items()
            if k not in ("member_id", "programme_id", "updated_at", "created_at", "id")
        }

    conn = db.pool
    out: dict[str, Any] = {}
    for table in ("member_tiers", "member_spend", "member_profiles"):
        row = await conn.fetchrow(f"SELECT * FROM tiering.{table} WHERE member_id = $1", member)
        out[table] = plain(row) if row else None
    out["growth"] = [
        {**plain(r), "ref": r["ref"].split("-", 1)[1]}  # without the twin's tag
        for r in await conn.fetch(
            "SELECT kind, ref, points, occurred_at, local_day FROM tiering.growth_ledger"
            " WHERE member_id = $1 ORDER BY ref",
            member,
        )
    ]
    out["history"] = [
        plain(r)
        for r in await conn.fetch(
            "SELECT from_tier, to_tier, reason, figures FROM tiering.tier_history"
            " WHERE member_id = $1 ORDER BY from_tier, to_tier, reason",
            member,
        )
    ]
    changed = []
    for r in await conn.fetch(
        "SELECT envelope FROM tiering.outbox WHERE event_type = $1"
        " AND position($2::bytea IN envelope) > 0",
        events_pb2.TierChanged.DESCRIPTOR.full_name,
        str(member).encode(),
    ):
        envelope = events_pb2.EventEnvelope.FromString(r["envelope"])
        if envelope.member_id == str(member):
            payload = events_pb2.TierChanged()
            envelope.payload.Unpack(payload)
            payload.ClearField("member_id")
            payload.ClearField("programme_id")
            changed.append(payload.SerializeToString(deterministic=True))
    out["tier_changed"] = sorted(changed)
    return out


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# One order id under two members in one run: the first counts, the second
# is "already counted" and evaluates nobody (the batch once evaluated both).
@example(
    orders=[(0, 1, 40_000, 7, ""), (1, 2, 40_000, 7, "")],
    sizes=[2],
    metric=QualifyingMetric.PAID_SPEND,
)
@given(
    orders=st.lists(order, min_size=1, max_size=14),
    sizes=st.lists(st.integers(1, 6), max_size=6),
    metric=st.sampled_from([QualifyingMetric.PAID_SPEND, QualifyingMetric.GROWTH_VALUE]),
)
async def test_orders_many_per_read_equal_one_per_read(
    db: Database,
    orders: list[tuple[int | None, int, int, int, str]],
    sizes: list[int],
    metric: QualifyingMetric,
) -> None:
    end = T0 + timedelta(days=250)
    twins = []
    for _ in range(2):
        pid = f"obat-{uuid.uuid4().hex[:10]}"
        async with db.unit_of_work() as uow:
            await repo.insert_programme(uow.conn, programme(pid, metric))
        members = [uuid.uuid4() for _ in range(MEMBERS)]
        tag = uuid.uuid4().hex[:8]
        events = [
            received(members[m] if m is not None else None, hours, paid, f"{tag}-o{number}", store)
            for m, hours, paid, number, store in orders
        ]
        handlers = TieringHandlers(lambda: end, programme_id=pid)
        twins.append((members, events, handlers))

    (one_members, one_events, one), (many_members, many_events, many) = twins
    for e in one_events:
        async with db.unit_of_work() as uow:
            await one.on_order_completed(uow, e)
    for read in reads_of(many_events, sizes):
        async with db.unit_of_work() as uow:
            for run in read:
                if len(run) > 1:
                    await many.on_orders_completed(uow, run)
                else:
                    await many.on_order_completed(uow, run[0])

    for a, b in zip(one_members, many_members, strict=True):
        assert await snapshot(db, a) == await snapshot(db, b)


async def test_a_batch_naming_a_member_twice_is_refused(db: Database) -> None:
    """The consumer never hands a run with one member twice; a caller that did
    would count the member's spend wrongly, so it raises (the read is then
    applied event by event)."""
    handlers = TieringHandlers(lambda: T0)
    member = uuid.uuid4()
    events = [received(member, h, 1_000, f"twice-{uuid.uuid4().hex}", "") for h in (1, 2)]
    with pytest.raises(ValueError, match="names a member twice"):
        async with db.unit_of_work() as uow:
            await handlers.on_orders_completed(uow, events)
