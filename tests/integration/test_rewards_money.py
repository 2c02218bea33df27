"""The money corners of issue 13 against real PostgreSQL: refunds against open
holds (both shortfall policies), a refund that arrives before its order, orders
paid entirely with points, idempotency hashes over every field, the journal's
balance enforced by the database, and the debt policy.

Use cases are called directly, one unit of work per call (as the servicer
does), on a fixed clock; the module ends with the ledger audit.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from loyalty.events.v1 import events_pb2
from servicekit.db import Database
from servicekit.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound
from servicekit.events import ReceivedEvent, make_envelope
from servicekit.protos import timestamp
from services.rewards import members
from services.rewards.consumers import MemberEvents
from services.rewards.coupons import handlers as coupons
from services.rewards.coupons import repository as crepo
from services.rewards.coupons.domain import Kind, Limits, Status, Terms
from services.rewards.kernel import Channel, OrderRequest
from services.rewards.members import MemberState
from services.rewards.orders import repository as orepo
from services.rewards.orders.handlers import RewardsHandlers
from services.rewards.points.audit import audit_ledger
from services.rewards.points.domain import ExpiryKind, ExpiryPolicy, LedgerPolicy, ShortfallPolicy
from services.rewards.points.earning import EarningRules
from services.rewards.points.handlers import PointsLedger

T0 = datetime(2025, 5, 1, 4, 0, tzinfo=UTC)
EXPIRY = ExpiryPolicy(ExpiryKind.DAYS, 30)


class Ledger:
    def __init__(self, db: Database, shortfall: ShortfallPolicy = ShortfallPolicy.DEBT) -> None:
        self.db = db
        self.points = PointsLedger(LedgerPolicy(expiry=EXPIRY, shortfall=shortfall))
        self.handlers = RewardsHandlers(points=self.points)

    async def earn(
        self, member: str, paid_fen: int, at: datetime, *, txn: str, redeem: int = 0
    ) -> Any:
        settlement = self.handlers.prepare_order(
            OrderRequest(
                store_id="SH001",
                pos_transaction_id=txn,
                member_id=member,
                channel=Channel.STORE,
                paid_amount_fen=paid_fen,
                ordered_at=at,
                points_to_redeem=redeem,
            )
        )
        async with self.db.unit_of_work() as uow:
            outcome = await self.handlers.complete_order(uow, settlement, at)
        return outcome.unwrap()

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        async with self.db.unit_of_work() as uow:
            outcome = await getattr(self.points, name)(uow, *args, **kwargs)
        return outcome.unwrap() if hasattr(outcome, "unwrap") else outcome

    async def refund(self, txn: str, refund_txn: str, fen: int, now: datetime) -> Any:
        async with self.db.unit_of_work() as uow:
            outcome, coupons = await self.handlers.refund_order(
                uow, "SH001", txn, refund_txn, fen, now
            )
        return outcome.unwrap(), coupons


MEMBERS: list[str] = []


def new_member() -> str:
    member = str(uuid.uuid4())
    MEMBERS.append(member)
    return member


def new_txn() -> str:
    return f"M-{uuid.uuid4().hex[:16]}"


async def balance(conn: asyncpg.Connection, member: str) -> dict[str, int]:
    row = await conn.fetchrow(
        "SELECT available, pending, held, debt FROM rewards.points_balances WHERE member_id = $1",
        uuid.UUID(member),
    )
    return dict(row) if row else {"available": 0, "pending": 0, "held": 0, "debt": 0}


@pytest.fixture(scope="module", autouse=True)
async def audited(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """The ledger audit over every member this module wrote, once it is done."""
    yield
    report = await audit_ledger(conn, MEMBERS)
    assert report.ok, report


# ---- item 5: a refund before its order ------------------------------------------


async def test_a_refund_before_its_order_applies_once_the_order_lands(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, member, txn = Ledger(db), new_member(), new_txn()
    with pytest.raises(NotFound) as early:
        await ledger.refund(txn, txn + "-r", 5_000, T0)
    assert (early.value.code, early.value.field) == ("UNKNOWN_ORDER", "pos_transaction_id")
    # The refusal is not kept under the refund's key.
    assert not await conn.fetchval(
        "SELECT count(*) FROM rewards.ledger_requests WHERE idempotency_key = $1",
        f"refund:SH001:{txn}-r",
    )
    await ledger.earn(member, 10_000, T0, txn=txn)
    refund, _ = await ledger.refund(txn, txn + "-r", 5_000, T0 + timedelta(hours=1))
    assert (refund.points_due, refund.points_reversed, refund.replayed) == (50, 50, False)
    again, _ = await ledger.refund(txn, txn + "-r", 5_000, T0 + timedelta(hours=2))
    assert again.replayed and again.refund_id == refund.refund_id
    assert (await balance(conn, member))["available"] == 50


# ---- item 6: orders paid entirely with points -----------------------------------


async def test_an_order_paid_entirely_with_points_is_refundable_once(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, member = Ledger(db), new_member()
    await ledger.earn(member, 10_000, T0, txn=new_txn())  # 100 points
    free = new_txn()
    await ledger.earn(member, 0, T0 + timedelta(hours=1), txn=free, redeem=60)
    assert (await balance(conn, member))["available"] == 40
    now = T0 + timedelta(days=1)
    refund, coupons = await ledger.refund(free, free + "-r", 0, now)
    assert (refund.points_restored, refund.refunded_amount_fen) == (60, 0)
    assert coupons == []
    assert (await balance(conn, member))["available"] == 100
    # Once, in full: a second refund of it is refused, and stored.
    with pytest.raises(InvalidArgument) as twice:
        await ledger.refund(free, free + "-r2", 0, now)
    assert twice.value.code == "REFUND_EXCEEDS_ORDER"
    # A zero refund of a paid order is still bad input, writing nothing.
    paid = new_txn()
    await ledger.earn(member, 5_000, T0, txn=paid)
    with pytest.raises(InvalidArgument) as zero:
        await ledger.refund(paid, paid + "-r", 0, now)
    assert (zero.value.code, zero.value.field) == ("INVALID_AMOUNT", "refunded_amount_fen")
    assert not await conn.fetchval(
        "SELECT count(*) FROM rewards.refunds r JOIN rewards.orders o ON o.id = r.order_id"
        " WHERE o.pos_transaction_id = $1",
        paid,
    )


# ---- item 1: a refund against points an open hold has -----------------------------


@pytest.mark.parametrize("policy", [ShortfallPolicy.DEBT, ShortfallPolicy.REPORT])
async def test_a_void_after_the_refund_does_not_revive_the_refunded_points(
    db: Database, conn: asyncpg.Connection, policy: ShortfallPolicy
) -> None:
    ledger, member, txn = Ledger(db, policy), new_member(), new_txn()
    await ledger.earn(member, 10_000, T0, txn=txn)  # 100, all of it then held
    now = T0 + timedelta(hours=1)
    held = await ledger.call("hold", member, 100, "h-" + member, "", now)
    refund, _ = await ledger.refund(txn, txn + "-r", 10_000, now)
    assert (refund.points_due, refund.points_reversed) == (100, 0)
    voided = await ledger.call("void_hold", held.hold_id, now)
    # Nothing of a fully refunded order is left to spend, and nothing is owed.
    assert voided.available == 0
    assert await balance(conn, member) == {"available": 0, "pending": 0, "held": 0, "debt": 0}
    with pytest.raises(FailedPrecondition):
        await ledger.call("redeem", member, 1, "r-" + member, "", now)


@pytest.mark.parametrize("policy", [ShortfallPolicy.DEBT, ShortfallPolicy.REPORT])
async def test_a_post_after_the_refund_leaves_the_policy_s_debt_or_shortfall(
    db: Database, conn: asyncpg.Connection, policy: ShortfallPolicy
) -> None:
    ledger, member, txn = Ledger(db, policy), new_member(), new_txn()
    await ledger.earn(member, 10_000, T0, txn=txn)
    now = T0 + timedelta(hours=1)
    held = await ledger.call("hold", member, 30, "h-" + member, "", now)
    refund, _ = await ledger.refund(txn, txn + "-r", 10_000, now)
    assert refund.points_reversed == 70
    await ledger.call("post_hold", held.hold_id, now)
    owed = 30 if policy is ShortfallPolicy.DEBT else 0
    assert refund.points_debt == owed and refund.points_shortfall == 30 - owed
    assert await balance(conn, member) == {"available": 0, "pending": 0, "held": 0, "debt": owed}
    # The claim was settled by the post: a later hold and void of new points is plain.
    await ledger.earn(member, 5_000, now, txn=new_txn())
    again = await ledger.call("hold", member, 50 - owed, "h2-" + member, "", now)
    back = await ledger.call("void_hold", again.hold_id, now)
    assert back.available == 50 - owed


async def test_a_void_gives_back_only_what_the_refund_did_not_claim(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, member, refunded = Ledger(db), new_member(), new_txn()
    await ledger.earn(member, 10_000, T0, txn=refunded)  # 100, spent first
    await ledger.earn(member, 5_000, T0 + timedelta(hours=1), txn=new_txn())  # 50
    now = T0 + timedelta(hours=2)
    held = await ledger.call("hold", member, 120, "h-" + member, "", now)  # 100 + 20
    refund, _ = await ledger.refund(refunded, refunded + "-r", 10_000, now)
    assert (refund.points_reversed, refund.points_debt) == (0, 100)
    voided = await ledger.call("void_hold", held.hold_id, now)
    # The 100 repay the refund's debt; the other order's 20 come back.
    assert voided.available == 50
    assert await balance(conn, member) == {"available": 50, "pending": 0, "held": 0, "debt": 0}


# ---- item 30: the debt policy ---------------------------------------------------


async def test_a_member_who_owes_spends_only_beyond_the_debt_and_restores_repay_it(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, member = Ledger(db), new_member()
    first, second = new_txn(), new_txn()
    await ledger.earn(member, 10_000, T0, txn=first)  # 100
    await ledger.earn(member, 1_000, T0 + timedelta(hours=1), txn=second, redeem=60)  # +10, -60
    now = T0 + timedelta(days=1)
    await ledger.call("redeem", member, 30, "s-" + member, "", now)  # 20 left
    refund, _ = await ledger.refund(first, first + "-r", 10_000, now)
    assert (refund.points_reversed, refund.points_debt) == (10, 90)
    assert await balance(conn, member) == {"available": 10, "pending": 0, "held": 0, "debt": 90}
    # Owing 90 with 10 available: nothing to spend.
    with pytest.raises(FailedPrecondition) as owing:
        await ledger.call("redeem", member, 10, "o-" + member, "", now)
    assert owing.value.code == "INSUFFICIENT_POINTS" and "90 owed" in owing.value.message
    with pytest.raises(FailedPrecondition):
        await ledger.call("hold", member, 5, "oh-" + member, "", now)
    # The second order's 60 redeemed points come back into the debt first.
    back, _ = await ledger.refund(second, second + "-r", 1_000, now)
    assert (back.points_restored, back.points_due) == (60, 10)
    assert await balance(conn, member) == {"available": 0, "pending": 0, "held": 0, "debt": 30}


# ---- item 4: the journal balances, enforced by the database ---------------------


async def test_the_database_refuses_a_transaction_whose_entries_do_not_balance(
    conn: asyncpg.Connection,
) -> None:
    txn, member = uuid.uuid4(), uuid.uuid4()
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO rewards.points_transactions (id, member_id, kind, idempotency_key,"
                " amount, rule, operator_id, reason)"
                " VALUES ($1, $2, 'adjust', $3, 5, '{}', 'op', 'test')",
                txn,
                member,
                f"unbalanced:{txn}",
            )
            await conn.execute(
                "INSERT INTO rewards.points_entries (transaction_id, account, member_id, amount)"
                " VALUES ($1, 'member_wallet', $2, 5), ($1, 'adjustments', NULL, -4)",
                txn,
                member,
            )
    assert refused.value.constraint_name == "points_entries_balanced"
    assert not await conn.fetchval(
        "SELECT count(*) FROM rewards.points_transactions WHERE id = $1", txn
    )
    # Entries written by several statements of one transaction balance at commit.
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO rewards.points_transactions (id, member_id, kind, idempotency_key,"
            " amount, rule, operator_id, reason)"
            " VALUES ($1, $2, 'adjust', $3, 5, '{}', 'op', 'test')",
            txn,
            member,
            f"balanced:{txn}",
        )
        # (Brand accounts only, so no member's balance disagrees with the journal.)
        for account, amount in (("adjustments", -5), ("expired", 5)):
            await conn.execute(
                "INSERT INTO rewards.points_entries (transaction_id, account, member_id, amount)"
                " VALUES ($1, $2, NULL, $3)",
                txn,
                account,
                amount,
            )
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM rewards.points_entries WHERE transaction_id = $1", txn
        )
        == 2
    )


# ---- item 7: idempotency hashes cover every field ---------------------------------


async def assert_key_reused(call: Any) -> None:
    with pytest.raises(Conflict) as reused:
        await call
    assert reused.value.code == "IDEMPOTENCY_KEY_REUSED"


async def test_every_field_of_a_hold_is_in_its_idempotency_hash(db: Database) -> None:
    ledger, member, other = Ledger(db), new_member(), new_member()
    for m in (member, other):
        await ledger.earn(m, 10_000, T0, txn=new_txn())
    key, now = "hold-" + member, T0 + timedelta(hours=1)
    base: dict[str, Any] = {
        "member_id": member,
        "points": 10,
        "reference": "cart-1",
        "ttl": timedelta(minutes=5),
    }

    async def hold(**change: Any) -> Any:
        args = base | change
        return await ledger.call(
            "hold", args["member_id"], args["points"], key, args["reference"], now, args["ttl"]
        )

    first = await hold()
    assert (await hold()).hold_id == first.hold_id
    for field, value in {
        "member_id": other,
        "points": 11,
        "reference": "cart-2",
        "ttl": timedelta(minutes=6),
    }.items():
        await assert_key_reused(hold(**{field: value}))


async def test_every_field_of_a_redemption_adjustment_and_refund_is_hashed(db: Database) -> None:
    ledger, member, other = Ledger(db), new_member(), new_member()
    txn, txn2 = new_txn(), new_txn()
    await ledger.earn(member, 10_000, T0, txn=txn)
    await ledger.earn(member, 10_000, T0, txn=txn2)
    await ledger.earn(other, 10_000, T0, txn=new_txn())
    now = T0 + timedelta(hours=1)
    redeem = {"member_id": member, "points": 5, "reference": "r"}
    await ledger.call("redeem", member, 5, "rk-" + member, "r", now)
    for field, value in {"member_id": other, "points": 6, "reference": "s"}.items():
        args = redeem | {field: value}
        await assert_key_reused(
            ledger.call(
                "redeem", args["member_id"], args["points"], "rk-" + member, args["reference"], now
            )
        )
    adjust = {"member_id": member, "points": 5, "operator": "op-1", "reason": "goodwill"}
    await ledger.call("adjust", *adjust.values(), "ak-" + member, now)
    for field, value in {
        "member_id": other,
        "points": -5,
        "operator": "op-2",
        "reason": "other",
    }.items():
        args = list((adjust | {field: value}).values())
        await assert_key_reused(ledger.call("adjust", *args, "ak-" + member, now))
    await ledger.refund(txn, txn + "-r", 1_000, now)
    await assert_key_reused(ledger.refund(txn, txn + "-r", 1_001, now))
    await assert_key_reused(ledger.refund(txn2, txn + "-r", 1_000, now))


async def test_every_field_of_a_coupon_issue_is_in_its_idempotency_hash(db: Database) -> None:
    template, other_template = f"T-{uuid.uuid4().hex[:10]}", f"T-{uuid.uuid4().hex[:10]}"
    terms = Terms(
        name="满99减30", kind=Kind.AMOUNT_OFF, threshold_fen=9900, discount_fen=3000, valid_days=30
    )
    async with db.unit_of_work() as uow:
        for t in (template, other_template):
            await coupons.create_template(uow.conn, t, terms, Limits(), Status.ACTIVE, "test")
    member, key = uuid.uuid4(), f"issue-{uuid.uuid4().hex}"
    base: dict[str, Any] = {
        "template_id": template,
        "member_id": member,
        "reason": "operator_grant",
        "issued_by": "op-1",
    }

    async def issue(**change: Any) -> Any:
        async with db.unit_of_work() as uow:
            return await coupons.issue_coupon(uow.conn, issue_key=key, now=T0, **(base | change))

    first = await issue()
    assert (await issue()).coupon_id == first.coupon_id
    for field, value in {
        "template_id": other_template,
        "member_id": uuid.uuid4(),
        "reason": "journey",
        "issued_by": "op-2",
    }.items():
        await assert_key_reused(issue(**{field: value}))


# ---- item 8: merges, chains and the holds an unmerge touches ----------------------


def clock() -> datetime:
    return T0 + timedelta(hours=3)


async def merge(db: Database, survivor: str, absorbed: str) -> str:
    merge_id = str(uuid.uuid4())
    payload = events_pb2.MemberMerged(
        merge_id=merge_id,
        survivor_member_id=survivor,
        absorbed_member_id=absorbed,
        merged_at=timestamp(T0),
    )
    event = ReceivedEvent("test", "1-0", make_envelope("member", payload, survivor), payload)
    async with db.unit_of_work() as uow:
        await MemberEvents(PointsLedger(LedgerPolicy(expiry=EXPIRY)), clock).on_merged(uow, event)
    return merge_id


async def unmerge(db: Database, merge_id: str, survivor: str, restored: str) -> None:
    payload = events_pb2.MemberUnmerged(
        merge_id=merge_id,
        survivor_member_id=survivor,
        restored_member_id=restored,
        unmerged_at=timestamp(T0 + timedelta(hours=1)),
    )
    event = ReceivedEvent("test", "2-0", make_envelope("member", payload, survivor), payload)
    async with db.unit_of_work() as uow:
        await MemberEvents(PointsLedger(LedgerPolicy(expiry=EXPIRY)), clock).on_unmerged(uow, event)


async def coupon_holders(conn: asyncpg.Connection, *owners: str) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT issued_to, member_id FROM rewards.coupons WHERE issued_to = ANY($1::uuid[])",
        [uuid.UUID(m) for m in owners],
    )
    return {str(r["issued_to"]): str(r["member_id"]) for r in rows}


async def test_coupon_unmerge_follows_a_chain_of_merges(
    db: Database, conn: asyncpg.Connection
) -> None:
    template = f"T-{uuid.uuid4().hex[:10]}"
    terms = Terms(
        name="赠饮", kind=Kind.AMOUNT_OFF, threshold_fen=0, discount_fen=1000, valid_days=30
    )
    async with db.unit_of_work() as uow:
        await coupons.create_template(uow.conn, template, terms, Limits(), Status.ACTIVE, "test")
    a, b, c = new_member(), new_member(), new_member()
    for m in (a, b, c):
        async with db.unit_of_work() as uow:
            await coupons.issue_coupon(
                uow.conn,
                template_id=template,
                member_id=uuid.UUID(m),
                reason="operator_grant",
                issue_key=f"chain-{m}",
                now=T0,
            )
    first = await merge(db, b, a)  # a -> b
    second = await merge(db, c, b)  # b (holding a's) -> c
    assert await coupon_holders(conn, a, b, c) == {a: c, b: c, c: c}
    # Undo the second: b's person (b and a, still merged into b) gets its coupons back.
    await unmerge(db, second, c, b)
    assert await coupon_holders(conn, a, b, c) == {a: b, b: b, c: c}
    await unmerge(db, first, b, a)
    assert await coupon_holders(conn, a, b, c) == {a: a, b: b, c: c}
    # The other order: the first merge undone while the second is in force.
    second_again = await merge(db, c, b)
    first_again = await merge(db, b, a)  # a -> b, whose holder is c: its coupons reach c
    assert (await coupon_holders(conn, a))[a] in (b, c)
    await unmerge(db, first_again, b, a)
    assert await coupon_holders(conn, a, b, c) == {a: a, b: c, c: c}
    await unmerge(db, second_again, c, b)
    assert await coupon_holders(conn, a, b, c) == {a: a, b: b, c: c}


async def test_an_unmerge_voids_only_the_holds_on_what_the_merge_moved(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, survivor, absorbed = Ledger(db), new_member(), new_member()
    await ledger.earn(survivor, 5_000, T0, txn=new_txn())  # 50, the survivor's own
    await ledger.earn(absorbed, 3_000, T0 + timedelta(hours=1), txn=new_txn())  # 30
    merge_id = await merge(db, survivor, absorbed)
    now = T0 + timedelta(hours=2)
    own = await ledger.call("hold", survivor, 20, "own-" + survivor, "", now)  # from the 50
    brought = await ledger.call("hold", survivor, 40, "brought-" + survivor, "", now)  # 30 + 10
    assert len(brought.lots) == 2
    await unmerge(db, merge_id, survivor, absorbed)
    statuses = {
        r["id"]: r["status"]
        for r in await conn.fetch(
            "SELECT id, status FROM rewards.points_holds WHERE id = ANY($1::uuid[])",
            [uuid.UUID(own.hold_id), uuid.UUID(brought.hold_id)],
        )
    }
    # The unrelated checkout goes on; the one on the merged points was cancelled.
    assert statuses == {uuid.UUID(own.hold_id): "held", uuid.UUID(brought.hold_id): "voided"}
    assert await balance(conn, absorbed) == {"available": 30, "pending": 0, "held": 0, "debt": 0}
    assert await balance(conn, survivor) == {"available": 30, "pending": 0, "held": 20, "debt": 0}


# ---- item 9: a shard count change keeps the stock -----------------------------------


async def test_reseeding_with_another_shard_count_keeps_the_remaining_stock(
    db: Database, conn: asyncpg.Connection
) -> None:
    template = f"T-{uuid.uuid4().hex[:10]}"
    terms = Terms(
        name="满99减30", kind=Kind.AMOUNT_OFF, threshold_fen=9900, discount_fen=3000, valid_days=30
    )

    async def seed(shards: int) -> None:
        async with db.unit_of_work() as uow:
            await crepo.seed_templates(
                uow.conn, [(template, terms, Limits(total_stock=20, stock_shards=shards))]
            )

    async def issue(n: int) -> Any:
        async with db.unit_of_work() as uow:
            return await coupons.issue_coupon(
                uow.conn,
                template_id=template,
                member_id=uuid.uuid4(),
                reason="operator_grant",
                issue_key=f"{template}-{n}",
                now=T0,
            )

    await seed(4)
    for n in range(5):
        await issue(n)
    await seed(8)  # more shards: the 15 left are spread, none minted
    assert await crepo.remaining_stock(conn, template) == 15
    await seed(2)  # fewer
    assert await crepo.remaining_stock(conn, template) == 15
    await seed(2)  # the same again: nothing rewritten
    assert await crepo.remaining_stock(conn, template) == 15
    for n in range(5, 20):
        await issue(n)
    with pytest.raises(FailedPrecondition) as sold_out:
        await issue(20)
    assert sold_out.value.code == "OUT_OF_STOCK"
    assert (
        await conn.fetchval("SELECT count(*) FROM rewards.coupons WHERE template_id = $1", template)
        == 20
    )


# ---- item 25: a refund gives back what its order counted against the daily cap -----


async def test_a_refund_gives_back_the_daily_cap_its_order_used(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, member = Ledger(db), new_member()
    ledger.points.rules = EarningRules(daily_cap=100)
    first, second, third = new_txn(), new_txn(), new_txn()
    assert (await ledger.earn(member, 10_000, T0, txn=first)).points_earned == 100
    # The day's cap is reached.
    assert (
        await ledger.earn(member, 5_000, T0 + timedelta(hours=1), txn=second)
    ).points_earned == 0
    # The first order refunded in full: its 100 no longer count against the day.
    await ledger.refund(first, first + "-r", 10_000, T0 + timedelta(hours=2))
    assert (
        await ledger.earn(member, 6_000, T0 + timedelta(hours=3), txn=third)
    ).points_earned == 60
    counted = await conn.fetchrow(
        "SELECT points, actions FROM rewards.earn_counters WHERE member_id = $1"
        " AND counter = 'orders'",
        uuid.UUID(member),
    )
    assert (counted["points"], counted["actions"]) == (60, 2)


# ---- item 3 (rewards' side): an absorbed id is credited to its survivor ------------


async def test_an_order_for_an_absorbed_id_lands_on_the_survivor_and_replays(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, survivor, absorbed = Ledger(db), new_member(), new_member()
    merge_id = await merge(db, survivor, absorbed)
    txn = new_txn()
    order = await ledger.earn(absorbed, 2_500, T0, txn=txn)
    assert order.points_earned == 25
    assert (await balance(conn, survivor))["available"] == 25
    assert (await balance(conn, absorbed))["available"] == 0
    assert await conn.fetchval(
        "SELECT member_id FROM rewards.orders WHERE pos_transaction_id = $1", txn
    ) == uuid.UUID(survivor)
    # The till's retry carries the absorbed id: the same request, replayed.
    again = await ledger.earn(absorbed, 2_500, T0, txn=txn)
    assert again.replayed and again.order_id == order.order_id
    # Once unmerged, the absorbed id is its own member again.
    await unmerge(db, merge_id, survivor, absorbed)
    await ledger.earn(absorbed, 1_000, T0 + timedelta(hours=1), txn=new_txn())
    assert (await balance(conn, absorbed))["available"] == 10


async def test_an_order_is_refused_when_the_id_sent_or_its_holder_was_erased(
    db: Database, conn: asyncpg.Connection
) -> None:
    """Checkout reads the holder, its erasure and the sent id's erasure in one
    statement: either mark refuses the order, and nothing is written."""
    ledger, survivor, absorbed = Ledger(db), new_member(), new_member()
    await merge(db, survivor, absorbed)
    erase = "INSERT INTO rewards.erased_members (member_id, erased_at) VALUES ($1, $2)"
    await conn.execute(erase, uuid.UUID(absorbed), T0)
    with pytest.raises(FailedPrecondition) as refused:
        await ledger.earn(absorbed, 1_000, T0, txn=new_txn())
    assert refused.value.code == "MEMBER_ERASED"
    # The survivor is not erased: its own orders still earn.
    await ledger.earn(survivor, 1_000, T0, txn=new_txn())
    assert (await balance(conn, survivor))["available"] == 10
    await conn.execute(erase, uuid.UUID(survivor), T0)
    other = new_member()
    await merge(db, survivor, other)
    # An id that is not erased itself, held by an erased survivor.
    with pytest.raises(FailedPrecondition) as refused:
        await ledger.earn(other, 1_000, T0, txn=new_txn())
    assert refused.value.code == "MEMBER_ERASED"
    assert (await balance(conn, survivor))["available"] == 10


class CountingConn:
    """A connection that records every statement sent (round trips)."""

    SENDS = frozenset({"execute", "executemany", "fetch", "fetchrow", "fetchval"})

    def __init__(self, conn: Any, statements: list[str]) -> None:
        self._conn = conn
        self.statements = statements

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._conn, name)
        if name not in self.SENDS:
            return attr

        async def counted(sql: str, *args: object, **kw: object) -> Any:
            self.statements.append(sql)
            return await attr(sql, *args, **kw)

        return counted


class Counting:
    """A unit of work, or a Database's pool, whose connections record every
    statement sent."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.statements: list[str] = []
        self.pool = self

    @property
    def conn(self) -> Any:
        return CountingConn(self._real.conn, self.statements)

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        async with self._real.pool.acquire() as conn:
            yield CountingConn(conn, self.statements)


