"""A local fake of the two WeChat API calls the gateway makes (gateway/wechat.py):
`GET /cgi-bin/token` and `POST /wxa/business/getuserphonenumber`; plus the
stable token (`POST /cgi-bin/stable_token`) engagement's subscribe messages
use (devtools/provider_fakes/wechat.py serves those on top of this). For tests
and `make run` only; it answers in WeChat's shapes and errcodes.

Phone codes are single-use and expire after 5 minutes, as WeChat's do. Tests
mint them with `FakeWeChat.issue_code(app_id, phone)`; with `dev_codes=True`
(`make run`) a code `dev-<phone>` (e.g. `dev-13912345678`) is also accepted,
so a developer can bind a phone with curl. Never deploy this.

`python -m gateway.wechat_fake --port 8099` serves it; the apps come from
WECHAT_APPS (the gateway's setting: JSON app id -> app secret).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request

CODE_LIFETIME_SECONDS = 300.0


@dataclass
class FakeWeChat:
    apps: dict[str, str]
    token_lifetime_seconds: int = 7200
    dev_codes: bool = False
    clock: Callable[[], float] = time.time
    # What the fake saw, for tests: how many tokens it issued.
    token_requests: int = 0
    phone_requests: int = 0
    stable_token_requests: int = 0
    _expired: set[str] = field(default_factory=set)
    _tokens: dict[str, tuple[str, float]] = field(default_factory=dict)
    _codes: dict[str, tuple[str, str, float]] = field(default_factory=dict)

    def issue_code(self, app_id: str, phone: str) -> str:
        """What wx.getPhoneNumber gives the mini-program: a one-time code."""
        code = secrets.token_hex(16)
        self._codes[code] = (app_id, phone, self.clock() + CODE_LIFETIME_SECONDS)
        return code

    def expire_tokens(self) -> None:
        """Every issued access token stops working (WeChat errcode 40001)."""
        self._tokens.clear()

    def token(self, appid: str, secret: str) -> dict[str, Any]:
        self.token_requests += 1
        if appid not in self.apps:
            return {"errcode": 40013, "errmsg": "invalid appid"}
        if not secrets.compare_digest(self.apps[appid], secret):
            return {"errcode": 40125, "errmsg": "invalid appsecret"}
        value = f"fake-{secrets.token_hex(12)}"
        self._tokens[value] = (appid, self.clock() + self.token_lifetime_seconds)
        return {"access_token": value, "expires_in": self.token_lifetime_seconds}

    def stable_token(self, appid: str, secret: str, force_refresh: bool) -> dict[str, Any]:
        """`POST /cgi-bin/stable_token`: the app's current token while it is
        valid; a new one (the old one stops working) when forced or expired."""
        self.stable_token_requests += 1
        if appid not in self.apps:
            return {"errcode": 40013, "errmsg": "invalid appid"}
        if not secrets.compare_digest(self.apps[appid], secret):
            return {"errcode": 40125, "errmsg": "invalid appsecret"}
        now = self.clock()
        current = [(v, exp) for v, (a, exp) in self._tokens.items() if a == appid and exp > now]
        if current and not force_refresh:
            value, exp = current[-1]
            return {"access_token": value, "expires_in": int(exp - now)}
        for value, _ in current:
            del self._tokens[value]
        value = f"fake-{secrets.token_hex(12)}"
        self._tokens[value] = (appid, now + self.token_lifetime_seconds)
        return {"access_token": value, "expires_in": self.token_lifetime_seconds}

    def token_error(self, access_token: str) -> dict[str, Any] | None:
        """None when the token is good, else WeChat's answer (40001 unknown, 42001 expired)."""
        owner = self._tokens.get(access_token)
        if owner is None:
            if access_token in self._expired:
                return {"errcode": 42001, "errmsg": "access_token expired"}
            return {"errcode": 40001, "errmsg": "invalid credential, access_token is invalid"}
        if owner[1] <= self.clock():
            return {"errcode": 42001, "errmsg": "access_token expired"}
        return None

    def expire_token(self, access_token: str) -> None:
        """One token expires now (42001 from then on)."""
        if self._tokens.pop(access_token, None) is not None:
            self._expired.add(access_token)

    def app_of(self, access_token: str) -> str:
        return self._tokens[access_token][0]

    def phone_number(self, access_token: str, code: str) -> dict[str, Any]:
        self.phone_requests += 1
        owner = self._tokens.get(access_token)
        if owner is None or owner[1] <= self.clock():
            return {"errcode": 40001, "errmsg": "invalid credential, access_token is invalid"}
        app_id = owner[0]
        issued = self._codes.pop(code, None)
        if issued is None and self.dev_codes and code.startswith("dev-"):
            issued = (app_id, code.removeprefix("dev-"), self.clock() + 1)
        if issued is None or issued[2] <= self.clock():
            return {"errcode": 40029, "errmsg": "invalid code"}
        if issued[0] != app_id:
            return {"errcode": 40029, "errmsg": "invalid code"}
        phone = issued[1].removeprefix("+86")
        return {
            "errcode": 0,
            "errmsg": "ok",
            "phone_info": {
                "phoneNumber": phone,
                "purePhoneNumber": phone,
                "countryCode": "86",
                "watermark": {"timestamp": int(self.clock()), "appid": app_id},
            },
        }

    def app(self) -> FastAPI:
        api = FastAPI(title="fake WeChat API", openapi_url=None, docs_url=None, redoc_url=None)

        @api.get("/healthz")
        async def healthz() -> dict[str, str]:
            return {"status": "ok"}

        @api.get("/cgi-bin/token")
        async def token(grant_type: str = "", appid: str = "", secret: str = "") -> dict[str, Any]:
            if grant_type != "client_credential":
                return {"errcode": 40002, "errmsg": "invalid grant_type"}
            return self.token(appid, secret)

        @api.post("/cgi-bin/stable_token")
        async def stable_token(request: Request) -> dict[str, Any]:
            body = await request.json()
            if body.get("grant_type") != "client_credential":
                return {"errcode": 40002, "errmsg": "invalid grant_type"}
            return self.stable_token(
                str(body.get("appid", "")),
                str(body.get("secret", "")),
                bool(body.get("force_refresh", False)),
            )

        @api.post("/wxa/business/getuserphonenumber")
        async def phone(request: Request, access_token: str = "") -> dict[str, Any]:
            body = await request.json()
            return self.phone_number(access_token, str(body.get("code", "")))

        return api


class FakeWeChatServer:
    """The fake on a loopback port (0 picks one); `base_url` is what WECHAT_API_BASE takes."""

    def __init__(self, fake: FakeWeChat, host: str = "127.0.0.1", port: int = 0) -> None:
        self.fake = fake
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = int(self._sock.getsockname()[1])
        self.base_url = f"http://{host}:{self.port}"
        config = uvicorn.Config(fake.app(), log_config=None, access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("fake WeChat stopped during startup")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    args = parser.parse_args()
    apps = json.loads(os.environ.get("WECHAT_APPS") or "{}")
    fake = FakeWeChat(apps=apps, dev_codes=True)
    uvicorn.run(fake.app(), host=args.host, port=args.port, log_config=None)


if __name__ == "__main__":
    main()
