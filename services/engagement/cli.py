"""The operator commands of `python -m services.engagement` for parked events
(events about members this service does not know yet): list them, replay one
member's, expire old ones; and reading WeCom tasks' results now. They run against DATABASE_URL, as the service would.

  parked-list [--member ID] [--limit N]   oldest first, one JSON object a line
  parked-replay MEMBER_ID                 the member is known: replay its events
  parked-expire [--older-than-days N]     delete events parked longer than N days
  wecom-results                           settle the due WeCom sends from their
                                          tasks' results (wecom_results.py), now
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import timedelta

import httpx

from servicekit.db import Database, create_pool
from servicekit.errors import DomainError
from servicekit.redis_client import create_redis

from .domain import Clock, SystemClock
from .handlers import MAX_PAGE, EngagementHandlers
from .providers import build_providers
from .scheduler import JourneyCache
from .server import build_quiet
from .settings import EngagementSettings
from .wecom_results import build_wecom_results

COMMANDS = ("parked-list", "parked-replay", "parked-expire", "wecom-results")


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m services.engagement {command}")
    if command == "parked-list":
        parser.add_argument("--member", default="", help="one member's events only")
        parser.add_argument("--limit", type=int, default=100, help="at most this many")
    elif command == "parked-replay":
        parser.add_argument("member_id")
    elif command == "wecom-results":
        pass
    else:
        parser.add_argument("--older-than-days", type=int, default=0, help="default: the TTL")
    return parser


async def _run(command: str, args: argparse.Namespace) -> int:
    settings = EngagementSettings()
    handlers = EngagementHandlers(SystemClock(), build_quiet(settings), JourneyCache())
    pool = await create_pool(settings.database_url, 1, 2)
    db = Database(pool, "engagement", "engagement")
    try:
        if command == "wecom-results":
            return await _wecom_results(settings, db)
        if command == "parked-list":
            left, token = max(args.limit, 0), ""
            while left > 0:
                async with db.unit_of_work() as uow:
                    rows, token = await handlers.list_parked(
                        uow, args.member, min(left, MAX_PAGE), token
                    )
                for r in rows:
                    print(
                        json.dumps(
                            {
                                "id": r.id,
                                "member_id": str(r.member_id),
                                "event": r.event,
                                "attributes": r.attributes,
                                "occurred_at": r.occurred_at.isoformat(),
                                "reason": r.reason,
                                "parked_at": r.parked_at.isoformat(),
                            }
                        )
                    )
                left -= len(rows)
                if not token:
                    break
            return 0
        if command == "parked-replay":
            async with db.unit_of_work() as uow:
                replayed, enrolled = await handlers.replay_parked(uow, args.member_id)
            print(json.dumps({"replayed": replayed, "enrolled_journeys": enrolled}))
            return 0
        days = args.older_than_days or settings.engagement_parked_ttl_days
        expired = 0
        while True:
            async with db.unit_of_work() as uow:
                n = await handlers.expire_parked(uow, timedelta(days=days))
            expired += n
            if n == 0:
                break
        print(json.dumps({"expired": expired, "older_than_days": days}))
        return 0
    except DomainError as exc:
        print(json.dumps({"code": exc.code, "field": exc.field, "detail": str(exc)}))
        return 2
    finally:
        await db.close()


async def _wecom_results(
    settings: EngagementSettings, db: Database, clock: Clock | None = None
) -> int:
    """Read every due WeCom task once, as the service's periodic job does."""
    clock = clock or SystemClock()
    redis = create_redis(settings.redis_url)
    async with httpx.AsyncClient(timeout=settings.provider_timeout_seconds) as client:
        try:
            job = build_wecom_results(
                settings, db, clock, build_providers(settings, client, redis, clock)
            )
            if job is None:
                detail = "WeCom is not configured (WECOM_CORP_ID, WECOM_CORP_SECRET)"
                print(json.dumps({"detail": detail}))
                return 2
            read = 0
            while n := await job.settle_once():
                read += n
        finally:
            await redis.aclose()
    print(json.dumps({"read": read}))
    return 0


def run_command(command: str, argv: list[str]) -> int:
    return asyncio.run(_run(command, _parser(command).parse_args(argv)))
