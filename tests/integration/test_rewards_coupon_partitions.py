"""Issued coupons partitioned by month of expires_at (migration 0017,
services/rewards/partitions.py COUPONS): code and issue key stay unique across
partitions (coupon_keys), single and bulk issues replay across a month's
boundary, lock / redeem / refund-restore of coupons in two partitions, the
wallet's and checkout's reads prune the past and a lookup by code reads one
partition (EXPLAIN), the migration moves deployed rows, and detach refuses a
partition with live coupons."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
import grpc
import pytest
from alembic import command
from google.protobuf.timestamp_pb2 import Timestamp

from loyalty.common.v1 import common_pb2
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from servicekit.db import asyncpg_dsn
from servicekit.errors import DomainError
from servicekit.migrations import alembic_config
from servicekit.partitions import (
    add_months,
    detach_partition,
    ensure_partitions,
    list_partitions,
    month_start,
)
from services.rewards.coupons import handlers as coupon_service
from services.rewards.coupons import repository as crepo
from services.rewards.partitions import COUPONS
from services.rewards.seed import seed_demo

from .test_rewards_partitions import executed, relations

Stub: TypeAlias = rewards_pb2_grpc.RewardsServiceStub


@pytest.fixture(scope="module")
async def stub(rewards_channel: grpc.aio.Channel, conn: asyncpg.Connection) -> Stub:
    # The months ahead exist before any coupon is issued (the service's keeper
    # makes them at start-up too, in the background).
    await ensure_partitions(conn, COUPONS, ahead=3)
    await seed_demo(conn)  # the store SH001
    return rewards_pb2_grpc.RewardsServiceStub(rewards_channel)


def ts(at: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(at)
    return t


def ends_in(months: int) -> datetime:
    """A day into the month `months` after this one (the service's clock):
    coupons ending then are in that month's partition."""
    return add_months(month_start(datetime.now(UTC)), months) + timedelta(days=1)


async def template(stub: Stub, until: datetime, **kw: object) -> str:
    template_id = f"P-{uuid.uuid4().hex[:10]}"
    await stub.CreateCouponTemplate(
        rewards_pb2.CreateCouponTemplateRequest(
            template_id=template_id,
            terms=rewards_pb2.CouponTerms(
                name="满99减30",
                kind="amount_off",
                threshold_fen=0,
                discount_fen=1000,
                valid_until=ts(until),
                stackable=True,
                **kw,  # type: ignore[arg-type]
            ),
            limits=rewards_pb2.CouponLimits(),
            status="active",
            created_by="ops@brand",
        )
    )
    return template_id


async def issue(stub: Stub, template_id: str, member: str, key: str = "") -> rewards_pb2.Coupon:
    return await stub.IssueCoupon(
        rewards_pb2.IssueCouponRequest(
            template_id=template_id,
            member_id=member,
            reason="operator_grant",
            issue_key=key or uuid.uuid4().hex,
            issued_by="ops@brand",
        )
    )


async def partition_of(conn: asyncpg.Connection, code: str) -> str:
    name: str = await conn.fetchval(
        "SELECT c.tableoid::regclass::text FROM rewards.coupons c WHERE c.code = $1", code
    )
    return name


def coupon_partitions(names: list[str]) -> set[str]:
    return {n for n in names if n.startswith("coupons_")}


async def test_issue_keys_and_codes_are_unique_across_partitions(
    stub: Stub, conn: asyncpg.Connection
) -> None:
    member = str(uuid.uuid4())
    key = uuid.uuid4().hex
    near = await template(stub, ends_in(1))
    first = await issue(stub, near, member, key)
    again = await issue(stub, near, member, key)
    assert again.replayed and again.code == first.code
    # The same key for a coupon that would end in another month (another
    # partition): found in the key table, refused as reused.
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await issue(stub, await template(stub, ends_in(2)), member, key)
    assert reused.value.code() == grpc.StatusCode.ABORTED
    assert (
        await conn.fetchval("SELECT count(*) FROM rewards.coupon_keys WHERE issue_key = $1", key)
        == 1
    )
    # A code or issue key taken in one month is refused for a row of another.
    with pytest.raises(asyncpg.UniqueViolationError, match="uq_coupon_keys_code"):
        await conn.execute(
            "INSERT INTO rewards.coupon_keys (id, code, issue_key, expires_at)"
            " VALUES ($1, $2, $3, $4)",
            uuid.uuid4(),
            first.code,
            uuid.uuid4().hex,
            ends_in(5),
        )
    # No coupon row without its key.
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="fk_coupons_id_coupon_keys"):
        await conn.execute(
            "INSERT INTO rewards.coupons (id, code, template_id, template_version, member_id,"
            " reason, issue_key, request_hash, issued_at, valid_from, expires_at, issued_to)"
            " VALUES ($1, 'NOKEY', 't', 1, $2, 'operator_grant', 'nokey', $3, now(), now(),"
            " $4, $2)",
            uuid.uuid4(),
            uuid.UUID(member),
            hashlib.sha256(b"x").digest(),
            ends_in(5),
        )