async def test_a_checkout_is_two_statements_and_an_erased_members_one_writes_nothing(
    db: Database, conn: asyncpg.Connection
) -> None:
    """The member read (holder, tier, erasure) goes with the claim: an order
    is one statement for both and one for the earning (with its event); a
    replay is the claim and the lookup; an erased member's order is the one
    statement, refused, and leaves neither key nor order behind."""
    ledger, survivor, absorbed = Ledger(db), new_member(), new_member()
    await merge(db, survivor, absorbed)
    txn = new_txn()
    settlement = ledger.handlers.prepare_order(
        OrderRequest(
            store_id="SH001",
            pos_transaction_id=txn,
            member_id=absorbed,
            channel=Channel.STORE,
            paid_amount_fen=2_500,
            ordered_at=T0,
        )
    )
    for replayed in (False, True):
        async with db.unit_of_work() as uow:
            counted = Counting(uow)
            result = (await ledger.handlers.complete_order(counted, settlement, T0)).unwrap()  # type: ignore[arg-type]
        assert result.replayed is replayed
        assert len(counted.statements) == 2, counted.statements
    # Credited to the holder the same statement found.
    assert (await balance(conn, survivor))["available"] == 25
    erased = new_member()
    await conn.execute(
        "INSERT INTO rewards.erased_members (member_id, erased_at) VALUES ($1, $2)",
        uuid.UUID(erased),
        T0,
    )
    txn = new_txn()
    refused_order = ledger.handlers.prepare_order(
        OrderRequest(
            store_id="SH001",
            pos_transaction_id=txn,
            member_id=erased,
            channel=Channel.STORE,
            paid_amount_fen=2_500,
            ordered_at=T0,
        )
    )
    async with db.unit_of_work() as uow:
        counted = Counting(uow)
        with pytest.raises(FailedPrecondition) as refused:
            await ledger.handlers.complete_order(counted, refused_order, T0)  # type: ignore[arg-type]
        assert refused.value.code == "MEMBER_ERASED"
        assert len(counted.statements) == 1, counted.statements
        # Inside the same transaction: the statement itself wrote nothing.
        assert not await uow.conn.fetchval(
            "SELECT count(*) FROM rewards.order_keys WHERE store_id = 'SH001'"
            " AND pos_transaction_id = $1",
            txn,
        )
        assert not await uow.conn.fetchval(
            "SELECT count(*) FROM rewards.orders WHERE member_id = $1", uuid.UUID(erased)
        )


