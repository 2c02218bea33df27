"""The console's HTTP server: uvicorn in this process, on a port of its own
(0 binds a free one: tests), TLS when a certificate is configured."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Iterator

import uvicorn

from servicekit.proxies import uvicorn_proxy_options

from .app import build
from .settings import ConsoleSettings


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: run_until_signalled owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ConsoleServer:
    def __init__(
        self, settings: ConsoleSettings, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.app = build(settings, clock=clock)
        tls = bool(settings.console_tls_certfile)
        self._server = _EmbeddedUvicorn(
            uvicorn.Config(
                self.app,
                host=settings.console_host,
                port=settings.console_port,
                log_level="warning",
                access_log=False,
                lifespan="on",
                ssl_certfile=settings.console_tls_certfile if tls else None,
                ssl_keyfile=settings.console_tls_keyfile if tls else None,
                **uvicorn_proxy_options(settings.console_trusted_proxies),
            )
        )
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.console_tls_certfile else "http"
        return f"{scheme}://{self.settings.console_host}:{self.port}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the console server stopped while starting")
            await asyncio.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task

    async def run_until_signalled(self) -> None:
        await self.start()
        print(f"console listening on {self.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.stop()