async def test_bulk_issue_replays_across_partitions(stub: Stub, conn: asyncpg.Connection) -> None:
    members = [str(uuid.uuid4()) for _ in range(3)]
    keys = [uuid.uuid4().hex for _ in members]
    items = [
        rewards_pb2.IssueCouponsItem(member_id=m, issue_key=k)
        for m, k in zip(members, keys, strict=True)
    ]
    near = await template(stub, ends_in(1))
    done = await stub.IssueCoupons(
        rewards_pb2.IssueCouponsRequest(
            template_id=near, reason="operator_grant", issued_by="ops@brand", items=items
        )
    )
    assert [r.outcome for r in done.results] == ["issued"] * 3
    # The batch retried on the same template: every coupon replayed, nothing new.
    again = await stub.IssueCoupons(
        rewards_pb2.IssueCouponsRequest(
            template_id=near, reason="operator_grant", issued_by="ops@brand", items=items
        )
    )
    assert [r.outcome for r in again.results] == ["replayed"] * 3
    assert [r.coupon.code for r in again.results] == [r.coupon.code for r in done.results]
    rows = await conn.fetch(
        "SELECT k.code, k.expires_at = c.expires_at AS same, c.tableoid::regclass::text AS part"
        " FROM rewards.coupon_keys k JOIN rewards.coupons c ON c.id = k.id"
        " WHERE k.issue_key = ANY($1::text[])",
        keys,
    )
    assert len(rows) == 3 and all(r["same"] for r in rows)
    assert {r["part"] for r in rows} == {"rewards." + COUPONS.partition_name(ends_in(1))}


async def test_lock_redeem_and_refund_restore_across_a_partition_boundary(
    stub: Stub, conn: asyncpg.Connection
) -> None:
    member = str(uuid.uuid4())
    near = await issue(stub, await template(stub, ends_in(1), restore_on_refund=True), member)
    far = await issue(stub, await template(stub, ends_in(2), restore_on_refund=True), member)
    parts = {await partition_of(conn, near.code), await partition_of(conn, far.code)}
    assert len(parts) == 2, parts
    txn = f"PB-{uuid.uuid4().hex[:10]}"
    for c in (near, far):
        locked = await stub.LockCoupon(
            rewards_pb2.LockCouponRequest(
                code=c.code, member_id=member, store_id="SH001", pos_transaction_id=txn
            )
        )
        assert locked.status == "locked"
    done = await stub.CompleteOrder(
        rewards_pb2.CompleteOrderRequest(
            store_id="SH001",
            pos_transaction_id=txn,
            member_id=member,
            channel=common_pb2.CHANNEL_STORE,
            paid_amount_fen=8000,
            gross_amount_fen=10000,
            lines=[
                rewards_pb2.OrderLine(
                    sku="MILK-TEA", name="奶茶", category="tea", quantity=1, paid_amount_fen=10000
                )
            ],
            coupon_codes=[near.code, far.code],
        )
    )
    assert done.coupon_discount_fen == 2000
    used = await conn.fetch(
        "SELECT status FROM rewards.coupons WHERE code = ANY($1::text[])", [near.code, far.code]
    )
    assert [r["status"] for r in used] == ["used", "used"]
    refund = await stub.RefundOrder(
        rewards_pb2.RefundOrderRequest(
            store_id="SH001",
            pos_transaction_id=txn,
            refund_transaction_id=f"{txn}-R",
            refunded_amount_fen=8000,
        )
    )
    assert sorted((c.code, c.restored) for c in refund.coupons) == sorted(
        [(near.code, True), (far.code, True)]
    )
    wallet = await stub.ListMemberCoupons(
        rewards_pb2.ListMemberCouponsRequest(member_id=member, statuses=["available"])
    )
    assert {c.code for c in wallet.coupons} == {near.code, far.code}