def plain_order(member: str, txn: str, **changes: Any) -> OrderRequest:
    return replace(
        OrderRequest(
            store_id="SH001",
            pos_transaction_id=txn,
            member_id=member,
            channel=Channel.STORE,
            paid_amount_fen=2_500,
            ordered_at=T0,
        ),
        **changes,
    )


async def order_rows(conn: asyncpg.Connection, txn: str) -> tuple[int, int, int]:
    """Keys, orders and OrderCompleted outbox rows of one pos_transaction_id."""
    keys = await conn.fetchval(
        "SELECT count(*) FROM rewards.order_keys WHERE store_id = 'SH001'"
        " AND pos_transaction_id = $1",
        txn,
    )
    orders = await conn.fetch(
        "SELECT id FROM rewards.orders WHERE store_id = 'SH001' AND pos_transaction_id = $1", txn
    )
    events = 0
    for row in await conn.fetch(
        "SELECT envelope FROM rewards.outbox"
        " WHERE event_type = 'loyalty.events.v1.OrderCompleted' ORDER BY id DESC LIMIT 200"
    ):
        payload = events_pb2.OrderCompleted()
        events_pb2.EventEnvelope.FromString(bytes(row["envelope"])).payload.Unpack(payload)
        events += payload.pos_transaction_id == txn
    return keys, len(orders), events


