"""Channel adapters without a network: the Aliyun request signature against
Aliyun's published example, errcode and transport classification, settings
choosing providers, retries, rate limits and backoff."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from redis.asyncio import Redis

from devtools.provider_fakes.aliyun_sms import expected_signature
from servicekit.logs import configure_logging
from services.engagement.channels import (
    Delivery,
    LocalSink,
    NotConfigured,
    Outbound,
    RateLimiter,
    as_delivery,
    backoff,
    poll_forever,
)
from services.engagement.domain import FakeClock
from services.engagement.providers import (
    AliyunSmsProvider,
    HttpPushProvider,
    TokenError,
    WeChatSubscribeProvider,
    aliyun_signature,
    build_providers,
    parse_phone_limits,
    transport_outcome,
)
from services.engagement.scheduler_repository import WeComTask
from services.engagement.settings import EngagementSettings
from services.engagement.wecom_results import WeComResults

START = datetime(2030, 1, 1, tzinfo=UTC)
MESSAGE = Outbound("e1:3", "m1", "wecom", "cart-discount", "wm-external-1")

# Aliyun's published SendSms signature example (AccessKey testId / testSecret).
ALIYUN_EXAMPLE = {
    "AccessKeyId": "testId",
    "Action": "SendSms",
    "Format": "XML",
    "OutId": "123",
    "PhoneNumbers": "15300000001",
    "RegionId": "cn-hangzhou",
    "SignName": "阿里云短信测试专用",
    "SignatureMethod": "HMAC-SHA1",
    "SignatureNonce": "45e25e9b-0a6f-4070-8c85-2956eda1b466",
    "SignatureVersion": "1.0",
    "TemplateCode": "SMS_71390007",
    "TemplateParam": '{"customer":"test"}',
    "Timestamp": "2017-07-12T02:42:19Z",
    "Version": "2017-05-25",
}


def test_aliyun_signature_matches_the_published_example() -> None:
    assert aliyun_signature("GET", ALIYUN_EXAMPLE, "testSecret") == "zJDF+Lrzhj/ThnlvIToysFRq6t4="
    # The fake checks requests with its own implementation (Aliyun's Java sample).
    assert expected_signature("GET", ALIYUN_EXAMPLE, "testSecret") == "zJDF+Lrzhj/ThnlvIToysFRq6t4="
    assert aliyun_signature("POST", ALIYUN_EXAMPLE, "testSecret") != "zJDF+Lrzhj/ThnlvIToysFRq6t4="


def test_sms_request_carries_sign_template_params_and_the_send_key() -> None:
    client = httpx.AsyncClient()
    provider = AliyunSmsProvider(
        "https://sms.test/", "kid", "ksecret", client, FakeClock(START), "茶饮"
    )
    message = Outbound(
        "e1:3",
        "m1",
        "sms",
        "SMS_1",
        "+8613900001111",
        {"template_code": "SMS_1", "sign_name": "", "params": {"points": "300"}},
    )
    params = provider.params(message, "nonce-1", "2030-01-01T00:00:00Z")
    assert params["PhoneNumbers"] == "13900001111"
    assert (params["SignName"], params["TemplateCode"], params["OutId"]) == (
        "茶饮",
        "SMS_1",
        "e1:3",
    )
    assert params["TemplateParam"] == '{"points":"300"}'
    signature = params.pop("Signature")
    assert signature == aliyun_signature("POST", params, "ksecret")


@pytest.mark.parametrize(
    ("errcode", "status"),
    [(0, "delivered"), (43101, "no_credit"), (45009, "retry"), (-1, "retry"), (47003, "failed")],
)
def test_wechat_errcodes(errcode: int, status: str) -> None:
    got = WeChatSubscribeProvider._classify({"errcode": errcode, "errmsg": "x", "msgid": 7})
    assert got.status == status
    assert got.code == ("" if errcode == 0 else str(errcode))


def test_a_request_that_never_left_is_retried_one_that_may_have_is_unknown() -> None:
    request = httpx.Request("POST", "https://x.test")
    assert transport_outcome(httpx.ConnectError("refused", request=request)).status == "retry"
    assert transport_outcome(httpx.ReadTimeout("slow", request=request)).status == "unknown"
    dropped = httpx.RemoteProtocolError("peer closed", request=request)
    assert transport_outcome(dropped).status == "unknown"


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, "delivered"), (429, "retry"), (503, "retry"), (502, "unknown"), (400, "failed")],
)
async def test_app_push_contract(status: int, outcome: str) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer t"
        return httpx.Response(status, json={"id": "p1"})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    provider = HttpPushProvider("https://push.test", "t", client)
    message = Outbound("e1:3", "m1", "app_push", "t", "m1", {"title": "a", "body": "b"})
    assert (await provider.send(message)).status == outcome


def test_phone_limits_setting() -> None:
    assert parse_phone_limits("1/60, 5/3600,10/86400") == [(1, 60), (5, 3600), (10, 86400)]
    assert parse_phone_limits("") == []
    with pytest.raises(ValueError, match="count/seconds"):
        parse_phone_limits("5 per hour")


async def test_credentials_choose_providers_and_the_rest_fail_visibly() -> None:
    settings = EngagementSettings(sms_access_key_id="k", sms_access_key_secret="s")
    redis = Redis.from_url("redis://127.0.0.1:1/0")  # never called here
    providers = build_providers(settings, httpx.AsyncClient(), redis, FakeClock(START))
    assert isinstance(providers["sms"], AliyunSmsProvider)
    assert isinstance(providers["wecom"], NotConfigured)
    failed = await providers["wecom"].send(MESSAGE)
    assert (failed.status, failed.code) == ("failed", "CHANNEL_NOT_CONFIGURED")
    assert "s" not in repr(settings.sms_access_key_secret).replace("SecretStr", "")


async def test_local_sink_records_what_it_was_given() -> None:
    sink = LocalSink("wecom")
    assert (await sink.send(MESSAGE)).status == "delivered"
    assert list(sink.sent) == [MESSAGE]


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


def test_request_urls_carrying_tokens_are_not_logged() -> None:
    """httpx logs each request's URL (access_token, WeChat's secret) at INFO;
    the services' logging keeps it to warnings."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("httpx").level)
    try:
        configure_logging("engagement", "INFO", json=False)
        assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
        assert logging.getLogger("services").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("httpx").setLevel(saved[2])


