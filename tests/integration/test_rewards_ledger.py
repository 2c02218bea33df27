"""The points ledger against real PostgreSQL: lots and expiry, redemption with
idempotency, holds, refunds, adjustments, merges; the concurrency proofs of
issue 4; the audit after every scenario.

Use cases are called directly (each call is one unit of work, as the servicer
does) with an explicit clock, so expiry and pending windows are tested
without waiting.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from loyalty.events.v1 import events_pb2
from servicekit.db import Database
from servicekit.errors import Conflict, DomainError, FailedPrecondition, InvalidArgument, NotFound
from services.rewards.kernel import Channel, OrderRequest
from services.rewards.orders.handlers import RewardsHandlers
from services.rewards.points.audit import audit_ledger
from services.rewards.points.domain import ExpiryKind, ExpiryPolicy, LedgerPolicy, ShortfallPolicy
from services.rewards.points.handlers import PointsLedger
from services.rewards.points.jobs import announce_expiring, expire_due, void_timed_out_holds

T0 = datetime(2025, 3, 1, 4, 0, tzinfo=UTC)
DAYS30 = LedgerPolicy(expiry=ExpiryPolicy(ExpiryKind.DAYS, 30))


DB_POOL_MAX = 16


class Ledger:
    """One policy's ledger, with one unit of work per call, like the servicer."""

    def __init__(self, db: Database, policy: LedgerPolicy = DAYS30) -> None:
        self.db = db
        self.points = PointsLedger(policy)
        self.handlers = RewardsHandlers(points=self.points)

    async def earn(
        self,
        member: str,
        paid_fen: int,
        at: datetime,
        *,
        redeem: int = 0,
        txn: str | None = None,
        now: datetime | None = None,
    ) -> Any:
        settlement = self.handlers.prepare_order(
            OrderRequest(
                store_id="SH001",
                pos_transaction_id=txn or f"L-{uuid.uuid4().hex[:16]}",
                member_id=member,
                channel=Channel.STORE,
                paid_amount_fen=paid_fen,
                ordered_at=at,
                points_to_redeem=redeem,
            )
        )
        async with self.db.unit_of_work() as uow:
            outcome = await self.handlers.complete_order(uow, settlement, now or at)
        return outcome.unwrap()

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        async with self.db.unit_of_work() as uow:
            outcome = await getattr(self.points, name)(uow, *args, **kwargs)
        return outcome.unwrap() if hasattr(outcome, "unwrap") else outcome


def new_member() -> str:
    return str(uuid.uuid4())


async def balance(conn: asyncpg.Connection, member: str) -> dict[str, int]:
    row = await conn.fetchrow(
        "SELECT available, pending, held, debt FROM rewards.points_balances WHERE member_id = $1",
        uuid.UUID(member),
    )
    return dict(row) if row else {"available": 0, "pending": 0, "held": 0, "debt": 0}


async def assert_audit(conn: asyncpg.Connection, *members: str) -> None:
    report = await audit_ledger(conn, list(members))
    assert report.ok, report


