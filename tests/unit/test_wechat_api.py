"""The WeChat adapter's edges (gateway/wechat.py), against the local fake's
answers served through httpx's mock transport: token caching by an injected
clock, WeChat's failures mapped to named codes."""

from __future__ import annotations

import json

import httpx
import pytest

from gateway.wechat import WeChatApi
from gateway.wechat_fake import FakeWeChat
from servicekit.errors import DomainError

APP = "wx-test"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def through_fake(fake: FakeWeChat) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/cgi-bin/token":
            q = request.url.params
            return httpx.Response(200, json=fake.token(q["appid"], q["secret"]))
        body = json.loads(request.content)
        return httpx.Response(
            200, json=fake.phone_number(request.url.params["access_token"], body["code"])
        )

    return httpx.MockTransport(handle)


def api(transport: httpx.AsyncBaseTransport, clock: Clock, secret: str = "s" * 32) -> WeChatApi:
    return WeChatApi(
        "http://wechat.test",
        {APP: secret},
        clock=clock,
        transport=transport,
        refresh_margin_seconds=300,
    )


async def failure(call: object) -> DomainError:
    with pytest.raises(DomainError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_the_token_is_cached_until_shortly_before_it_expires() -> None:
    fake = FakeWeChat(apps={APP: "s" * 32}, token_lifetime_seconds=7200)
    clock = Clock()
    wechat = api(through_fake(fake), clock)
    assert await wechat.verified_phone(APP, fake.issue_code(APP, "13912345678")) == "+8613912345678"
    clock.now += 6800  # 7200 - 300 s of margin is 6900: still good
    await wechat.verified_phone(APP, fake.issue_code(APP, "13912345679"))
    assert fake.token_requests == 1
    clock.now += 200
    await wechat.verified_phone(APP, fake.issue_code(APP, "13912345670"))
    assert fake.token_requests == 2
    await wechat.close()


async def test_wechat_failures_are_named() -> None:
    fake = FakeWeChat(apps={APP: "s" * 32})
    clock = Clock()
    wrong_secret = api(through_fake(fake), clock, secret="t" * 32)
    err = await failure(wrong_secret.verified_phone(APP, fake.issue_code(APP, "13912345678")))
    assert (err.code, err.status.name) == ("WECHAT_UNAVAILABLE", "UNAVAILABLE")

    wechat = api(through_fake(fake), clock)
    err = await failure(wechat.verified_phone(APP, "not-a-code"))
    assert (err.code, err.field) == ("PHONE_CODE_INVALID", "code")
    err = await failure(wechat.verified_phone("wx-unknown", "c"))
    assert (err.code, err.field) == ("WECHAT_APP_NOT_CONFIGURED", "app_id")
    err = await failure(wechat.verified_phone(APP, " "))
    assert err.code == "PHONE_CODE_INVALID"

    def busy(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/cgi-bin/token":
            return httpx.Response(200, json={"access_token": "t", "expires_in": 7200})
        return httpx.Response(200, json={"errcode": -1, "errmsg": "system busy"})

    err = await failure(api(httpx.MockTransport(busy), clock).verified_phone(APP, "c"))
    assert err.code == "WECHAT_UNAVAILABLE"

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    err = await failure(api(httpx.MockTransport(down), clock).verified_phone(APP, "c"))
    assert err.code == "WECHAT_UNAVAILABLE"

    def other_app(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/cgi-bin/token":
            return httpx.Response(200, json={"access_token": "t", "expires_in": 7200})
        info = {"purePhoneNumber": "13912345678", "countryCode": "86"}
        info["watermark"] = {"appid": "wx-else"}  # type: ignore[assignment]
        return httpx.Response(200, json={"errcode": 0, "phone_info": info})

    err = await failure(api(httpx.MockTransport(other_app), clock).verified_phone(APP, "c"))
    assert err.code == "PHONE_CODE_INVALID"
    await wechat.close()