async def test_a_plain_order_settles_in_one_statement_after_the_member_read(
    db: Database, conn: asyncpg.Connection
) -> None:
    """CompleteOrder's first try (complete_order_now): the member read, then
    key, order, journal, balance and OrderCompleted in one statement outside
    a transaction, the same rows as the transactional path; anything else
    writes nothing there and is left to complete_order (None)."""
    ledger, survivor, absorbed = Ledger(db), new_member(), new_member()
    await merge(db, survivor, absorbed)
    # Debt from an earlier refund is repaid first, as in the transaction.
    first = new_txn()
    await ledger.earn(survivor, 1_000, T0, txn=first)
    await ledger.call("redeem", survivor, 10, "spend-" + first, "", T0)
    await ledger.refund(first, "R-" + first, 1_000, T0 + timedelta(minutes=1))
    assert (await balance(conn, survivor))["debt"] == 10
    txn = new_txn()
    settlement = ledger.handlers.prepare_order(plain_order(absorbed, txn))
    counted = Counting(db)
    done = await ledger.handlers.complete_order_now(counted, settlement, T0)  # type: ignore[arg-type]
    assert done is not None
    result = done.unwrap()
    assert (result.points_earned, result.replayed) == (25, False)
    assert len(counted.statements) == 2, counted.statements
    assert counted.statements[0] == members.ORDER_MEMBER_SQL
    # The holder's: 25 earned, 10 of them repay the debt.
    assert await balance(conn, survivor) == {"available": 15, "pending": 0, "held": 0, "debt": 0}
    assert result.points_balance == 15
    assert await order_rows(conn, txn) == (1, 1, 1)
    row = await conn.fetchrow(
        "SELECT member_id, points_earned, points_balance_after, status FROM rewards.orders"
        " WHERE store_id = 'SH001' AND pos_transaction_id = $1",
        txn,
    )
    assert dict(row) == {
        "member_id": uuid.UUID(survivor),
        "points_earned": 25,
        "points_balance_after": 15,
        "status": "settled",
    }
    # A retry: nothing written by the statement, the transaction replays it.
    counted = Counting(db)
    again = await ledger.handlers.complete_order_now(counted, settlement, T0)  # type: ignore[arg-type]
    assert again is None
    # The member as read for the first order: its read is skipped, the
    # statement checks it still stands.
    assert len(counted.statements) == 1, counted.statements
    replay = await ledger.earn(absorbed, 2_500, T0, txn=txn)
    assert replay.replayed and replay.order_id == result.order_id
    assert await order_rows(conn, txn) == (1, 1, 1)
    # Points or coupons spent: not tried, not a statement sent.
    counted = Counting(db)
    spend = ledger.handlers.prepare_order(plain_order(survivor, new_txn(), points_to_redeem=5))
    assert await ledger.handlers.complete_order_now(counted, spend, T0) is None  # type: ignore[arg-type]
    assert counted.statements == []
    # A closed store: nothing written.
    txn = new_txn()
    closed = ledger.handlers.prepare_order(plain_order(survivor, txn, store_id="ZZ901"))
    assert await ledger.handlers.complete_order_now(db, closed, T0) is None
    assert await order_rows(conn, txn) == (0, 0, 0)


