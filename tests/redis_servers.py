"""Private redis-server processes on free loopback ports, started and stopped
by the tests that need them (the shared Redis serves other runs), stopped by
their own pids only:

- `RedisServer`: one Redis, for a test that loses or stops it;
- `RedisClusterServers`: a three-node Redis Cluster (no replicas) made with
  `redis-cli --cluster create`, for the suites that also run on a cluster.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from pathlib import Path

from redis.asyncio import Redis

from devtools import supervisor
from devtools.supervisor import free_port


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free as well, both
    below the ephemeral range (devtools.supervisor.free_port says why)."""
    for _ in range(100):
        port = free_port(ceiling=supervisor.ephemeral_low() - 10_000)
        if port + 10_000 > 65_535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _real_time_env() -> dict[str, str]:
    # Real time, as the shared Redis: redis-server does not start under
    # faketime's preload (the suite's clock-moved-ahead run).
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and "FAKETIME" not in k}


def _binary(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is not installed"
    return found


class RedisServer:
    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._extra_args = extra_args
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        # Nothing on disk: a restart starts empty, as a Redis without AOF does.
        self._process = await asyncio.create_subprocess_exec(
            _binary("redis-server"),
            *("--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no", "--loglevel", "warning"),
            *self._extra_args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=_real_time_env(),
        )
        client = Redis.from_url(self.url)
        try:
            for _ in range(200):
                try:
                    if await client.ping():
                        return
                except OSError:
                    pass
                except Exception:  # redis.ConnectionError while it starts
                    pass
                await asyncio.sleep(0.025)
        finally:
            await client.aclose()
        raise TimeoutError(f"redis-server on {self.port} did not start")

    async def stop(self) -> None:
        if self._process is None:
            return
        if self._process.returncode is None:
            self._process.kill()  # as a crash: nothing saved
        await asyncio.wait_for(self._process.wait(), 10)
        self._process = None

    async def dbsize(self) -> int:
        client = Redis.from_url(self.url)
        try:
            return int(await client.dbsize())
        finally:
            await client.aclose()

    async def flushall(self) -> None:
        """Redis loses its data (a failover to an empty replica, a restart)."""
        client = Redis.from_url(self.url)
        try:
            await client.flushall()
        finally:
            await client.aclose()


class RedisClusterServers:
    """Three cluster-mode redis-servers, each with its own temporary directory
    (its nodes.conf), made one cluster covering all 16384 slots."""

    NODES = 3

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="loyalty-redis-cluster-"))
        self.nodes: list[RedisServer] = []
        for i in range(self.NODES):
            node_dir = self._dir / f"node{i}"
            node_dir.mkdir()
            self.nodes.append(
                RedisServer(
                    free_cluster_port(),
                    extra_args=(
                        *("--cluster-enabled", "yes"),
                        *("--cluster-config-file", str(node_dir / "nodes.conf")),
                        *("--cluster-node-timeout", "5000"),
                        *("--dir", str(node_dir)),
                    ),
                )
            )
        addresses = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        # The platform's REDIS_URL for a cluster (servicekit/redis_client.py).
        self.url = f"redis+cluster://{addresses}/0"

    async def start(self) -> None:
        try:
            await asyncio.gather(*(node.start() for node in self.nodes))
            create = await asyncio.create_subprocess_exec(
                _binary("redis-cli"),
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                *("--cluster-replicas", "0", "--cluster-yes"),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=_real_time_env(),
            )
            output, _ = await asyncio.wait_for(create.communicate(), 30)
            if create.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {output.decode()[-2000:]}")
            await self._wait_ok()
        except BaseException:
            await self.stop()
            raise

    async def _wait_ok(self) -> None:
        """Every node reports cluster_state:ok (the slots are assigned and the
        nodes have met)."""
        clients = [Redis.from_url(n.url) for n in self.nodes]
        try:
            for _ in range(400):
                states = [(await c.execute_command("CLUSTER", "INFO")) for c in clients]
                if all(b"cluster_state:ok" in s for s in states):
                    return
                await asyncio.sleep(0.05)
        finally:
            for c in clients:
                await c.aclose()
        raise TimeoutError("the Redis Cluster did not reach cluster_state:ok")

    async def stop(self) -> None:
        for node in self.nodes:
            await node.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
