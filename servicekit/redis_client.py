"""The asyncio Redis client every process uses."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

# A command that fails on a connection (stale after a Redis restart: "Connection
# closed by server"; a failover) reconnects and is sent again, a few times
# within about a second, before the caller sees UNAVAILABLE. Given to the
# pool's connections explicitly: Redis.from_url() does not pass the client's
# default retry on to them (redis-py 8), so every pooled connection failed
# once after a restart.
RETRIES = 3


def connection_options() -> dict[str, Any]:
    """For any pool's from_url(): a connection idle longer than
    health_check_interval is PINGed before use; a failing one reconnects and
    the command is retried."""
    return {
        "health_check_interval": 10,
        "retry": Retry(
            ExponentialBackoff(cap=0.5, base=0.05), RETRIES, (ConnectionError, TimeoutError)
        ),
        "retry_on_error": [ConnectionError, TimeoutError],
    }


def create_redis(url: str) -> Redis:
    # Bytes in and out: stream entries carry serialized protobuf.
    return Redis.from_url(url, decode_responses=False, **connection_options())
