"""The asyncio Redis client every process uses."""

from __future__ import annotations

from redis.asyncio import Redis


def create_redis(url: str) -> Redis:
    # Bytes in and out: stream entries carry serialized protobuf.
    return Redis.from_url(url, decode_responses=False, health_check_interval=30)
