"""Local fakes of the channel providers engagement talks to, used by the tests
and by `make run` (never deployed): WeChat subscribe messages (wechat.py, on
top of gateway/wechat_fake.py's token fake), WeCom customer contact
(wecom.py), Aliyun SMS with its delivery-report push (aliyun_sms.py) and the
generic app push contract (push.py).

Each reproduces its provider's request validation and error codes, and takes
injected faults, consumed one per request, in order:

- "expired_token": the access token answers 42001 (and stays invalid);
- "no_credit": WeChat 43101 / SMS isv.AMOUNT_NOT_ENOUGH;
- "bad_data": the provider's template-data refusal;
- "rate_limit": the provider's rate-limit code (45009, 45033, Throttling.User, 429);
- "slow": the message is taken, the answer comes after `slow_seconds`;
- "drop": the message is taken, the connection drops before the answer ends.

`ProviderFakes` serves all four on one loopback port under /wechat, /wecom,
/sms and /push; `python -m devtools.provider_fakes --port 8098` runs it.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

FAULTS = frozenset({"expired_token", "no_credit", "bad_data", "rate_limit", "slow", "drop"})


@dataclass
class Faults:
    """Faults to inject, one per request, in order."""

    queue: deque[str] = field(default_factory=deque)
    slow_seconds: float = 2.0
    # Only requests whose filter(body) is true consume a fault (None = every one).
    only: Callable[[dict[str, object]], bool] | None = None

    def add(self, *faults: str) -> None:
        for f in faults:
            if f not in FAULTS:
                raise ValueError(f"unknown fault {f!r}")
            self.queue.append(f)

    def next(self, body: dict[str, object] | None = None) -> str:
        if not self.queue:
            return ""
        if self.only is not None and body is not None and not self.only(body):
            return ""
        return self.queue.popleft()


def dropped_answer() -> StreamingResponse:
    """Start an answer and break the connection in the middle of it: the
    request was taken, the client cannot tell (httpx: RemoteProtocolError)."""

    async def body() -> AsyncIterator[bytes]:
        yield b'{"errcode": 0, '
        raise ConnectionResetError("provider fake: connection dropped")

    return StreamingResponse(
        body(), media_type="application/json", headers={"content-length": "64"}
    )


class ProviderFakes:
    """Every provider fake on one loopback port (0 picks one)."""

    def __init__(self, apps: dict[str, FastAPI], host: str = "127.0.0.1", port: int = 0) -> None:
        api = FastAPI(title="provider fakes", openapi_url=None, docs_url=None, redoc_url=None)

        @api.get("/healthz")
        async def healthz() -> dict[str, str]:
            return {"status": "ok"}

        for prefix, app in apps.items():
            api.mount(f"/{prefix}", app)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it: answers go out at once, not after
        # the client's delayed ACK (40 ms a request otherwise).
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.bind((host, port))
        self.port = int(self._sock.getsockname()[1])
        self.base_url = f"http://{host}:{self.port}"
        config = uvicorn.Config(api, log_config=None, access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    def url(self, prefix: str, path: str = "") -> str:
        return f"{self.base_url}/{prefix}{path}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("provider fakes stopped during startup")
            await asyncio.sleep(0.01)

    async def serve_forever(self) -> None:
        """Serve until SIGINT / SIGTERM (uvicorn's own signal handling)."""
        await self._server.serve(sockets=[self._sock])

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._sock.close()