async def test_a_member_read_is_reused_only_while_the_holder_and_tier_stand(
    db: Database, conn: asyncpg.Connection
) -> None:
    """The next plain order of an id is one statement: the member read of its
    last order is reused, and the statement settles only while the holder and
    its tier (and multiplier) are still those; a change writes nothing there,
    and the order is priced afresh (the tier's multiplier applies)."""
    rules = EarningRules(tier_multiplier_bp={"gold": 20_000})
    ledger = Ledger(db)
    ledger.points = PointsLedger(LedgerPolicy(expiry=EXPIRY), rules)
    ledger.handlers = RewardsHandlers(points=ledger.points)
    handlers, member = ledger.handlers, new_member()

    async def order_now(counted: Counting) -> Any:
        txn = new_txn()
        settlement = handlers.prepare_order(plain_order(member, txn))
        done = await handlers.complete_order_now(counted, settlement, T0)  # type: ignore[arg-type]
        return txn, done

    counted = Counting(db)
    _, done = await order_now(counted)
    assert done is not None and done.unwrap().points_earned == 25
    assert len(counted.statements) == 2
    counted = Counting(db)
    _, done = await order_now(counted)
    assert done is not None and done.unwrap().points_earned == 25
    assert len(counted.statements) == 1, counted.statements
    # Tiering moves the member to gold: the reused read no longer stands.
    await conn.execute(
        "INSERT INTO rewards.member_tiers (member_id, tier_code, changed_at) VALUES ($1, $2, $3)",
        uuid.UUID(member),
        "gold",
        T0,
    )
    counted = Counting(db)
    txn, done = await order_now(counted)
    assert done is None and len(counted.statements) == 1
    assert await order_rows(conn, txn) == (0, 0, 0)
    # Read afresh: gold's double points.
    counted = Counting(db)
    _, done = await order_now(counted)
    assert done is not None and done.unwrap().points_earned == 50
    assert len(counted.statements) == 2
    # Its multiplier changes (tiering's own): the next order is priced afresh too.
    await conn.execute(
        "UPDATE rewards.member_tiers SET points_multiplier_bp = 30000 WHERE member_id = $1",
        uuid.UUID(member),
    )
    _, done = await order_now(Counting(db))
    assert done is None
    _, done = await order_now(Counting(db))
    assert done is not None and done.unwrap().points_earned == 75
    # Merged into another member: the holder changed, the survivor is credited.
    survivor = new_member()
    await merge(db, survivor, member)
    _, done = await order_now(Counting(db))
    assert done is None
    before = (await balance(conn, survivor))["available"]
    _, done = await order_now(Counting(db))
    assert done is not None
    assert (await balance(conn, survivor))["available"] == before + done.unwrap().points_earned
    # Erased after its last order: nothing written, the transaction refuses it.
    await conn.execute(
        "INSERT INTO rewards.erased_members (member_id, erased_at) VALUES ($1, $2)",
        uuid.UUID(survivor),
        T0,
    )
    txn, done = await order_now(Counting(db))
    assert done is None
    assert await order_rows(conn, txn) == (0, 0, 0)
    with pytest.raises(FailedPrecondition) as refused:
        await ledger.earn(member, 2_500, T0, txn=txn)
    assert refused.value.code == "MEMBER_ERASED"


