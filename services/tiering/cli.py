"""Command line of the batch: `python -m services.tiering recompute|report`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

from servicekit.db import Database, create_pool

from . import reports
from .batch import RecomputeBusy, bar, recompute
from .schema import SCHEMA
from .settings import TieringSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.tiering")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("recompute", help="recompute tiers, RFM segments and lifecycle stages")
    run.add_argument("--chunk-size", type=int, default=50_000, help="members per transaction")
    run.add_argument(
        "--as-of", type=datetime.fromisoformat, default=None,
        help="evaluate as of this time (ISO 8601 with zone; default now)",
    )  # fmt: skip
    run.add_argument(
        "--pause-ms", type=int, default=0,
        help="sleep between chunks, leaving the database to checkout traffic",
    )  # fmt: skip
    run.add_argument(
        "--workers", type=int, default=2,
        help="connections taking chunks side by side (1: one chunk at a time, gentlest)",
    )  # fmt: skip
    run.add_argument(
        "--switch-programme", action="store_true",
        help="also judge members decided under another programme afresh under"
        " TIERING_PROGRAMME_ID (once, after the brand switched programmes)",
    )  # fmt: skip
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("report", help="distribution after the latest run, with movement")
    return parser


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "recompute":
        if args.chunk_size < 1:
            print("--chunk-size must be at least 1", file=sys.stderr)
            return 2
        if args.workers < 1:
            print("--workers must be at least 1", file=sys.stderr)
            return 2
        if args.pause_ms < 0:
            print("--pause-ms must not be negative", file=sys.stderr)
            return 2
        if args.as_of is not None and args.as_of.tzinfo is None:
            print("--as-of needs a time zone, e.g. 2026-12-31T16:00:00+00:00", file=sys.stderr)
            return 2
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    settings = TieringSettings()
    workers = getattr(args, "workers", 1)
    pool = await create_pool(settings.database_url, min_size=1, max_size=max(workers, 1))
    db = Database(pool, SCHEMA, "tiering")
    try:
        if args.command == "recompute":
            try:
                result = await recompute(
                    db,
                    now=args.as_of or datetime.now(UTC),
                    chunk_size=args.chunk_size,
                    progress=None if args.quiet else bar,
                    pause=args.pause_ms / 1000,
                    workers=workers,
                    programme_id=settings.tiering_programme_id,
                    switch_programme=args.switch_programme,
                )
            except RecomputeBusy as e:
                print(str(e), file=sys.stderr)
                return 1
            if not args.quiet:
                sys.stderr.write("\n")
            print(
                f"run {result.run_id}: {result.members:,} members in {result.seconds:.1f}s"
                f" ({result.chunks} chunks); changes: tiers {result.tier_changes:,},"
                f" segments {result.segment_changes:,}, stages {result.stage_changes:,}"
            )
        async with pool.acquire() as conn:
            report = await reports.latest(conn)
        print_report(report)
        return 0
    finally:
        await db.close()


def print_report(report: reports.Report) -> None:
    if not report.run_id:
        print("no recompute has finished yet")
        return
    print(f"distribution after run {report.run_id} (as of {report.as_of:%Y-%m-%d %H:%M %Z}):")
    print(f"  {'dimension':<14} {'value':<20} {'members':>10} {'change':>9}")
    for b in report.buckets:
        print(f"  {b.dimension:<14} {b.value:<20} {b.members:>10,} {b.change:>+9,}")
