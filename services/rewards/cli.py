"""The operator commands of `python -m services.rewards` (audit, expiry,
announcements, hold time-outs, unpaid mall exchanges, partitions, balance
checkpoints, CSV bulk earns): which job each name
runs, against DATABASE_URL."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from servicekit import partitions_cli
from servicekit.db import Database, create_pool, with_retries
from servicekit.errors import DomainError, print_refusal
from servicekit.settings import ServiceSettings

from .coupons.jobs import announce_expiring_coupons, expire_coupons
from .mall.jobs import release_unpaid
from .orders.handlers import RewardsHandlers
from .orders.repository import StoreRecord
from .points import bulk
from .points.audit import audit_ledger
from .points.checkpoint import write_checkpoint
from .points.earning import parse_rules
from .points.handlers import PointsLedger
from .points.jobs import announce_expiring, expire_due, void_timed_out_holds
from .server import RewardsSettings


async def _run(command: str) -> int:
    settings = ServiceSettings()
    rewards = RewardsSettings()
    points = PointsLedger(rewards.ledger_policy(), parse_rules(rewards.earning_rules))
    pool = await create_pool(settings.database_url, 1, 4)
    db = Database(pool, "rewards", "rewards")
    now = datetime.now(UTC)
    try:
        if command == "audit":
            async with pool.acquire() as conn:
                report = await audit_ledger(conn)
            print(json.dumps(asdict(report) | {"ok": report.ok}, indent=2))
            return 0 if report.ok else 1
        if command == "expire-coupons":
            print(f"{command}: {await expire_coupons(db, now)}")
            return 0
        if command == "release-unpaid-mall-exchanges":
            print(f"{command}: {await release_unpaid(db, rewards.points_mall(points), now)}")
            return 0
        if command == "announce-expiring-coupons":
            n = await announce_expiring_coupons(db, rewards.coupon_policy(), now)
            print(f"{command}: {n}")
            return 0
        jobs = {
            "expire": expire_due,
            "announce-expiring": announce_expiring,
            "void-timed-out-holds": void_timed_out_holds,
        }
        n = await jobs[command](db, points, now)
        print(f"{command}: {n}")
        return 0
    finally:
        await db.close()


def _stores_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.rewards stores",
        description="Stores are operator-managed data: create or update, close, reopen, list.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    put = sub.add_parser("put", help="create or update a store")
    put.add_argument("store_id")
    put.add_argument("--name", required=True)
    put.add_argument("--city", required=True)
    put.add_argument("--address", default="")
    put.add_argument("--time-zone", default="Asia/Shanghai")
    put.add_argument("--latitude", type=float, required=True)
    put.add_argument("--longitude", type=float, required=True)
    for action in ("close", "open"):
        sub.add_parser(action, help=f"{action} a store").add_argument("store_id")
    sub.add_parser("list", help="every store, by code")
    return parser


async def _stores(args: argparse.Namespace) -> int:
    settings = ServiceSettings()
    pool = await create_pool(settings.database_url, 1, 2)
    db = Database(pool, "rewards", "rewards")
    handlers = RewardsHandlers()
    try:
        async with db.unit_of_work() as uow:
            if args.action == "put":
                stores = [
                    await handlers.put_store(
                        uow,
                        StoreRecord(
                            store_id=args.store_id,
                            name=args.name,
                            city=args.city,
                            address=args.address,
                            latitude=Decimal(str(args.latitude)),
                            longitude=Decimal(str(args.longitude)),
                            status="active",
                            time_zone=args.time_zone,
                        ),
                    )
                ]
            elif args.action in ("close", "open"):
                status = "closed" if args.action == "close" else "active"
                stores = [await handlers.set_store_status(uow, args.store_id, status)]
            else:
                stores = await handlers.list_stores(uow)
    except DomainError as exc:
        return print_refusal(exc)
    finally:
        await db.close()
    print(json.dumps([asdict(s) for s in stores], ensure_ascii=False, indent=2, default=str))
    return 0


def _checkpoint_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.rewards checkpoint",
        description="Checkpoint every member's balance at a month boundary (monthly CronJob).",
    )
    parser.add_argument(
        "--as-of",
        type=lambda text: datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC),
        help="the month boundary, YYYY-MM-01 (default: the start of this month)",
    )
    return parser


async def _checkpoint(args: argparse.Namespace) -> int:
    settings = ServiceSettings()
    pool = await create_pool(settings.database_url, 1, 1)
    try:
        async with pool.acquire() as conn:
            written = await write_checkpoint(conn, args.as_of)
    except DomainError as exc:
        return print_refusal(exc)
    finally:
        await pool.close()
    print(json.dumps(asdict(written), indent=2, default=str))
    return 0


def _bulk_earn_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.rewards bulk-earn",
        description="Post a CSV of earns (member_id,points,reason,idempotency_key[,occurred_at])"
        " in chunks, one transaction each; safe to run again (applied lines replay).",
    )
    parser.add_argument("file", help="CSV with a header row")
    parser.add_argument("--operator", required=True, help="who posts it (journalled)")
    parser.add_argument("--chunk", type=int, default=bulk.MAX_BATCH, help="lines per transaction")
    return parser


async def _bulk_earn(args: argparse.Namespace) -> int:
    """Chunks of the file through the same use case as BulkEarnPoints; a JSON
    summary with every refused row; exit 1 when any row was refused."""
    if not 1 <= args.chunk <= bulk.MAX_BATCH:
        print(f"--chunk must be 1..{bulk.MAX_BATCH}", file=sys.stderr)
        return 2
    rewards = RewardsSettings()
    # With MEMBER_ADDR, every id is put to the member service first.
    points = rewards.points_ledger()
    pool = await create_pool(ServiceSettings().database_url, 1, 2)
    db = Database(pool, "rewards", "rewards")
    counts = {"applied": 0, "replayed": 0, "refused": 0}
    refused: list[dict[str, object]] = []

    def refuse(row: int, result: bulk.LineResult) -> None:
        counts["refused"] += 1
        refused.append({"row": row, "code": result.code, "message": result.message})

    async def post(chunk: list[bulk.CsvLine]) -> None:
        lines = [c.line for c in chunk if c.line is not None]

        async def attempt() -> list[bulk.LineResult]:
            async with db.unit_of_work() as uow:
                return await bulk.bulk_earn(
                    uow.conn, points, lines, args.operator, datetime.now(UTC)
                )

        for c, result in zip(chunk, await with_retries(attempt), strict=True):
            if result.outcome == "refused":
                refuse(c.row, result)
            else:
                counts[result.outcome] += 1

    try:
        text = await asyncio.to_thread(Path(args.file).read_text, encoding="utf-8")
        chunk: list[bulk.CsvLine] = []
        for item in bulk.read_csv(io.StringIO(text, newline="")):
            if item.refusal is not None:
                refuse(item.row, item.refusal)
                continue
            chunk.append(item)
            if len(chunk) == args.chunk:
                await post(chunk)
                chunk = []
        if chunk:
            await post(chunk)
    except DomainError as exc:
        return print_refusal(exc, **counts)
    finally:
        await db.close()
    print(json.dumps({**counts, "refused_rows": refused}, ensure_ascii=False, indent=2))
    return 1 if refused else 0


def run_job(command: str, argv: list[str]) -> int:
    if command == "bulk-earn":
        return asyncio.run(_bulk_earn(_bulk_earn_parser().parse_args(argv)))
    if command == "stores":
        return asyncio.run(_stores(_stores_parser().parse_args(argv)))
    if command == "partitions":
        return partitions_cli.run("rewards", argv)
    if command == "checkpoint":
        return asyncio.run(_checkpoint(_checkpoint_parser().parse_args(argv)))
    argparse.ArgumentParser(prog=f"python -m services.rewards {command}").parse_args(argv)
    return asyncio.run(_run(command))
