"""`python -m services.<name> partitions ensure [--ahead N]|list|detach NAME`: a
service's time partitions (servicekit/partitions.py), the tables its
`services/<name>/partitions.py` lists. Run at start-up and every
PARTITIONS_INTERVAL_SECONDS by the service itself, daily by the CronJob; every
action is safe to repeat."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
from dataclasses import asdict

from .db import create_pool
from .errors import DomainError, NotFound, print_refusal
from .partitions import (
    PartitionedTable,
    detach_partition,
    ensure_partitions,
    list_partitions,
)
from .settings import ServiceSettings


def parser(service: str, ahead: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m services.{service} partitions",
        description="Time partitions (docs/operations.md 'Partitioned tables').",
    )
    sub = p.add_subparsers(dest="action", required=True)
    ensure = sub.add_parser(
        "ensure",
        help="make partitions ahead; move default-partition strays; drop partitions past"
        " their table's retention",
    )
    ensure.add_argument(
        "--ahead",
        type=int,
        default=ahead,
        help="months ahead (a daily table, processed_events, keeps its own days ahead)",
    )
    sub.add_parser("list", help="every partition, its range and estimated rows")
    detach = sub.add_parser("detach", help="detach one partition into the archive schema")
    detach.add_argument("partition", help="e.g. identify_requests_p202501")
    return p


async def _run(service: str, args: argparse.Namespace, tables: list[PartitionedTable]) -> int:
    settings = ServiceSettings()
    pool = await create_pool(settings.database_url, 1, 1)
    out: object
    try:
        async with pool.acquire() as conn:
            if args.action == "ensure":
                out = [asdict(await ensure_partitions(conn, t, args.ahead)) for t in tables]
            elif args.action == "list":
                out = {
                    t.qualified: [asdict(p) for p in await list_partitions(conn, t)] for t in tables
                }
            else:
                # The longest table name first: identify_requests_p… is not processed_…
                table = next(
                    (
                        t
                        for t in sorted(tables, key=lambda t: -len(t.table))
                        if args.partition.startswith(t.table + "_")
                    ),
                    None,
                )
                if table is None:
                    raise NotFound(
                        f"{args.partition} is not a partition of a partitioned {service} table",
                        code="UNKNOWN_PARTITION",
                        field="partition",
                    )
                out = {"archived": await detach_partition(conn, table, args.partition)}
    except DomainError as exc:
        return print_refusal(exc)
    finally:
        await pool.close()
    print(json.dumps(out, indent=2, default=str))
    return 0


def run(service: str, argv: list[str]) -> int:
    settings = ServiceSettings()
    module = importlib.import_module(f"services.{service}.partitions")
    tables: list[PartitionedTable] = module.partitioned_tables(settings)
    args = parser(service, settings.partitions_ahead_months).parse_args(argv)
    return asyncio.run(_run(service, args, tables))