async def test_spends_soonest_expiring_lots_first_and_expires_lazily(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, member = Ledger(db), new_member()
    # Earned later but lapsing sooner must be spent first: a longer policy for the first.
    long_ledger = Ledger(db, LedgerPolicy(expiry=ExpiryPolicy(ExpiryKind.DAYS, 365)))
    await long_ledger.earn(member, 5_000, T0)  # 50 pts, lapses in a year
    await ledger.earn(member, 10_000, T0 + timedelta(days=1))  # 100 pts, lapses day 31
    spent = await ledger.call("redeem", member, 120, "k-" + member, "", T0 + timedelta(days=2))
    assert spent.available == 30
    soon = await conn.fetchval(
        "SELECT id FROM rewards.points_lots WHERE member_id = $1 AND points = 100",
        uuid.UUID(member),
    )
    assert spent.lots[0] == (str(soon), 100) and spent.lots[1][1] == 20
    # After day 31 nothing lapses (that lot is empty); earn another and let it lapse.
    await ledger.earn(member, 4_000, T0 + timedelta(days=3))  # 40 pts, lapses day 33
    later = T0 + timedelta(days=34)
    with pytest.raises(FailedPrecondition) as caught:
        await ledger.call("redeem", member, 31, "k2-" + member, "", later)
    assert caught.value.code == "INSUFFICIENT_POINTS"
    # The refusal's transaction still committed the lazy expiry of the 40.
    assert (await balance(conn, member))["available"] == 30
    kinds = await conn.fetch(
        "SELECT kind, amount FROM rewards.points_transactions WHERE member_id = $1 ORDER BY seq",
        uuid.UUID(member),
    )
    assert [(r["kind"], r["amount"]) for r in kinds] == [
        ("earn", 50),
        ("earn", 100),
        ("redeem", 120),
        ("earn", 40),
        ("expire", 40),
    ]
    await assert_audit(conn, member)


async def test_expiry_job_and_expiring_soon_events(db: Database, conn: asyncpg.Connection) -> None:
    ledger, member = Ledger(db), new_member()
    await ledger.earn(member, 3_000, T0)
    # 30 pts lapse at T0+30d: announced within 30 days ahead, once.
    announce_at = T0 + timedelta(days=5)
    before = await conn.fetchval(
        "SELECT count(*) FROM rewards.outbox WHERE event_type = $1",
        "loyalty.events.v1.PointsExpiringSoon",
    )
    assert await announce_expiring(db, ledger.points, announce_at) >= 1
    assert await announce_expiring(db, ledger.points, announce_at) == 0
    rows = await conn.fetch(
        "SELECT envelope FROM rewards.outbox WHERE event_type = $1 ORDER BY id OFFSET $2",
        "loyalty.events.v1.PointsExpiringSoon",
        before,
    )
    mine = []
    for row in rows:
        envelope = events_pb2.EventEnvelope()
        envelope.ParseFromString(row["envelope"])
        event = events_pb2.PointsExpiringSoon()
        envelope.payload.Unpack(event)
        if event.member_id == member:
            mine.append(event)
    assert len(mine) == 1 and mine[0].points == 30
    assert mine[0].expires_at.ToDatetime(tzinfo=UTC) == T0 + timedelta(days=30)
    # The member's balance then, for engagement's `{points_balance}`.
    assert mine[0].points_balance == (await balance(conn, member))["available"] == 30
    # The job expires it; running it again changes nothing.
    assert await expire_due(db, ledger.points, T0 + timedelta(days=31)) >= 1
    await expire_due(db, ledger.points, T0 + timedelta(days=31))
    assert (await balance(conn, member))["available"] == 0
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM rewards.points_transactions WHERE member_id = $1 AND kind = 'expire'",
            uuid.UUID(member),
        )
        == 1
    )
    await assert_audit(conn, member)