@pytest.mark.parametrize(
    ("answer", "age_hours", "expected"),
    [
        ([{"status": 1}], 1, ("delivered", "")),
        ([{"status": 2}], 1, ("failed", "NOT_A_FRIEND")),
        ([{"status": 3}], 1, ("failed", "CONTACT_LIMIT")),
        ([{"status": 0}], 71, None),
        ([], 71, None),
        ([{"status": 0}], 72, ("failed", "NOT_SENT_BY_STAFF")),
        (TokenError("41063", "msgid not found"), 71, None),
        (TokenError("41063", "msgid not found"), 72, ("failed", "41063")),
        (httpx.ConnectError("refused"), 72, ("failed", "ConnectError")),
    ],
)
def test_a_wecom_task_result_settles_its_send(
    answer: list[dict[str, int]] | BaseException,
    age_hours: int,
    expected: tuple[str, str] | None,
) -> None:
    created = datetime(2030, 7, 3, 3, 0, tzinfo=UTC)
    job = WeComResults(None, FakeClock(created), None, task_life=timedelta(hours=72))  # type: ignore[arg-type]
    task = WeComTask("e:1", "msg1", created)
    outcome = job._settle(task, answer, created + timedelta(hours=age_hours))
    if expected is None:
        assert outcome is None  # waits, read again later
    else:
        assert outcome is not None
        assert (outcome.status, outcome.error_code, outcome.provider_ref) == (*expected, "msg1")
