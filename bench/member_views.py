"""The identify and member-centre benches' repeat pattern and hit rate for the
gateway's member views (gateway/member_views.py).

`--reads-per-change N`: the load still cycles through the member pool; on
every N-th pass a member's state "changed" before its read (the load
generator bumps the member's version, as an order or a relayed event would),
so that read asks the services. N=1: every read follows a change (cold, the
cache only costs); N=2: every other read (the identify before an order, then
the next visit); 0 (default): no changes, every read after the first of each
member may be answered from the views (warm). The hit rate reported is the
gateway's own count (`gateway_member_view_reads_total`).
"""

from __future__ import annotations

import argparse
import urllib.request
from collections.abc import Awaitable, Callable

from prometheus_client.parser import text_string_to_metric_families

from devtools import supervisor
from servicekit.member_views import VERSION, views_key
from servicekit.redis_client import RedisClient


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reads-per-change",
        type=int,
        default=0,
        help="bump each member's views version every N-th pass through the pool, before its"
        " read: 1 = every read cold, 2 = half; 0 (default) = never (warm)",
    )


def check(parser_error: Callable[[str], object], args: argparse.Namespace) -> None:
    if args.reads_per_change < 0:
        parser_error("--reads-per-change must be 0 or more")


def changing(
    call: Callable[[int], Awaitable[object]],
    members: list[str],
    every: int,
    redis: RedisClient | None,
    namespace: str,
) -> Callable[[int], Awaitable[object]]:
    """`call`, with member i % len(members)'s version bumped first on every
    `every`-th pass through the pool."""
    if every <= 0 or redis is None:
        return call

    async def changed_then(i: int) -> object:
        n = i % len(members)
        if (i // len(members)) % every == 0:
            await redis.hincrby(views_key(namespace, members[n]), VERSION, 1)
        return await call(i)

    return changed_then


def view_reads(metrics_port: int) -> dict[str, float]:
    """The gateway's member-view reads so far, by "view outcome"."""
    url = f"http://{supervisor.LOOPBACK}:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return {
        f"{sample.labels['view']} {sample.labels['outcome']}": sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "gateway_member_view_reads"
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def hit_rate(before: dict[str, float], after: dict[str, float], view: str) -> dict[str, float]:
    hits = after.get(f"{view} hit", 0.0) - before.get(f"{view} hit", 0.0)
    misses = after.get(f"{view} miss", 0.0) - before.get(f"{view} miss", 0.0)
    total = hits + misses
    return {
        "hits": hits,
        "misses": misses,
        "hit_rate": round(hits / total, 3) if total else 0.0,
    }
