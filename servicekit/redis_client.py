"""The asyncio Redis client every process uses: one Redis, or a Redis Cluster.

`REDIS_URL` says which. `redis://` / `rediss://` (and `unix://`) name one
Redis; `redis+cluster://host:port[,host:port...]` (`rediss+cluster://` with
TLS) names a Redis Cluster by one or more of its nodes (the client learns the
rest, and the slot map, from them). Every key the platform writes is laid out
for a cluster (docs/deploy.md "Redis Cluster": hash tags keep the keys one
command or script touches in one slot), so the same keys serve both.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import ConnectionError, MaxConnectionsError, RedisError, TimeoutError

# What every Redis-using class accepts: the two clients share the command API
# the platform uses (streams, scripts, pipelines of one slot).
RedisClient = Redis | RedisCluster

log = logging.getLogger(__name__)

# redis+cluster://a:1,b:2/ -> the plain scheme of its nodes.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

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


def is_cluster(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def _cluster_seeds(url: str) -> tuple[str, list[ClusterNode]]:
    """The first node as a plain URL (credentials, TLS, options) and the others."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes = [h.strip() for h in hosts.split(",") if h.strip()]
    if not nodes:
        raise ValueError(f"REDIS_URL {parts.scheme}:// names no cluster node")
    path = parts.path.strip("/")
    if path not in ("", "0"):
        raise ValueError("a Redis Cluster has database 0 only: REDIS_URL must not name another")
    first = (userinfo + "@" if userinfo else "") + nodes[0]
    plain = urlunsplit((CLUSTER_SCHEMES[parts.scheme], first, "", parts.query, ""))
    others = []
    for node in nodes[1:]:
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"REDIS_URL cluster node {node!r} is not host:port")
        others.append(ClusterNode(host.strip("[]"), int(port)))
    return plain, others


def create_redis(url: str) -> RedisClient:
    # Bytes in and out: stream entries carry serialized protobuf.
    if is_cluster(url):
        plain, others = _cluster_seeds(url)
        options = connection_options()
        return RedisCluster.from_url(
            plain,
            startup_nodes=others or None,
            decode_responses=False,
            health_check_interval=options["health_check_interval"],
            retry=options["retry"],
            retry_on_error=options["retry_on_error"],
        )
    return Redis.from_url(url, decode_responses=False, **connection_options())


# Set while a task holds one of a bounded client's turns.
_holding: ContextVar[bool] = ContextVar("redis_turn_held", default=False)


class _BoundedRedisCluster(RedisCluster):
    """A cluster client with at most `max_in_flight` commands under way; the
    next waits up to `wait_timeout` for one to finish. redis-py's cluster
    client has no waiting pool: past its per-node bound it refuses at once."""

    def __init__(self, *args: Any, max_in_flight: int, wait_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._wait_timeout = wait_timeout

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if _holding.get():  # a command sent by one under way (a script's load): its turn
            return await super().execute_command(*args, **kwargs)
        try:
            await asyncio.wait_for(self._in_flight.acquire(), self._wait_timeout)
        except TimeoutError:
            raise MaxConnectionsError(
                f"no Redis connection free within {self._wait_timeout}s"
            ) from None
        token = _holding.set(True)
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            _holding.reset(token)
            self._in_flight.release()


def create_bounded_redis(
    url: str, max_connections: int, timeout: float, stale_connection_retries: int = 0
) -> RedisClient:
    """The gateway's client: at most `max_connections` commands under way (one
    connection each), every command within `timeout`; a burst waits up to
    `timeout` for a free connection instead of failing. A command whose pooled
    connection fails (stale after a restart) is sent again on a new connection
    up to `stale_connection_retries` times, at once: no back-off and no retry of
    a timeout, so a hung or refusing Redis still fails fast."""
    if is_cluster(url):
        plain, others = _cluster_seeds(url)
        return _BoundedRedisCluster.from_url(
            plain,
            startup_nodes=others or None,
            max_connections=max_connections,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_in_flight=max_connections,
            wait_timeout=timeout,
            # The cluster client keeps its own retries: it reconnects and
            # re-resolves the slot map on a failed connection.
        )
    return Redis(
        connection_pool=BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), stale_connection_retries, (ConnectionError,)),
            retry_on_error=[ConnectionError],
        )
    )


def slot_of(key: str | bytes) -> int:
    """The cluster hash slot of a key (its `{tag}` when it has one)."""
    return int(key_slot(key.encode() if isinstance(key, str) else key))


def tagged(tag: str) -> str:
    """`{tag}`: every key starting with it lands in the same cluster slot."""
    return "{" + tag + "}"


async def load_scripts(redis: RedisClient, scripts: Iterable[AsyncScript]) -> None:
    """Load Lua scripts before traffic does: otherwise a burst's first calls
    all find a script missing (NOSCRIPT) and all load it, every call to every
    node of a cluster at once. On a cluster SCRIPT LOAD goes to every primary."""
    for script in scripts:
        script.sha = await redis.script_load(script.script)


async def preload_scripts(redis: RedisClient, scripts: Iterable[AsyncScript], owner: str) -> bool:
    """load_scripts at a process's start; with Redis down it only logs (the
    first call then loads them, as redis-py does on NOSCRIPT)."""
    try:
        await load_scripts(redis, scripts)
    except (RedisError, OSError) as exc:
        log.warning("%s: scripts not loaded at start: %r", owner, exc)
        return False
    return True