async def test_an_expiry_change_moves_the_coupon_and_its_key_follows(
    stub: Stub, conn: asyncpg.Connection
) -> None:
    member = str(uuid.uuid4())
    c = await issue(stub, await template(stub, ends_in(1)), member)
    await conn.execute(
        "UPDATE rewards.coupons SET expires_at = $2 WHERE code = $1", c.code, ends_in(3)
    )
    assert await partition_of(conn, c.code) == "rewards." + COUPONS.partition_name(ends_in(3))
    assert await conn.fetchval(
        "SELECT expires_at FROM rewards.coupon_keys WHERE code = $1", c.code
    ) == ends_in(3)
    # Found by its code (through the key) in its new month.
    row = await crepo.coupon_by_code(conn, c.code)
    assert row is not None and row["expires_at"] == ends_in(3)


async def test_wallet_checkout_and_code_reads_prune(stub: Stub, conn: asyncpg.Connection) -> None:
    # A past month with a row (the planner keeps empty partitions out anyway).
    past = datetime(2019, 3, 10, tzinfo=UTC)
    cid, code = uuid.uuid4(), f"OLD{uuid.uuid4().hex[:10]}"
    await conn.execute(
        "WITH k AS (INSERT INTO rewards.coupon_keys (id, code, issue_key, expires_at)"
        " VALUES ($1, $2, $2, $4))"
        " INSERT INTO rewards.coupons (id, code, template_id, template_version, member_id,"
        " reason, issue_key, request_hash, status, issued_at, valid_from, expires_at, issued_to)"
        " VALUES ($1, $2, 'old', 1, $3, 'operator_grant', $2, $5, 'expired', $4 - interval '30 days',"
        " $4 - interval '30 days', $4, $3)",
        cid,
        code,
        uuid.uuid4(),
        past,
        hashlib.sha256(cid.bytes).digest(),
    )
    await ensure_partitions(conn, COUPONS, ahead=3)
    old = COUPONS.partition_name(past)
    assert old in {p.name for p in await list_partitions(conn, COUPONS)}
    now = datetime.now(UTC)
    member = uuid.uuid4()
    # The wallet's usable coupons: every partition ending by now is pruned at planning.
    plan = json.loads(
        await conn.fetchval(
            f"EXPLAIN (FORMAT JSON) {crepo.wallet_sql(True)}", member, ["available"], now, None, 20
        )
    )
    scanned = coupon_partitions(relations(plan))
    assert scanned and old not in scanned
    ended = {p.name for p in await list_partitions(conn, COUPONS) if p.upper and p.upper <= now}
    assert old in ended and not scanned & ended
    # The whole wallet (used and expired too) reads every partition.
    plan = json.loads(
        await conn.fetchval(
            f"EXPLAIN (FORMAT JSON) {crepo.wallet_sql(False)}", member, [], now, None, 20
        )
    )
    assert old in coupon_partitions(relations(plan))
    # Checkout: its usable coupons are pruned at planning, the coupons named
    # by code read through their keys (here none: no partition read for them).
    plan = json.loads(
        await conn.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {crepo.CHECKOUT_SQL}",
            member,
            ["NOPE"],
            now,
            None,
            True,
        )
    )
    assert old not in coupon_partitions(executed(plan))
    # A lookup by code reads the key, then the one partition that holds the coupon.
    plan = json.loads(
        await conn.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) SELECT {crepo.COUPON_COLUMNS} FROM {crepo.KEYED}"
            " WHERE k.code = $1",
            code,
        )
    )
    assert coupon_partitions(executed(plan)) == {old}
    live = await issue(stub, await template(stub, ends_in(1)), str(uuid.uuid4()))
    plan = json.loads(
        await conn.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) SELECT {crepo.COUPON_COLUMNS} FROM {crepo.KEYED}"
            " WHERE k.code = $1",
            live.code,
        )
    )
    assert coupon_partitions(executed(plan)) == {COUPONS.partition_name(ends_in(1))}


