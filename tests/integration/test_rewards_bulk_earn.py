"""Bulk earn (points/bulk.py, the BulkEarnPoints RPC's use case) against real
PostgreSQL: per-line outcomes, a re-sent batch that applies nothing twice,
mixed valid and invalid lines, merged ids credited to their survivor, lazy
expiry before crediting, batches racing each other and single earns on the
same members (no lost update), and the audit after each scenario.

The use case is called inside a unit of work, as the servicer does, with an
explicit clock."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from servicekit.db import Database, with_retries
from servicekit.errors import InvalidArgument
from services.rewards import cli, members, merges
from services.rewards.points.bulk import MAX_BATCH, EarnLine, LineResult, bulk_earn, read_csv
from services.rewards.points.domain import LedgerPolicy, ShortfallPolicy
from services.rewards.points.handlers import PointsLedger

from ..harness import Infra
from .test_rewards_ledger import DAYS30, Ledger, assert_audit, balance, new_member

T0 = datetime(2025, 3, 1, 4, 0, tzinfo=UTC)
DB_POOL_MAX = 16


async def post(
    db: Database, lines: list[EarnLine], now: datetime = T0, operator: str = "ops-1"
) -> list[LineResult]:
    points = PointsLedger(DAYS30)

    async def attempt() -> list[LineResult]:
        async with db.unit_of_work() as uow:
            return await bulk_earn(uow.conn, points, lines, operator, now)

    result: list[LineResult] = await with_retries(attempt)
    return result


def line(member: str, points: int, key: str | None = None, **kw: object) -> EarnLine:
    return EarnLine(
        member_id=member,
        points=points,
        reason=str(kw.get("reason", "offline upload 2025-03")),
        idempotency_key=key or f"k-{uuid.uuid4().hex}",
        occurred_at=kw.get("occurred_at", T0 - timedelta(hours=1)),  # type: ignore[arg-type]
    )


async def journal_count(conn: asyncpg.Connection, *members_: str) -> int:
    n: int = await conn.fetchval(
        "SELECT count(*) FROM rewards.points_transactions WHERE member_id = ANY($1::uuid[])",
        [uuid.UUID(m) for m in members_],
    )
    return n


async def test_a_batch_applies_once_and_a_resent_batch_replays(
    db: Database, conn: asyncpg.Connection
) -> None:
    a, b = new_member(), new_member()
    lines = [line(a, 100), line(b, 40), line(a, 25)]
    first = await post(db, lines)
    assert [r.outcome for r in first] == ["applied"] * 3
    # Running balance per member, line by line.
    assert [r.available for r in first] == [100, 40, 125]
    assert (await balance(conn, a))["available"] == 125
    again = await post(db, lines, now=T0 + timedelta(minutes=5))
    assert [r.outcome for r in again] == ["replayed"] * 3
    assert [r.transaction_id for r in again] == [r.transaction_id for r in first]
    assert (await balance(conn, a))["available"] == 125
    assert (await balance(conn, b))["available"] == 40
    assert await journal_count(conn, a, b) == 3
    # One lot per line, earned when the line says, expiring from then.
    lots = await conn.fetch(
        "SELECT points, earned_at, expires_at FROM rewards.points_lots WHERE member_id = $1"
        " ORDER BY points",
        uuid.UUID(a),
    )
    assert [r["points"] for r in lots] == [25, 100]
    assert all(r["earned_at"] == T0 - timedelta(hours=1) for r in lots)
    assert all(r["expires_at"] == T0 - timedelta(hours=1) + timedelta(days=30) for r in lots)
    lifetime = await conn.fetchval(
        "SELECT lifetime_earned FROM rewards.points_balances WHERE member_id = $1", uuid.UUID(a)
    )
    assert lifetime == 125
    await assert_audit(conn, a, b)


async def test_lines_without_a_time_earn_now_and_replay_later(
    db: Database, conn: asyncpg.Connection
) -> None:
    member = new_member()
    lines = [line(member, 12, occurred_at=None), line(member, 3, occurred_at=None)]
    assert [r.outcome for r in await post(db, lines)] == ["applied", "applied"]
    earned = await conn.fetch(
        "SELECT earned_at FROM rewards.points_lots WHERE member_id = $1", uuid.UUID(member)
    )
    assert {r["earned_at"] for r in earned} == {T0}
    # The retry comes an hour later: still the same lines.
    again = await post(db, lines, now=T0 + timedelta(hours=1))
    assert [r.outcome for r in again] == ["replayed", "replayed"]
    assert (await balance(conn, member))["available"] == 15
    await assert_audit(conn, member)


async def test_mixed_lines_apply_the_valid_and_refuse_the_rest_by_code(
    db: Database, conn: asyncpg.Connection
) -> None:
    good, erased, reused = new_member(), new_member(), new_member()
    async with db.unit_of_work() as uow:
        await members.record_erasure(uow.conn, [uuid.UUID(erased)], T0 - timedelta(days=1))
    await post(db, [line(reused, 10, key="shared-" + reused)])
    results = await post(
        db,
        [
            line(good, 50),
            line("not-a-member", 10),
            line(good, 0),
            line(good, 10, reason=" "),
            line(good, 10, occurred_at=T0 + timedelta(days=1)),
            line(good, 10, occurred_at=T0 - timedelta(days=31)),
            line(erased, 10),
            line(reused, 11, key="shared-" + reused),
            line(good, 7),
        ],
    )
    assert [(r.outcome, r.code) for r in results] == [
        ("applied", ""),
        ("refused", "INVALID_MEMBER_ID"),
        ("refused", "INVALID_POINTS"),
        ("refused", "REASON_REQUIRED"),
        ("refused", "INVALID_OCCURRED_AT"),
        ("refused", "EARN_ALREADY_EXPIRED"),
        ("refused", "MEMBER_ERASED"),
        ("refused", "IDEMPOTENCY_KEY_REUSED"),
        ("applied", ""),
    ]
    assert all(r.message for r in results if r.outcome == "refused")
    assert (await balance(conn, good))["available"] == 57
    assert (await balance(conn, reused))["available"] == 10
    # Nothing at all was written for the erased member.
    assert await journal_count(conn, erased) == 0
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM rewards.points_balances WHERE member_id = $1", uuid.UUID(erased)
        )
        == 0
    )
    await assert_audit(conn, good, erased, reused)


async def test_whole_batch_errors_write_nothing(db: Database, conn: asyncpg.Connection) -> None:
    member = new_member()
    with pytest.raises(InvalidArgument) as caught:
        await post(db, [line(member, 5, key="same"), line(member, 6, key="same")])
    assert caught.value.code == "DUPLICATE_IDEMPOTENCY_KEY"
    assert caught.value.field == "lines[1].idempotency_key"
    for size in (0, MAX_BATCH + 1):
        with pytest.raises(InvalidArgument) as caught:
            await post(db, [line(member, 1) for _ in range(size)])
        assert caught.value.code == "INVALID_BATCH_SIZE"
    with pytest.raises(InvalidArgument) as caught:
        await post(db, [line(member, 5)], operator="")
    assert caught.value.code == "OPERATOR_ID_REQUIRED"
    assert await journal_count(conn, member) == 0


async def test_an_absorbed_id_is_credited_to_its_survivor(
    db: Database, conn: asyncpg.Connection
) -> None:
    survivor, absorbed = new_member(), new_member()
    async with db.unit_of_work() as uow:
        await merges.record_merge(
            uow.conn, str(uuid.uuid4()), uuid.UUID(absorbed), uuid.UUID(survivor), T0
        )
    results = await post(db, [line(absorbed, 30), line(survivor, 5)])
    assert [(r.outcome, r.member_id) for r in results] == [
        ("applied", survivor),
        ("applied", survivor),
    ]
    assert (await balance(conn, survivor))["available"] == 35
    assert (await balance(conn, absorbed))["available"] == 0
    await assert_audit(conn, survivor, absorbed)


async def test_due_lots_expire_before_the_batch_credits(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger, member = Ledger(db), new_member()
    await ledger.earn(member, 2_000, T0)  # 20 points, lapse on day 30
    later = T0 + timedelta(days=40)
    [result] = await post(db, [line(member, 8, occurred_at=later)], now=later)
    assert result.available == 8
    kinds = await conn.fetch(
        "SELECT kind, amount FROM rewards.points_transactions WHERE member_id = $1 ORDER BY seq",
        uuid.UUID(member),
    )
    assert [(r["kind"], r["amount"]) for r in kinds] == [("earn", 20), ("expire", 20), ("earn", 8)]
    await assert_audit(conn, member)


async def test_bulk_credits_repay_debt_first(db: Database, conn: asyncpg.Connection) -> None:
    ledger = Ledger(db, LedgerPolicy(expiry=DAYS30.expiry, shortfall=ShortfallPolicy.DEBT))
    member, txn = new_member(), f"S-{uuid.uuid4().hex[:12]}"
    await ledger.earn(member, 10_000, T0, txn=txn)  # 100
    now = T0 + timedelta(days=1)
    await ledger.call("redeem", member, 80, "s-" + member, "", now)
    await ledger.call("refund_order", "SH001", txn, txn + "-r", 10_000, now)
    assert (await balance(conn, member))["debt"] == 80
    # 50 repays 50; of the next 50, 30 repays the rest and 20 is spendable.
    results = await post(
        db, [line(member, 50, occurred_at=now), line(member, 50, occurred_at=now)], now=now
    )
    assert [r.available for r in results] == [0, 20]
    assert await balance(conn, member) == {"available": 20, "pending": 0, "held": 0, "debt": 0}
    lots = await conn.fetch(
        "SELECT l.points FROM rewards.points_lots l JOIN rewards.points_transactions t"
        " ON t.id = l.transaction_id WHERE t.idempotency_key LIKE 'bulk_earn:%'"
        " AND l.member_id = $1",
        uuid.UUID(member),
    )
    assert [r["points"] for r in lots] == [20]
    await assert_audit(conn, member)


async def test_batches_and_single_earns_on_the_same_members_lose_nothing(
    db: Database, conn: asyncpg.Connection
) -> None:
    ledger = Ledger(db)
    people = [new_member() for _ in range(5)]
    batches = [
        # Members in different orders per batch: the locks are taken sorted.
        [line(m, 10 + b) for m in (people if b % 2 else list(reversed(people)))]
        for b in range(6)
    ]

    async def single(m: str, n: int) -> None:
        await ledger.call("adjust", m, 3, "ops-2", "goodwill", f"s-{m}-{n}", T0)

    await asyncio.gather(
        *(post(db, batch) for batch in batches),
        *(single(m, n) for m in people for n in range(4)),
        # A re-sent batch racing its first send applies once.
        post(db, batches[0]),
    )
    expected = sum(10 + b for b in range(6)) + 4 * 3
    for m in people:
        assert (await balance(conn, m))["available"] == expected
    assert await journal_count(conn, *people) == len(people) * (6 + 4)
    await assert_audit(conn, *people)


def test_a_csv_upload_reads_into_lines_and_names_bad_rows() -> None:
    member = new_member()
    rows = [
        "member_id,points,reason,idempotency_key,occurred_at",
        f"{member},12,upload A,a-1,2025-03-01T09:00:00+08:00",
        f"{member},twelve,upload A,a-2,",
        f"{member},5,upload A,a-3,yesterday",
        f"{member},5,upload A,a-4,",
    ]
    read = list(read_csv(rows))
    assert [r.row for r in read] == [1, 2, 3, 4]
    first = read[0].line
    assert first is not None and first.points == 12
    assert first.occurred_at == datetime(2025, 3, 1, 1, 0, tzinfo=UTC)
    assert [r.refusal.code if r.refusal else None for r in read] == [
        None,
        "INVALID_POINTS",
        "INVALID_OCCURRED_AT",
        None,
    ]
    assert read[3].line is not None and read[3].line.occurred_at is None
    with pytest.raises(InvalidArgument) as caught:
        list(read_csv(["member,points", "x,1"]))
    assert caught.value.code == "INVALID_CSV_HEADER"


async def test_the_cli_posts_a_csv_in_chunks_and_a_rerun_replays(
    infra: Infra,
    conn: asyncpg.Connection,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DATABASE_URL", infra.database_url)
    member, other = new_member(), new_member()
    upload = tmp_path / "earns.csv"
    upload.write_text(
        "member_id,points,reason,idempotency_key,occurred_at\n"
        + "".join(f"{member},{n},store upload,u-{member}-{n},\n" for n in range(1, 6))
        + f"{other},x,store upload,u-{other},\n",
        encoding="utf-8",
    )
    argv = [str(upload), "--operator", "ops-csv", "--chunk", "2"]
    assert await cli._bulk_earn(cli._bulk_earn_parser().parse_args(argv)) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["applied"], report["replayed"], report["refused"]) == (5, 0, 1)
    assert report["refused_rows"][0]["row"] == 6
    assert report["refused_rows"][0]["code"] == "INVALID_POINTS"
    assert (await balance(conn, member))["available"] == 15
    assert await cli._bulk_earn(cli._bulk_earn_parser().parse_args(argv)) == 1
    again = json.loads(capsys.readouterr().out)
    assert (again["applied"], again["replayed"]) == (0, 5)
    assert (await balance(conn, member))["available"] == 15
    await assert_audit(conn, member, other)


async def test_a_batch_cut_off_before_commit_leaves_nothing_and_applies_when_resent(
    db: Database, conn: asyncpg.Connection
) -> None:
    member = new_member()
    lines = [line(member, 9), line(member, 4)]

    class Crash(Exception):
        pass

    with pytest.raises(Crash):
        async with db.unit_of_work() as uow:
            await bulk_earn(uow.conn, PointsLedger(DAYS30), lines, "ops-1", T0)
            raise Crash  # the process dies between the posting and the commit
    assert await journal_count(conn, member) == 0
    keys = await conn.fetchval(
        "SELECT count(*) FROM rewards.ledger_requests WHERE idempotency_key = ANY($1::text[])",
        [f"bulk_earn:{x.idempotency_key}" for x in lines],
    )
    assert keys == 0
    assert [r.outcome for r in await post(db, lines)] == ["applied", "applied"]
    assert (await balance(conn, member))["available"] == 13
    await assert_audit(conn, member)
