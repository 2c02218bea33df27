"""Bulk issuance (coupon_service.issue_coupons, the IssueCoupons RPC) against
PostgreSQL: per-item results with the single issue's guarantees, retries that
replay the same codes, batches racing each other and single issues for the
last stock, and a property: stock taken == coupons issued <= stock, per-member
counts == coupons per member <= limit, one CouponIssued per coupon."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servicekit.db import create_pool, with_retries
from servicekit.errors import DomainError, InvalidArgument, NotFound
from services.rewards.coupons import handlers as svc
from services.rewards.coupons.domain import Kind, Limits, Status, Terms, issue_hash
from services.rewards.seed import seed_demo

from ..harness import Infra
from .test_rewards_coupon_issue_rpc import issued_events

T0 = datetime(2026, 3, 1, 4, 0, tzinfo=UTC)
MJ = Terms(
    name="满99减30", kind=Kind.AMOUNT_OFF, threshold_fen=9900, discount_fen=3000, valid_days=3
)
Item = svc.BulkItem


@pytest.fixture(scope="module")
async def pool(infra: Infra) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(infra.database_url, 1, 16)
    async with p.acquire() as c:
        await seed_demo(c)
    yield p
    await p.close()


async def make_template(
    pool: asyncpg.Pool, limits: Limits, terms: Terms = MJ, status: Status = Status.ACTIVE
) -> str:
    template_id = f"B-{uuid.uuid4().hex[:10]}"
    async with pool.acquire() as conn, conn.transaction():
        await svc.create_template(conn, template_id, terms, limits, status, "test")
    return template_id


def batch(n: int, prefix: str | None = None) -> list[svc.BulkItem]:
    prefix = prefix or uuid.uuid4().hex
    return [Item(uuid.uuid4(), f"{prefix}-{i}") for i in range(n)]


async def bulk(
    pool: asyncpg.Pool,
    template_id: str,
    items: list[svc.BulkItem],
    now: datetime = T0,
    reason: str = "operator_grant",
) -> list[svc.BulkResult]:
    """What the servicer does: its own transaction, retried on a deadlock."""

    async def attempt() -> list[svc.BulkResult]:
        async with pool.acquire() as conn, conn.transaction():
            return await svc.issue_coupons(
                conn, template_id=template_id, reason=reason, items=items, now=now
            )

    return await with_retries(attempt)  # type: ignore[no-any-return]


async def single(
    pool: asyncpg.Pool, template_id: str, member: uuid.UUID, key: str
) -> svc.IssuedCoupon:
    """What the IssueCoupon servicer does: its own transaction, retried on a deadlock."""

    async def attempt() -> svc.IssuedCoupon:
        async with pool.acquire() as conn, conn.transaction():
            return await svc.issue_coupon(
                conn,
                template_id=template_id,
                member_id=member,
                reason="operator_grant",
                issue_key=key,
                now=T0,
                savepoint=False,
            )

    return await with_retries(attempt)  # type: ignore[no-any-return]


def outcomes(results: list[svc.BulkResult]) -> Counter[str]:
    return Counter(r.refusal or r.outcome for r in results)


async def written(pool: asyncpg.Pool, infra: Infra, template_id: str) -> dict[str, int | None]:
    """What the database holds for a template: coupons, stock left, member
    counts summed, the day's count, and its CouponIssued events (in the outbox
    or already relayed, when the service runs in this session)."""
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM rewards.coupons WHERE template_id = $1) AS coupons,"
        " (SELECT sum(remaining)::bigint FROM rewards.coupon_stock WHERE template_id = $1)"
        " AS remaining,"
        " (SELECT coalesce(sum(issued), 0)::bigint FROM rewards.coupon_member_counts"
        "  WHERE template_id = $1) AS counted,"
        " (SELECT coalesce(sum(issued), 0)::bigint FROM rewards.coupon_daily_counts"
        "  WHERE template_id = $1) AS day",
        template_id,
    )
    assert row is not None
    return dict(row) | {"events": len(await issued_events(pool, infra, template_id))}


async def test_a_batch_issues_each_member_a_coupon_with_its_event(
    pool: asyncpg.Pool, infra: Infra
) -> None:
    template_id = await make_template(pool, Limits(total_stock=100, stock_shards=4))
    items = batch(25)
    results = await bulk(pool, template_id, items)
    assert outcomes(results) == {"issued": 25}
    assert await written(pool, infra, template_id) == {
        "coupons": 25,
        "remaining": 75,
        "counted": 0,
        "day": 0,
        "events": 25,
    }
    # Results in the order of the items, each the coupon stored under its key.
    rows = {
        r["issue_key"]: r
        for r in await pool.fetch(
            "SELECT * FROM rewards.coupons WHERE template_id = $1", template_id
        )
    }
    for item, r in zip(items, results, strict=True):
        assert r.coupon is not None
        row = rows[item.issue_key]
        assert (r.coupon.code, r.coupon.coupon_id, r.coupon.member_id) == (
            row["code"],
            str(row["id"]),
            str(item.member_id),
        )
        assert (r.coupon.expires_at, r.coupon.seq) == (T0 + timedelta(days=3), row["seq"])
        assert bytes(row["request_hash"]) == issue_hash(
            template_id, str(item.member_id), "operator_grant"
        )
    assert len({r.coupon.code for r in results if r.coupon}) == 25
    # The shards stay even: 100 over 4 is 25 each, 25 taken from the fullest first.
    shards = await pool.fetch(
        "SELECT remaining FROM rewards.coupon_stock WHERE template_id = $1", template_id
    )
    assert max(r["remaining"] for r in shards) - min(r["remaining"] for r in shards) <= 1


async def test_a_retried_batch_replays_the_same_codes_and_writes_nothing(
    pool: asyncpg.Pool, infra: Infra
) -> None:
    template_id = await make_template(pool, Limits(total_stock=10, per_member_limit=1))
    items = batch(6)
    first = await bulk(pool, template_id, items[:4])
    before = await written(pool, infra, template_id)
    # The retry carries two more items: those are issued, the four replay.
    again = await bulk(pool, template_id, items)
    assert [r.outcome for r in again] == ["replayed"] * 4 + ["issued"] * 2
    assert [r.coupon.code for r in again[:4] if r.coupon] == [
        r.coupon.code for r in first if r.coupon
    ]
    assert all(r.coupon and r.coupon.replayed for r in again[:4])
    after = await written(pool, infra, template_id)
    assert (after["coupons"], after["remaining"], after["counted"], after["events"]) == (
        before["coupons"] + 2,  # type: ignore[operator]
        before["remaining"] - 2,  # type: ignore[operator]
        6,
        6,
    )
    # A key of the batch reused for another member: refused for that item only.
    reused = await bulk(pool, template_id, [Item(uuid.uuid4(), items[0].issue_key), *batch(1)])
    assert outcomes(reused) == {"IDEMPOTENCY_KEY_REUSED": 1, "issued": 1}
    # A single issue with a batch's key and body replays the batch's coupon.
    alone = await single(pool, template_id, items[1].member_id, items[1].issue_key)
    assert alone.replayed and alone.code == first[1].coupon.code  # type: ignore[union-attr]


async def test_the_last_stock_goes_to_the_first_items_the_rest_is_refused(
    pool: asyncpg.Pool, infra: Infra
) -> None:
    template_id = await make_template(pool, Limits(total_stock=20, stock_shards=4))
    results = await bulk(pool, template_id, batch(30))
    assert [r.outcome for r in results] == ["issued"] * 20 + ["refused"] * 10
    assert {r.refusal for r in results[20:]} == {"OUT_OF_STOCK"}
    assert all(r.coupon is None for r in results[20:])
    assert await written(pool, infra, template_id) == {
        "coupons": 20,
        "remaining": 0,
        "counted": 0,
        "day": 0,
        "events": 20,
    }


async def test_per_member_limit_counts_earlier_coupons_and_repeats_in_the_batch(
    pool: asyncpg.Pool, infra: Infra
) -> None:
    template_id = await make_template(pool, Limits(total_stock=50, per_member_limit=2))
    a, b = uuid.uuid4(), uuid.uuid4()
    await single(pool, template_id, a, f"{template_id}-a0")
    items = [Item(m, f"{template_id}-{n}") for n, m in enumerate([a, b, a, b, b, a])]
    results = await bulk(pool, template_id, items)
    assert [r.refusal or r.outcome for r in results] == [
        "issued",
        "issued",
        "MEMBER_LIMIT_REACHED",
        "issued",
        "MEMBER_LIMIT_REACHED",
        "MEMBER_LIMIT_REACHED",
    ]
    counts = {
        r["member_id"]: r["issued"]
        for r in await pool.fetch(
            "SELECT member_id, issued FROM rewards.coupon_member_counts WHERE template_id = $1",
            template_id,
        )
    }
    assert counts == {a: 2, b: 2}
    assert await written(pool, infra, template_id) == {
        "coupons": 4,
        "remaining": 46,
        "counted": 4,
        "day": 0,
        "events": 4,
    }


async def test_daily_budget_is_shared_with_single_issues_and_resets_next_day(
    pool: asyncpg.Pool, infra: Infra
) -> None:
    template_id = await make_template(pool, Limits(daily_budget=5))
    await single(pool, template_id, uuid.uuid4(), f"{template_id}-s")
    results = await bulk(pool, template_id, batch(6))
    assert outcomes(results) == {"issued": 4, "DAILY_BUDGET_EXHAUSTED": 2}
    tomorrow = await bulk(pool, template_id, batch(6), now=T0 + timedelta(days=1))
    assert outcomes(tomorrow) == {"issued": 5, "DAILY_BUDGET_EXHAUSTED": 1}
    got = await written(pool, infra, template_id)
    assert (got["coupons"], got["day"], got["events"]) == (10, 10, 10)


async def test_template_state_and_members_refuse_per_item(pool: asyncpg.Pool, infra: Infra) -> None:
    template_id = await make_template(pool, Limits(total_stock=10))
    items = batch(3)
    first = await bulk(pool, template_id, items[:1])
    async with pool.acquire() as conn:
        await svc.set_template_status(conn, template_id, Status.PAUSED)
    # Paused: the item issued before still replays, the others are refused.
    paused = await bulk(pool, template_id, items)
    assert [r.refusal or r.outcome for r in paused] == ["replayed"] + ["TEMPLATE_PAUSED"] * 2
    assert paused[0].coupon and paused[0].coupon.code == first[0].coupon.code  # type: ignore[union-attr]
    draft = await make_template(pool, Limits(), status=Status.DRAFT)
    assert outcomes(await bulk(pool, draft, batch(2))) == {"TEMPLATE_DRAFT": 2}
    lapsed = await make_template(
        pool,
        Limits(),
        terms=Terms(
            name="old",
            kind=Kind.AMOUNT_OFF,
            discount_fen=100,
            valid_until=T0 - timedelta(seconds=1),
        ),
    )
    assert outcomes(await bulk(pool, lapsed, batch(2))) == {"TEMPLATE_EXPIRED": 2}
    # A claim needs a claimable template (MJ is not), as for one issue.
    claim = await bulk(pool, await make_template(pool, Limits()), batch(1), reason="claim")
    assert outcomes(claim) == {"NOT_CLAIMABLE": 1}

    open_id = await make_template(pool, Limits(total_stock=10))
    erased = uuid.uuid4()
    await pool.execute(
        "INSERT INTO rewards.erased_members (member_id, erased_at) VALUES ($1, $2)", erased, T0
    )
    mixed = [Item(erased, f"{open_id}-e"), *batch(2)]
    assert [r.refusal or r.outcome for r in await bulk(pool, open_id, mixed)] == [
        "MEMBER_ERASED",
        "issued",
        "issued",
    ]
    assert (await written(pool, infra, open_id))["remaining"] == 8


async def test_new_members_only_refuses_a_member_with_an_order(
    pool: asyncpg.Pool, infra: Infra
) -> None:
    terms = Terms(
        name="首杯半价",
        kind=Kind.FIRST_ORDER_PRICE,
        percent=50,
        cap_fen=1500,
        valid_days=3,
        new_members_only=True,
    )
    template_id = await make_template(pool, Limits(total_stock=10), terms=terms)
    regular = uuid.uuid4()
    # A settled order earning nothing: consistent for the ledger audit of other tests.
    store = await pool.fetchval("SELECT store_id FROM rewards.stores ORDER BY store_id LIMIT 1")
    await pool.execute(
        "INSERT INTO rewards.orders (id, store_id, pos_transaction_id, member_id, channel,"
        " paid_amount_fen, ordered_at, request_hash, points_earned, points_balance_after,"
        " status) VALUES ($1, $2, $3, $4, 'store', 100, $5, $6, 0, 0, 'settled')",
        uuid.uuid4(),
        store,
        uuid.uuid4().hex,
        regular,
        T0,
        bytes(32),
    )
    results = await bulk(pool, template_id, [Item(regular, f"{template_id}-r"), *batch(1)])
    assert [r.refusal or r.outcome for r in results] == ["NOT_A_NEW_MEMBER", "issued"]


async def test_malformed_batches_are_refused_whole(pool: asyncpg.Pool, infra: Infra) -> None:
    template_id = await make_template(pool, Limits(total_stock=10))
    dup = [Item(uuid.uuid4(), "k1"), Item(uuid.uuid4(), "k2"), Item(uuid.uuid4(), "k1")]
    with pytest.raises(InvalidArgument) as err:
        await bulk(pool, template_id, dup)
    assert (err.value.code, err.value.field) == ("DUPLICATE_ISSUE_KEY", "items[2].issue_key")
    with pytest.raises(InvalidArgument) as err:
        await bulk(pool, template_id, [Item(uuid.uuid4(), "ok"), Item(uuid.uuid4(), " ")])
    assert (err.value.code, err.value.field) == ("ISSUE_KEY_REQUIRED", "items[1].issue_key")
    with pytest.raises(InvalidArgument) as err:
        await bulk(pool, template_id, batch(svc.MAX_BATCH + 1))
    assert err.value.code == "BATCH_TOO_LARGE"
    with pytest.raises(InvalidArgument) as err:
        await bulk(pool, template_id, [])
    assert err.value.code == "ITEMS_REQUIRED"
    with pytest.raises(InvalidArgument) as err:
        await bulk(pool, template_id, batch(1), reason="gift")
    assert err.value.code == "UNKNOWN_REASON"
    with pytest.raises(NotFound) as missing:
        await bulk(pool, f"{template_id}-nope", batch(1))
    assert missing.value.code == "UNKNOWN_TEMPLATE"
    assert (await written(pool, infra, template_id))["coupons"] == 0


async def test_a_full_batch_of_1000_is_four_statements_inside_its_transaction(
    pool: asyncpg.Pool, infra: Infra
) -> None:
    template_id = await make_template(
        pool, Limits(total_stock=2000, per_member_limit=1, daily_budget=5000, stock_shards=16)
    )
    statements: list[str] = []

    def log(record: asyncpg.connection.LoggedQuery) -> None:
        statements.append(record.query)

    async with pool.acquire() as conn:
        conn.add_query_logger(log)
        async with conn.transaction():
            results = await svc.issue_coupons(
                conn,
                template_id=template_id,
                reason="operator_grant",
                items=batch(svc.MAX_BATCH),
                now=T0,
            )
        conn.remove_query_logger(log)
    assert outcomes(results) == {"issued": 1000}
    # BEGIN, the context read, the counters' lock, the write, COMMIT.
    assert len(statements) == 5, statements
    got = await written(pool, infra, template_id)
    assert (got["coupons"], got["remaining"], got["counted"], got["day"], got["events"]) == (
        1000,
        1000,
        1000,
        1000,
        1000,
    )


async def test_batches_racing_for_the_last_stock_issue_exactly_the_stock(
    pool: asyncpg.Pool, infra: Infra
) -> None:
    template_id = await make_template(pool, Limits(total_stock=100, stock_shards=16))
    runs = await asyncio.gather(*(bulk(pool, template_id, batch(40)) for _ in range(8)))
    counted = sum((outcomes(r) for r in runs), Counter())
    assert counted == {"issued": 100, "OUT_OF_STOCK": 220}
    assert await written(pool, infra, template_id) == {
        "coupons": 100,
        "remaining": 0,
        "counted": 0,
        "day": 0,
        "events": 100,
    }


async def test_single_and_bulk_racing_never_oversell_or_exceed_a_member(
    pool: asyncpg.Pool, infra: Infra
) -> None:
    template_id = await make_template(
        pool, Limits(total_stock=150, per_member_limit=1, stock_shards=8)
    )
    # 60 members each claimed by a single issue and by one of the batches too.
    shared = [uuid.uuid4() for _ in range(60)]
    singles = [single(pool, template_id, m, f"{template_id}-s{n}") for n, m in enumerate(shared)]
    batches = [
        bulk(
            pool,
            template_id,
            [Item(m, f"{template_id}-b{k}-{n}") for n, m in enumerate(shared[k::4])] + batch(40),
        )
        for k in range(4)
    ]
    done = await asyncio.gather(*singles, *batches, return_exceptions=True)
    single_won = [d for d in done[:60] if isinstance(d, svc.IssuedCoupon)]
    refused = [d for d in done[:60] if isinstance(d, DomainError)]
    assert len(single_won) + len(refused) == 60, [d for d in done if isinstance(d, Exception)]
    bulk_issued = sum(
        outcomes(d)["issued"] for d in done[60:] if isinstance(d, list)
    )  # every batch answered
    assert all(isinstance(d, list) for d in done[60:])
    got = await written(pool, infra, template_id)
    assert got["coupons"] == len(single_won) + bulk_issued == 150
    assert (got["remaining"], got["counted"], got["events"]) == (0, 150, 150)
    over = await pool.fetchval(
        "SELECT count(*) FROM (SELECT member_id FROM rewards.coupons WHERE template_id = $1"
        " GROUP BY member_id HAVING count(*) > 1) x",
        template_id,
    )
    assert over == 0


async def test_concurrent_retries_of_one_batch_issue_each_key_once(
    pool: asyncpg.Pool, infra: Infra
) -> None:
    template_id = await make_template(pool, Limits(total_stock=500, per_member_limit=1))
    items = batch(50)
    runs = await asyncio.gather(*(bulk(pool, template_id, items) for _ in range(6)))
    # Every copy answers each item with the same coupon; one copy issued it.
    for n in range(50):
        codes = {r[n].coupon.code for r in runs if r[n].coupon}
        assert len(codes) == 1 and all(r[n].outcome != "refused" for r in runs)
        assert sum(r[n].outcome == "issued" for r in runs) == 1
    got = await written(pool, infra, template_id)
    assert (got["coupons"], got["remaining"], got["counted"], got["events"]) == (50, 450, 50, 50)


# ---- property -------------------------------------------------------------------------

POOL_OF_MEMBERS = 6


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Limits, list[list[tuple[int, int]]], int]:
    limits = Limits(
        total_stock=draw(st.none() | st.integers(1, 40)),
        per_member_limit=draw(st.none() | st.integers(1, 4)),
        daily_budget=draw(st.none() | st.integers(1, 40)),
        stock_shards=draw(st.integers(1, 6)),
    )
    # Batches of (member index, key index): keys repeat across batches (retries).
    batches = draw(
        st.lists(
            st.lists(
                st.tuples(st.integers(0, POOL_OF_MEMBERS - 1), st.integers(0, 60)),
                min_size=1,
                max_size=25,
                unique_by=lambda t: t[1],
            ),
            min_size=1,
            max_size=5,
        )
    )
    singles = draw(st.integers(0, 8))
    return limits, batches, singles


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(scenario=scenarios(), seed=st.integers(0, 2**16))
async def test_stock_taken_equals_coupons_issued_within_every_limit(
    pool: asyncpg.Pool,
    infra: Infra,
    scenario: tuple[Limits, list[list[tuple[int, int]]], int],
    seed: int,
) -> None:
    limits, batches, n_singles = scenario
    if limits.total_stock is not None:
        limits = Limits(
            total_stock=limits.total_stock,
            per_member_limit=limits.per_member_limit,
            daily_budget=limits.daily_budget,
            stock_shards=min(limits.stock_shards, limits.total_stock),
        )
    template_id = await make_template(pool, limits)
    members = [uuid.uuid4() for _ in range(POOL_OF_MEMBERS)]
    # A key always names the same member here, so a repeat is a retry.
    key_member = {k: members[random.Random(seed + k).randrange(POOL_OF_MEMBERS)] for k in range(61)}
    calls = [
        bulk(pool, template_id, [Item(key_member[k], f"{template_id}-{k}") for _, k in b])
        for b in batches
    ] + [
        single(pool, template_id, members[n % POOL_OF_MEMBERS], f"{template_id}-s{n}")
        for n in range(n_singles)
    ]
    done = await asyncio.gather(*calls, return_exceptions=True)
    unexpected = [
        d for d in done if isinstance(d, BaseException) and not isinstance(d, DomainError)
    ]
    assert not unexpected, unexpected
    got = await written(pool, infra, template_id)
    coupons = got["coupons"]
    assert isinstance(coupons, int)
    assert got["events"] == coupons
    if limits.total_stock is not None:
        assert limits.total_stock - (got["remaining"] or 0) == coupons <= limits.total_stock
    if limits.daily_budget is not None:
        assert got["day"] == coupons <= limits.daily_budget
    per_member = Counter(
        r["member_id"]
        for r in await pool.fetch(
            "SELECT member_id FROM rewards.coupons WHERE template_id = $1", template_id
        )
    )
    if limits.per_member_limit is not None:
        assert got["counted"] == coupons
        assert max(per_member.values(), default=0) <= limits.per_member_limit
    # Every issued or replayed result names a stored coupon of its key; one
    # coupon per key however often it was sent.
    stored = {
        r["issue_key"]: r["code"]
        for r in await pool.fetch(
            "SELECT issue_key, code FROM rewards.coupons WHERE template_id = $1", template_id
        )
    }
    for b, result in zip(batches, done, strict=False):
        assert isinstance(result, list)
        for (_, k), r in zip(b, result, strict=True):
            if r.coupon is not None:
                assert stored[f"{template_id}-{k}"] == r.coupon.code