async def test_redemption_is_idempotent_and_stores_refusals(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, member = Ledger(db), new_member()
    now = T0 + timedelta(days=1)
    await ledger.earn(member, 5_000, T0)
    first = await ledger.call("redeem", member, 20, "r1-" + member, "mall-1", now)
    again = await ledger.call("redeem", member, 20, "r1-" + member, "mall-1", now)
    assert again.replayed and again.transaction_id == first.transaction_id
    with pytest.raises(Conflict) as caught:
        await ledger.call("redeem", member, 21, "r1-" + member, "mall-1", now)
    assert (caught.value.code, caught.value.field) == ("IDEMPOTENCY_KEY_REUSED", "idempotency_key")
    # A refusal is stored: the same request is refused again even once affordable.
    with pytest.raises(FailedPrecondition):
        await ledger.call("redeem", member, 100, "r2-" + member, "", now)
    await ledger.earn(member, 20_000, T0)
    with pytest.raises(FailedPrecondition) as refused:
        await ledger.call("redeem", member, 100, "r2-" + member, "", now)
    assert refused.value.code == "INSUFFICIENT_POINTS"
    assert (await balance(conn, member))["available"] == 230
    await assert_audit(conn, member)


@pytest.mark.parametrize(
    ("points", "member", "key", "code", "field"),
    [
        (0, None, "k", "INVALID_POINTS", "points"),
        (-5, None, "k", "INVALID_POINTS", "points"),
        (10**12, None, "k", "POINTS_TOO_LARGE", "points"),
        (5, "not-a-uuid", "k", "INVALID_MEMBER_ID", "member_id"),
        (5, None, "", "IDEMPOTENCY_KEY_REQUIRED", "idempotency_key"),
    ],
)
async def test_bad_redemptions_write_nothing(
    db: Database,
    conn: asyncpg.Connection,
    points: int,
    member: str | None,
    key: str,
    code: str,
    field: str,
) -> None:
    count = await conn.fetchval("SELECT count(*) FROM rewards.ledger_requests")
    with pytest.raises(InvalidArgument) as caught:
        await Ledger(db).call("redeem", member or new_member(), points, key, "", T0)
    assert (caught.value.code, caught.value.field) == (code, field)
    assert await conn.fetchval("SELECT count(*) FROM rewards.ledger_requests") == count


@pytest.mark.parametrize(
    ("operation", "args"),
    [
        ("redeem", (5, "u-key", "", T0)),
        ("hold", (5, "u-key", "", T0)),
        ("adjust", (-5, "ops-1", "goodwill reversal", "u-key", T0)),
    ],
)
async def test_a_member_who_never_earned_has_nothing_to_spend(
    db: Database, conn: asyncpg.Connection, operation: str, args: tuple[Any, ...]
) -> None:
    # Rewards cannot tell a member who never earned from no member at all (member
    # says who exists): a spend or debit is the insufficient-balance refusal, not
    # 404 UNKNOWN_MEMBER for a member who exists.
    member = new_member()
    with pytest.raises(FailedPrecondition) as caught:
        await Ledger(db).call(operation, member, *args)
    assert (caught.value.code, caught.value.field) == ("INSUFFICIENT_POINTS", "points")
    assert await balance(conn, member) == {"available": 0, "pending": 0, "held": 0, "debt": 0}


async def run_concurrently(n: int, make: Any) -> list[Any]:
    return await asyncio.gather(*(make(i) for i in range(n)), return_exceptions=True)


async def test_32_clients_one_key_make_one_transaction(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, member = Ledger(db), new_member()
    await ledger.earn(member, 10_000, T0)
    key = "same-" + member
    results = await run_concurrently(
        32, lambda _: ledger.call("redeem", member, 7, key, "", T0 + timedelta(hours=1))
    )
    assert all(not isinstance(r, BaseException) for r in results), results
    assert len({r.transaction_id for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    assert (await balance(conn, member))["available"] == 93
    await assert_audit(conn, member)


async def test_32_concurrent_redemptions_spend_exactly_the_balance(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, member = Ledger(db), new_member()
    await ledger.earn(member, 6_000, T0)
    await ledger.earn(member, 4_000, T0 + timedelta(hours=1))  # 100 points in two lots
    results = await run_concurrently(
        32,
        lambda i: ledger.call("redeem", member, 5, f"c{i}-{member}", "", T0 + timedelta(hours=2)),
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(ok) == 20 and all(
        isinstance(r, FailedPrecondition) and r.code == "INSUFFICIENT_POINTS" for r in refused
    )
    assert (await balance(conn, member))["available"] == 0
    await assert_audit(conn, member)


async def test_redemptions_racing_the_expiry_job_never_spend_an_expired_lot(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger = Ledger(db)
    members = [new_member() for _ in range(4)]
    for m in members:
        await ledger.earn(m, 10_000, T0)  # 100 points lapsing at T0+30d
    lapse = T0 + timedelta(days=30)
    # Redemptions before the instant and after it, and the job after it, all at once.
    tasks = []
    for i in range(32):
        m = members[i % 4]
        at = lapse - timedelta(seconds=1) if i % 2 else lapse + timedelta(seconds=1)
        tasks.append(ledger.call("redeem", m, 10, f"x{i}-{m}", "", at))
    tasks.append(expire_due(db, ledger.points, lapse + timedelta(seconds=1)))
    tasks.append(expire_due(db, ledger.points, lapse))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for i, r in enumerate(results[:32]):
        if i % 2 == 0:  # after the lapse: never served
            assert isinstance(r, FailedPrecondition), r
    for m in members:
        rows = await conn.fetch(
            "SELECT kind, sum(amount)::bigint AS n FROM rewards.points_transactions"
            " WHERE member_id = $1 GROUP BY kind",
            uuid.UUID(m),
        )
        by_kind = {r["kind"]: r["n"] for r in rows}
        # Whatever was spent before the lapse is never expired, and the rest is.
        assert by_kind.get("redeem", 0) + by_kind.get("expire", 0) == 100
        assert (await balance(conn, m))["available"] == 0
    await assert_audit(conn, *members)


async def test_refunds_reverse_proportionally_out_of_the_order_lot(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, member = Ledger(db), new_member()
    order = await ledger.earn(member, 9_900, T0, txn=f"R-{member[:8]}")  # 99 points
    other = await ledger.earn(member, 5_000, T0)  # 50 points, another lot
    txn = f"R-{member[:8]}"
    now = T0 + timedelta(days=1)
    first = await ledger.call("refund_order", "SH001", txn, txn + "-1", 3_300, now)
    assert (first.points_due, first.points_reversed, first.points_debt) == (33, 33, 0)
    second = await ledger.call("refund_order", "SH001", txn, txn + "-2", 3_300, now)
    assert second.points_due == 33
    with pytest.raises(InvalidArgument) as caught:
        await ledger.call("refund_order", "SH001", txn, txn + "-3", 3_301, now)
    assert (caught.value.code, caught.value.field) == (
        "REFUND_EXCEEDS_ORDER",
        "refunded_amount_fen",
    )
    last = await ledger.call("refund_order", "SH001", txn, txn + "-4", 3_300, now)
    # At most the original in total; the other order's lot is untouched.
    assert last.points_due == 33 and last.available == other.points_earned
    assert order.points_earned == 99
    with pytest.raises(NotFound) as unknown:
        await ledger.call("refund_order", "SH001", "no-such-order", txn + "-5", 100, now)
    assert unknown.value.code == "UNKNOWN_ORDER"
    replay = await ledger.call("refund_order", "SH001", txn, txn + "-1", 3_300, now)
    assert replay.replayed and replay.refund_id == first.refund_id
    await assert_audit(conn, member)


@pytest.mark.parametrize("policy", [ShortfallPolicy.DEBT, ShortfallPolicy.REPORT])
async def test_refund_of_spent_points_follows_the_shortfall_policy(
    db: Database, conn: asyncpg.Connection, policy: ShortfallPolicy
) -> None:
    ledger = Ledger(db, LedgerPolicy(expiry=DAYS30.expiry, shortfall=policy))
    member = new_member()
    txn = f"S-{uuid.uuid4().hex[:12]}"
    await ledger.earn(member, 10_000, T0, txn=txn)  # 100
    now = T0 + timedelta(days=1)
    await ledger.call("redeem", member, 80, "s-" + member, "", now)
    refund = await ledger.call("refund_order", "SH001", txn, txn + "-r", 10_000, now)
    assert (refund.points_due, refund.points_reversed) == (100, 20)
    if policy is ShortfallPolicy.DEBT:
        assert (refund.points_debt, refund.points_shortfall) == (80, 0)
        assert await balance(conn, member) == {"available": 0, "pending": 0, "held": 0, "debt": 80}
        # A later earn repays the debt first.
        later = await ledger.earn(member, 10_000, T0 + timedelta(days=2))
        assert later.points_balance == 20
        assert (await balance(conn, member))["debt"] == 0
    else:
        assert (refund.points_debt, refund.points_shortfall) == (0, 80)
        assert (await balance(conn, member))["debt"] == 0
    await assert_audit(conn, member)


async def test_a_refund_retried_concurrently_reverses_once(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, member = Ledger(db), new_member()
    txn = f"C-{uuid.uuid4().hex[:12]}"
    await ledger.earn(member, 10_000, T0, txn=txn)
    results = await run_concurrently(
        16, lambda _: ledger.call("refund_order", "SH001", txn, txn + "-c", 5_000, T0)
    )
    assert all(not isinstance(r, BaseException) for r in results), results
    assert len({r.refund_id for r in results}) == 1
    assert (await balance(conn, member))["available"] == 50
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM rewards.points_transactions WHERE member_id = $1 AND kind = 'refund'",
            uuid.UUID(member),
        )
        == 1
    )
    await assert_audit(conn, member)


async def test_holds_resolve_exactly_once_and_voids_keep_expiry(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, member = Ledger(db), new_member()
    await ledger.earn(member, 10_000, T0)
    now = T0 + timedelta(days=1)
    held = await ledger.call("hold", member, 40, "h1-" + member, "", now)
    assert (held.hold_status, held.available) == ("held", 60)
    assert (await balance(conn, member))["held"] == 40
    posted = await ledger.call("post_hold", held.hold_id, now)
    assert posted.hold_status == "posted"
    again = await ledger.call("post_hold", held.hold_id, now)
    assert again.replayed and again.transaction_id == posted.transaction_id
    with pytest.raises(FailedPrecondition) as caught:
        await ledger.call("void_hold", held.hold_id, now)
    assert caught.value.code == "HOLD_POSTED"

    second = await ledger.call("hold", member, 30, "h2-" + member, "", now)
    lot_before = await conn.fetchrow(
        "SELECT remaining, expires_at FROM rewards.points_lots WHERE id = $1",
        uuid.UUID(second.lots[0][0]),
    )
    voided = await ledger.call("void_hold", second.hold_id, now)
    assert voided.available == 60
    lot_after = await conn.fetchrow(
        "SELECT remaining, expires_at FROM rewards.points_lots WHERE id = $1",
        uuid.UUID(second.lots[0][0]),
    )
    assert lot_after["remaining"] == lot_before["remaining"] + 30
    assert lot_after["expires_at"] == lot_before["expires_at"]
    with pytest.raises(FailedPrecondition) as caught:
        await ledger.call("post_hold", second.hold_id, now)
    assert caught.value.code == "HOLD_VOIDED"

    # Concurrent post and void: exactly one wins.
    third = await ledger.call("hold", member, 10, "h3-" + member, "", now)
    results = await asyncio.gather(
        ledger.call("post_hold", third.hold_id, now),
        ledger.call("void_hold", third.hold_id, now),
        return_exceptions=True,
    )
    assert sum(isinstance(r, DomainError) for r in results) == 1
    # A hold past its time-out is voided by the job, once.
    fourth = await ledger.call("hold", member, 5, "h4-" + member, "", now)
    later = now + timedelta(hours=1)
    assert await void_timed_out_holds(db, ledger.points, later) >= 1
    # The job itself expired it (a post past the time-out would also say HOLD_EXPIRED).
    assert (
        await conn.fetchval(
            "SELECT status FROM rewards.points_holds WHERE id = $1", uuid.UUID(fourth.hold_id)
        )
        == "expired"
    )
    with pytest.raises(FailedPrecondition) as caught:
        await ledger.call("post_hold", fourth.hold_id, later)
    assert caught.value.code == "HOLD_EXPIRED"
    assert (await balance(conn, member))["held"] == 0
    await assert_audit(conn, member)


async def test_voided_points_of_a_lapsed_lot_lapse_again(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, member = Ledger(db), new_member()
    await ledger.earn(member, 10_000, T0)
    held = await ledger.call("hold", member, 60, "hv-" + member, "", T0 + timedelta(days=29))
    after = T0 + timedelta(days=31)
    await expire_due(db, ledger.points, after)  # the other 40 lapse
    voided = await ledger.call("void_hold", held.hold_id, after)
    assert voided.available == 0  # the 60 came back to a lapsed lot, and lapsed
    await assert_audit(conn, member)


async def test_manual_adjustments_name_operator_and_reason(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, member = Ledger(db), new_member()
    credit = await ledger.call(
        "adjust", member, 25, "op-7", "compensation #881", "a1-" + member, T0
    )
    assert credit.available == 25
    debit = await ledger.call("adjust", member, -5, "op-7", "duplicate credit", "a2-" + member, T0)
    assert debit.available == 20
    row = await conn.fetchrow(
        "SELECT operator_id, reason FROM rewards.points_transactions WHERE id = $1",
        uuid.UUID(debit.transaction_id),
    )
    assert (row["operator_id"], row["reason"]) == ("op-7", "duplicate credit")
    with pytest.raises(InvalidArgument) as caught:
        await ledger.call("adjust", member, 5, "op-7", "", "a3-" + member, T0)
    assert caught.value.field == "reason"
    with pytest.raises(FailedPrecondition):
        await ledger.call("adjust", member, -50, "op-7", "too much", "a4-" + member, T0)
    await assert_audit(conn, member)


async def test_pending_points_activate_after_the_window(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger = Ledger(db, LedgerPolicy(expiry=DAYS30.expiry, pending_days=7))
    member = new_member()
    order = await ledger.earn(member, 5_000, T0)
    assert order.points_balance == 0
    assert (await balance(conn, member))["pending"] == 50
    with pytest.raises(FailedPrecondition):
        await ledger.call("redeem", member, 10, "p1-" + member, "", T0 + timedelta(days=6))
    spent = await ledger.call("redeem", member, 10, "p2-" + member, "", T0 + timedelta(days=8))
    assert spent.available == 40
    assert (await balance(conn, member))["pending"] == 0
    await assert_audit(conn, member)


async def test_checkout_redeems_and_stores_its_refusal(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, member = Ledger(db), new_member()
    await ledger.earn(member, 10_000, T0)
    done = await ledger.earn(member, 2_000, T0 + timedelta(days=1), redeem=60)
    assert (done.points_redeemed, done.points_earned, done.points_balance) == (60, 20, 60)
    txn = f"N-{uuid.uuid4().hex[:12]}"
    with pytest.raises(FailedPrecondition) as caught:
        await ledger.earn(member, 2_000, T0 + timedelta(days=1), redeem=500, txn=txn)
    assert (caught.value.code, caught.value.field) == ("INSUFFICIENT_POINTS", "points_to_redeem")
    with pytest.raises(FailedPrecondition):
        await ledger.earn(member, 2_000, T0 + timedelta(days=1), redeem=500, txn=txn)
    assert (await balance(conn, member))["available"] == 60
    await assert_audit(conn, member)


async def test_refund_gives_back_redeemed_points_with_their_expiry(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, member = Ledger(db), new_member()
    await ledger.earn(member, 10_000, T0)  # 100, lapsing T0+30d
    txn = f"G-{uuid.uuid4().hex[:12]}"
    day = T0 + timedelta(days=1)
    await ledger.earn(member, 2_000, day, redeem=60, txn=txn)  # -60, +20
    half = await ledger.call("refund_order", "SH001", txn, txn + "-1", 1_000, day)
    assert (half.points_due, half.points_reversed, half.points_restored) == (10, 10, 30)
    assert half.available == 60 - 10 + 30
    rest = await ledger.call("refund_order", "SH001", txn, txn + "-2", 1_000, day)
    assert (rest.points_restored, rest.available) == (30, 100)
    restored = await conn.fetch(
        "SELECT l.expires_at, o.expires_at AS original FROM rewards.points_lots l"
        " JOIN rewards.points_lots o ON o.id = l.origin_lot_id WHERE l.member_id = $1",
        uuid.UUID(member),
    )
    assert len(restored) == 2 and all(r["expires_at"] == r["original"] for r in restored)
    await assert_audit(conn, member)


async def test_merge_and_unmerge_move_lots_once(db: Database, conn: asyncpg.Connection) -> None:
    ledger = Ledger(db)
    survivor, absorbed = new_member(), new_member()
    await ledger.earn(survivor, 1_000, T0)
    await ledger.earn(absorbed, 5_000, T0 + timedelta(days=2))
    merge_id = str(uuid.uuid4())
    now = T0 + timedelta(days=3)
    assert await ledger.call("merge", merge_id, survivor, absorbed, now) is True
    assert await ledger.call("merge", merge_id, survivor, absorbed, now) is False
    assert (await balance(conn, survivor))["available"] == 60
    assert (await balance(conn, absorbed))["available"] == 0
    moved = await conn.fetchrow(
        "SELECT origin_lot_id, expires_at FROM rewards.points_lots"
        " WHERE member_id = $1 AND origin_lot_id IS NOT NULL",
        uuid.UUID(survivor),
    )
    original = await conn.fetchrow(
        "SELECT expires_at FROM rewards.points_lots WHERE id = $1", moved["origin_lot_id"]
    )
    assert moved["expires_at"] == original["expires_at"]
    await assert_audit(conn, survivor, absorbed)
    # The survivor spends some; unmerge moves back what is left of the moved lot.
    await ledger.call("redeem", survivor, 15, "m-" + survivor, "", now)
    assert await ledger.call("unmerge", merge_id, survivor, absorbed, now) is True
    assert await ledger.call("unmerge", merge_id, survivor, absorbed, now) is False
    assert (await balance(conn, absorbed))["available"] == 45
    assert (await balance(conn, survivor))["available"] == 0
    await assert_audit(conn, survivor, absorbed)


async def test_audit_catches_a_lot_that_disagrees(db: Database, conn: asyncpg.Connection) -> None:
    ledger, member = Ledger(db), new_member()
    await ledger.earn(member, 1_000, T0)
    async with conn.transaction():
        await conn.execute(
            "UPDATE rewards.points_lots SET remaining = remaining - 1 WHERE member_id = $1",
            uuid.UUID(member),
        )
        report = await audit_ledger(conn, [member])
        assert report.lot_mismatches and report.balance_mismatches
        # Leave the data as it was.
        await conn.execute(
            "UPDATE rewards.points_lots SET remaining = remaining + 1 WHERE member_id = $1",
            uuid.UUID(member),
        )
    await assert_audit(conn, member)