async def test_detach_needs_every_coupon_terminal_and_a_replay_is_archived(
    stub: Stub, conn: asyncpg.Connection
) -> None:
    # A coupon issued long ago, still 'available' (the expiry job has not run).
    at = datetime(2018, 5, 1, tzinfo=UTC)
    template_id = await template(stub, ends_in(1))
    key = uuid.uuid4().hex
    await coupon_service.issue_coupon(
        conn,
        template_id=template_id,
        member_id=uuid.uuid4(),
        reason="operator_grant",
        issue_key=key,
        now=at - timedelta(days=20),
    )
    await conn.execute(
        "UPDATE rewards.coupons SET issued_at = $2::timestamptz - interval '20 days',"
        " valid_from = $2::timestamptz - interval '20 days', expires_at = $2"
        " WHERE issue_key = $1",
        key,
        at + timedelta(days=2),
    )
    await ensure_partitions(conn, COUPONS, ahead=3)
    name = COUPONS.partition_name(at)
    assert (
        await partition_of(
            conn,
            await conn.fetchval("SELECT code FROM rewards.coupon_keys WHERE issue_key = $1", key),
        )
        == f"rewards.{name}"
    )
    with pytest.raises(DomainError) as refused:
        await detach_partition(conn, COUPONS, name)
    assert refused.value.code == "PARTITION_HAS_LIVE_COUPONS"
    # A recent partition without live coupons (made ahead, empty) is refused
    # by the kept months.
    with pytest.raises(DomainError) as recent:
        await detach_partition(conn, COUPONS, COUPONS.partition_name(ends_in(11)))
    assert recent.value.code == "PARTITION_TOO_RECENT"
    await conn.execute(
        f"UPDATE rewards.{name} SET status = 'expired' WHERE status IN ('available', 'locked')"
    )
    assert await detach_partition(conn, COUPONS, name) == f"rewards_archive.{name}"
    assert name not in {p.name for p in await list_partitions(conn, COUPONS)}
    try:
        # The key stays taken: a replay says the coupon was archived.
        with pytest.raises(DomainError) as gone:
            await coupon_service.issue_coupon(
                conn,
                template_id=template_id,
                member_id=uuid.uuid4(),
                reason="operator_grant",
                issue_key=key,
                now=datetime.now(UTC),
            )
        assert gone.value.code == "COUPON_ARCHIVED"
    finally:
        await conn.execute(f"DROP TABLE rewards_archive.{name}")


async def test_migration_moves_deployed_coupons_into_partitions(scratch_url: str) -> None:
    def migrate(revision: str) -> None:
        command.upgrade(alembic_config("rewards", scratch_url), revision)

    def downgrade(revision: str) -> None:
        command.downgrade(alembic_config("rewards", scratch_url), revision)

    await asyncio.to_thread(migrate, "0016_rewards_dedupe_partitions")
    conn = await asyncpg.connect(asyncpg_dsn(scratch_url))
    try:
        member = uuid.uuid4()
        # Expiring in March 2025 (two), April 2025 and far ahead (2031).
        ends = [
            datetime(2025, 3, 10, tzinfo=UTC),
            datetime(2025, 3, 20, tzinfo=UTC),
            datetime(2025, 4, 5, tzinfo=UTC),
            datetime(2031, 1, 1, tzinfo=UTC),
        ]
        for n, end in enumerate(ends):
            await conn.execute(
                "INSERT INTO rewards.coupons (id, code, template_id, template_version, member_id,"
                " reason, issue_key, request_hash, issued_at, valid_from, expires_at, issued_to)"
                " VALUES ($1, $2, 't', 1, $3, 'operator_grant', $4, $5, $6, $6, $7, $3)",
                uuid.uuid4(),
                f"CODE{n}",
                member,
                f"key:{n}",
                hashlib.sha256(bytes([n])).digest(),
                end - timedelta(days=30),
                end,
            )
        before = await conn.fetch("SELECT id, code, seq FROM rewards.coupons ORDER BY seq")
        await asyncio.to_thread(migrate, "head")
        rows = await conn.fetch(
            "SELECT id, code, seq, tableoid::regclass::text AS part FROM rewards.coupons"
            " ORDER BY seq"
        )
        assert [tuple(r)[:3] for r in rows] == [tuple(r) for r in before]
        assert [r["part"] for r in rows] == [
            "rewards.coupons_p202503",
            "rewards.coupons_p202503",
            "rewards.coupons_p202504",
            "rewards.coupons_p203101",
        ]
        keys = await conn.fetch(
            "SELECT code, issue_key, expires_at FROM rewards.coupon_keys ORDER BY code"
        )
        assert [tuple(k) for k in keys] == [
            (f"CODE{n}", f"key:{n}", end) for n, end in enumerate(ends)
        ]
        # This month and three ahead exist too, and the default.
        names = {
            r["relname"]
            for r in await conn.fetch(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'rewards.coupons'::regclass"
            )
        }
        now = await conn.fetchval("SELECT now()")
        assert {f"coupons_p{add_months(month_start(now), i):%Y%m}" for i in range(4)} <= names
        assert "coupons_default" in names
        # The converted keys stay taken; new coupons continue the sequence.
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO rewards.coupon_keys (id, code, issue_key, expires_at)"
                " VALUES ($1, 'CODE1', 'key:new', now())",
                uuid.uuid4(),
            )
        fresh_id = uuid.uuid4()
        fresh = await conn.fetchval(
            "WITH k AS (INSERT INTO rewards.coupon_keys (id, code, issue_key, expires_at)"
            " VALUES ($1, 'CODE9', 'key:9', $3))"
            " INSERT INTO rewards.coupons (id, code, template_id, template_version, member_id,"
            " reason, issue_key, request_hash, issued_at, valid_from, expires_at, issued_to)"
            " VALUES ($1, 'CODE9', 't', 1, $2, 'operator_grant', 'key:9', $4,"
            " $3::timestamptz - interval '1 day', $3::timestamptz - interval '1 day', $3, $2)"
            " RETURNING seq",
            fresh_id,
            member,
            datetime(2025, 4, 9, tzinfo=UTC),
            hashlib.sha256(b"9").digest(),
        )
        assert fresh > max(r["seq"] for r in rows)
        # Down again: a plain table with its unique code back.
        await asyncio.to_thread(downgrade, "0016_rewards_dedupe_partitions")
        assert await conn.fetchval("SELECT count(*) FROM rewards.coupons") == 5
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO rewards.coupons (id, code, template_id, template_version, member_id,"
                " reason, issue_key, request_hash, issued_at, valid_from, expires_at, issued_to)"
                " VALUES ($1, 'CODE9', 't', 1, $2, 'operator_grant', 'key:x', $3, now(), now(),"
                " now() + interval '1 day', $2)",
                uuid.uuid4(),
                member,
                hashlib.sha256(b"x").digest(),
            )
    finally:
        await conn.close()


