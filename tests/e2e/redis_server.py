"""A private redis-server on a free loopback port, started and stopped by the
test that needs to lose or stop Redis (the shared one serves other runs).
Stopped by its own pid only."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket

from redis.asyncio import Redis


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        # Nothing on disk: a restart starts empty, as a Redis without AOF does.
        self._process = await asyncio.create_subprocess_exec(
            binary,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no", "--loglevel", "warning"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            # Real time, as the shared Redis: redis-server does not start under
            # faketime's preload (the suite's clock-moved-ahead run).
            env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and "FAKETIME" not in k},
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