async def test_an_erasure_refuses_the_one_statement_order_and_it_writes_nothing(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, member = Ledger(db), new_member()
    txn = new_txn()
    await conn.execute(
        "INSERT INTO rewards.erased_members (member_id, erased_at) VALUES ($1, $2)",
        uuid.UUID(member),
        T0,
    )
    settlement = ledger.handlers.prepare_order(plain_order(member, txn))
    with pytest.raises(FailedPrecondition) as refused:
        await ledger.handlers.complete_order_now(db, settlement, T0)
    assert refused.value.code == "MEMBER_ERASED"
    # Erased after the member read, before the statement: its guard writes nothing.
    other, txn = new_member(), new_txn()
    settlement = ledger.handlers.prepare_order(plain_order(other, txn))
    order_id = uuid.uuid4()
    earning = ledger.handlers._earning(
        order_id, uuid.UUID(other), settlement.order, T0, 25, {"rule": "base"}
    )
    await conn.execute(
        "INSERT INTO rewards.erased_members (member_id, erased_at) VALUES ($1, $2)",
        uuid.UUID(other),
        T0,
    )
    async with db.pool.acquire() as c:
        assert (
            await orepo.settle_order(
                c,
                orepo.NewOrder(
                    order_id=order_id,
                    store_id="SH001",
                    pos_transaction_id=txn,
                    member_id=uuid.UUID(other),
                    channel="store",
                    paid_amount_fen=2_500,
                    gross_amount_fen=None,
                    lines=(),
                    ordered_at=T0,
                    request_hash=settlement.request_hash,
                    points_earned=25,
                ),
                earning,
                uuid.UUID(other),
                MemberState(None, None, False),
            )
            is None
        )
    assert await order_rows(conn, txn) == (0, 0, 0)
    assert await balance(conn, other) == {"available": 0, "pending": 0, "held": 0, "debt": 0}


async def test_an_orders_event_is_written_with_its_final_points_for_the_holder(
    db: Database, conn: asyncpg.Connection
) -> None:
    """OrderCompleted goes into the outbox with the earning's statement: one
    row per order, the points after the multiplier and cap, the survivor's id."""
    ledger, survivor, absorbed = Ledger(db), new_member(), new_member()
    await merge(db, survivor, absorbed)
    order = await ledger.earn(absorbed, 2_500, T0, txn=new_txn())
    rows = await conn.fetch(
        "SELECT event_id, envelope FROM rewards.outbox"
        " WHERE event_type = 'loyalty.events.v1.OrderCompleted' ORDER BY id DESC LIMIT 50"
    )
    mine = []
    for row in rows:
        envelope = events_pb2.EventEnvelope.FromString(bytes(row["envelope"]))
        payload = events_pb2.OrderCompleted()
        envelope.payload.Unpack(payload)
        if payload.order_id == order.order_id:
            mine.append((row["event_id"], envelope, payload))
    assert len(mine) == 1
    event_id, envelope, payload = mine[0]
    assert str(event_id) == envelope.event_id
    assert envelope.producer == "rewards"
    assert payload.member_id == envelope.member_id == survivor
    assert payload.points_earned == order.points_earned == 25
