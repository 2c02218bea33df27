"""Channel providers: request shapes, idempotency keys, retry classification,
rate limits and backoff (httpx MockTransport stands in for the providers)."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import timedelta

import httpx
import pytest

from services.engagement.channels import (
    IDEMPOTENCY_HEADER,
    AppPushProvider,
    Delivery,
    LocalSink,
    MiniProgramProvider,
    Outbound,
    RateLimiter,
    SmsProvider,
    WeComProvider,
    as_delivery,
    backoff,
    build_providers,
    poll_forever,
)

MESSAGE = Outbound("e1:3", "m1", "wecom", "cart-discount", "wm-external-1")


def recorder(
    status: int = 200, body: dict[str, str] | None = None
) -> tuple[list[httpx.Request], httpx.AsyncClient]:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json=body or {})

    return seen, httpx.AsyncClient(transport=httpx.MockTransport(handle))


async def test_wecom_request_shape_and_idempotency_key() -> None:
    seen, client = recorder(body={"msgid": "abc"})
    result = await WeComProvider("https://wecom.test/send", client).send(MESSAGE)
    assert result.status == "delivered" and result.provider_ref == "abc"
    request = seen[0]
    assert request.headers[IDEMPOTENCY_HEADER] == "e1:3"
    assert json.loads(request.content) == {
        "chat_type": "single",
        "external_userid": ["wm-external-1"],
        "text": {"content": "cart-discount"},
        "msgid_hint": "e1:3",
    }


async def test_other_providers_shapes() -> None:
    seen, client = recorder()
    msg = Outbound("e2:1", "m2", "sms", "SMS_1234", "13900001111")
    await SmsProvider("https://sms.test", client).send(msg)
    assert json.loads(seen[-1].content)["OutId"] == "e2:1"
    assert json.loads(seen[-1].content)["PhoneNumbers"] == "13900001111"
    await MiniProgramProvider("https://mp.test", client).send(msg)
    assert json.loads(seen[-1].content)["touser"] == "13900001111"
    await AppPushProvider("https://push.test", client).send(msg)
    assert json.loads(seen[-1].content)["idempotency_key"] == "e2:1"


@pytest.mark.parametrize(
    ("status", "outcome"), [(200, "delivered"), (429, "retry"), (503, "retry"), (400, "failed")]
)
async def test_status_classification(status: int, outcome: str) -> None:
    _, client = recorder(status)
    assert (await WeComProvider("https://wecom.test", client).send(MESSAGE)).status == outcome


async def test_transport_errors_are_retried_and_a_missing_address_fails() -> None:
    def boom(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = httpx.AsyncClient(transport=httpx.MockTransport(boom))
    provider = WeComProvider("https://wecom.test", client)
    assert (await provider.send(MESSAGE)).status == "retry"
    no_address = Outbound("e1:4", "m1", "wecom", "t", "")
    assert (await provider.send(no_address)).reason == "NO_ADDRESS"


async def test_local_sink_records_each_key_once() -> None:
    sink = LocalSink("wecom")
    await sink.send(MESSAGE)
    await sink.send(MESSAGE)
    assert list(sink.sent) == [MESSAGE]


def test_endpoints_choose_http_providers_and_the_rest_fall_back_to_the_sink() -> None:
    client = httpx.AsyncClient()
    providers = build_providers({"sms": "https://sms.test"}, client)
    assert isinstance(providers["sms"], SmsProvider)
    assert isinstance(providers["wecom"], LocalSink)


def test_backoff_doubles_up_to_the_cap() -> None:
    base, cap = timedelta(seconds=5), timedelta(minutes=1)
    assert [backoff(n, base, cap).seconds for n in (1, 2, 3, 4, 5)] == [5, 10, 20, 40, 60]


async def test_rate_limiter_spaces_sends() -> None:
    limiter = RateLimiter(50)
    loop = asyncio.get_running_loop()
    began = loop.time()
    for _ in range(60):
        await limiter.acquire()
    # 50 tokens at once, then 10 more at 50/s: at least ~0.2 s.
    assert loop.time() - began >= 0.15


def test_a_call_that_raised_is_retried() -> None:
    delivered = Delivery("delivered", provider_ref="r1")
    assert as_delivery(delivered) is delivered
    raised = as_delivery(TimeoutError("x" * 500))
    assert raised.status == "retry"
    assert raised.reason.startswith("ERROR: TimeoutError(") and len(raised.reason) == 200


async def test_poll_loop_survives_a_failing_round_and_stops_when_cancelled() -> None:
    rounds: list[int] = []

    async def step() -> int:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise RuntimeError("database blip")
        if len(rounds) == 3:
            raise asyncio.CancelledError
        return 1

    with pytest.raises(asyncio.CancelledError):
        await poll_forever(step, 0.0, logging.getLogger("test"), "worker")
    assert rounds == [0, 1, 2]
