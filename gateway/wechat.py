"""WeChat API adapter: turns a mini-program's phone-number `code` into the
phone WeChat verified, so a phone binding is proven by WeChat rather than
declared by the mini-program backend (docs/identity.md, "Trust boundaries").

Two WeChat calls: `GET /cgi-bin/token` (an app's access token, from its app id
and app secret; cached per app until shortly before it expires, one refresh at
a time) and `POST /wxa/business/getuserphonenumber?access_token=...` with the
code (single-use, issued to the mini-program by WeChat). The endpoint is
configurable (WECHAT_API_BASE) so tests and `make run` point it at the local
fake in gateway/wechat_fake.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from servicekit.errors import InvalidArgument, PermissionDenied, Unavailable

log = logging.getLogger(__name__)

# WeChat's errcodes that mean "this access token is no longer good": drop it
# and fetch another once.
_TOKEN_EXPIRED = frozenset({40001, 40014, 42001})
# The code itself is bad: wrong, used, expired, or for another app.
_CODE_REFUSED = frozenset({40029, 40163, 40013, 41008})
MAX_CODE_LENGTH = 128


@dataclass
class _Token:
    value: str
    expires_at: float


class WeChatApi:
    """One per gateway process; `apps` maps app id -> app secret."""

    def __init__(
        self,
        base_url: str,
        apps: dict[str, str],
        *,
        timeout_seconds: float = 3.0,
        refresh_margin_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._apps = dict(apps)
        self._margin = refresh_margin_seconds
        self._clock = clock
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=timeout_seconds, transport=transport
        )
        self._tokens: dict[str, _Token] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def knows(self, app_id: str) -> bool:
        return app_id in self._apps

    async def close(self) -> None:
        await self._http.aclose()

    async def verified_phone(self, app_id: str, code: str) -> str:
        """The phone WeChat verified for this code, as `+<country><number>`."""
        code = code.strip()
        if not code or len(code) > MAX_CODE_LENGTH:
            raise InvalidArgument(
                f"code is WeChat's phone-number code (1 to {MAX_CODE_LENGTH} characters)",
                code="PHONE_CODE_INVALID",
                field="code",
            )
        if app_id not in self._apps:
            raise PermissionDenied(
                f"app {app_id} has no WeChat credentials here: its phone codes cannot be checked",
                code="WECHAT_APP_NOT_CONFIGURED",
                field="app_id",
            )
        for attempt in range(2):
            token = await self._token(app_id)
            reply = await self._request(
                "POST",
                "/wxa/business/getuserphonenumber",
                params={"access_token": token},
                json={"code": code},
            )
            errcode = int(reply.get("errcode", 0) or 0)
            if errcode in _TOKEN_EXPIRED and attempt == 0:
                # Another process may have refreshed it (WeChat keeps one per app).
                self._tokens.pop(app_id, None)
                continue
            if errcode in _CODE_REFUSED:
                raise InvalidArgument(
                    "WeChat refused this phone code (wrong, used or expired): ask the member "
                    "to authorise the phone again",
                    code="PHONE_CODE_INVALID",
                    field="code",
                )
            if errcode != 0:
                log.warning("WeChat getuserphonenumber errcode %s for app %s", errcode, app_id)
                raise _unavailable()
            return _phone_of(reply, app_id)
        raise _unavailable()

    async def _token(self, app_id: str) -> str:
        cached = self._tokens.get(app_id)
        if cached is not None and cached.expires_at > self._clock():
            return cached.value
        lock = self._locks.setdefault(app_id, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(app_id)
            if cached is not None and cached.expires_at > self._clock():
                return cached.value  # another request refreshed it meanwhile
            reply = await self._request(
                "GET",
                "/cgi-bin/token",
                params={
                    "grant_type": "client_credential",
                    "appid": app_id,
                    "secret": self._apps[app_id],
                },
            )
            value = reply.get("access_token")
            if not isinstance(value, str) or not value:
                # Our credentials are wrong: an operator must fix the Secret.
                log.error("WeChat refused the credentials of app %s: %s", app_id, reply)
                raise _unavailable()
            lifetime = float(reply.get("expires_in", 7200))
            self._tokens[app_id] = _Token(
                value, self._clock() + max(lifetime - self._margin, lifetime / 2)
            )
            return value

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, **kwargs)
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("WeChat %s %s failed: %s", method, path, exc)
            raise _unavailable() from None
        if not isinstance(body, dict):
            raise _unavailable()
        return body


def _unavailable() -> Unavailable:
    return Unavailable(
        "WeChat could not verify the phone now; retry later", code="WECHAT_UNAVAILABLE"
    )


def _phone_of(reply: dict[str, Any], app_id: str) -> str:
    info = reply.get("phone_info")
    if not isinstance(info, dict):
        raise _unavailable()
    watermark = info.get("watermark") or {}
    if isinstance(watermark, dict) and watermark.get("appid") not in (None, app_id):
        # A code of another app: the phone was proven to that app, not this one.
        raise InvalidArgument(
            "this phone code was issued to another app",
            code="PHONE_CODE_INVALID",
            field="code",
        )
    number = str(info.get("purePhoneNumber") or "")
    country = str(info.get("countryCode") or "86")
    if not number.isdigit() or not country.isdigit():
        raise _unavailable()
    return f"+{country}{number}"