class Counting:
    """A connection that records every statement sent (round trips)."""

    SENDS = frozenset({"execute", "executemany", "fetch", "fetchrow", "fetchval"})

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.statements: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._conn, name)
        if name not in self.SENDS:
            return attr

        async def counted(sql: str, *args: object, **kw: object) -> Any:
            self.statements.append(sql)
            return await attr(sql, *args, **kw)

        return counted


async def test_issues_take_as_many_statements_as_before(
    stub: Stub, conn: asyncpg.Connection
) -> None:
    # The key row goes in with the coupon, in the same statement: IssueCoupon
    # is one read and one write (as before the partitioning), IssueCoupons one
    # read, one lock of its counters and one write.
    limits = rewards_pb2.CouponLimits(
        total_stock=100, per_member_limit=5, daily_budget=1000, stock_shards=4
    )
    template_id = f"P-{uuid.uuid4().hex[:10]}"
    await stub.CreateCouponTemplate(
        rewards_pb2.CreateCouponTemplateRequest(
            template_id=template_id,
            terms=rewards_pb2.CouponTerms(
                name="满99减30", kind="amount_off", discount_fen=1000, valid_days=30
            ),
            limits=limits,
            status="active",
            created_by="ops@brand",
        )
    )
    counting = Counting(conn)
    async with conn.transaction():
        single = await coupon_service.issue_coupon(
            counting,  # type: ignore[arg-type]
            template_id=template_id,
            member_id=uuid.uuid4(),
            reason="operator_grant",
            issue_key=uuid.uuid4().hex,
            now=datetime.now(UTC),
            savepoint=False,
        )
    assert not single.replayed
    assert len(counting.statements) == 2, counting.statements
    counting.statements.clear()
    async with conn.transaction():
        results = await coupon_service.issue_coupons(
            counting,  # type: ignore[arg-type]
            template_id=template_id,
            reason="operator_grant",
            items=[coupon_service.BulkItem(uuid.uuid4(), uuid.uuid4().hex) for _ in range(50)],
            now=datetime.now(UTC),
        )
    assert [r.outcome for r in results] == ["issued"] * 50
    assert len(counting.statements) == 3, counting.statements
