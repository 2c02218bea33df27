"""The real channel providers: WeChat mini-program subscribe messages, WeCom
customer contact, Aliyun SMS and a generic HTTP app push, each speaking the
provider's own API (authentication, request shape, error codes), plus the SMS
per-phone frequency guard. Access tokens cached in Redis for every replica are
servicekit/provider_tokens.py's; the WeCom corp calls, servicekit/wecom.py's
(shared with the guides service).

Every provider answers a `Delivery` (channels.py). The rule for uncertain
outcomes: a request that may have reached the provider (a read time-out, a
connection dropped after sending, a 5xx from a gateway in between) is
`unknown`, never retried here (providers have no idempotency key); a request
the provider certainly refused or never received (connect error, a rate-limit
errcode) is retried with back-off.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx

from servicekit.provider_tokens import TOKEN_ERRCODES, TokenCache, TokenError
from servicekit.provider_tokens import response_json as _json
from servicekit.redis_client import RedisClient
from servicekit.wecom import ADD_MSG_TEMPLATE, WECOM_RETRY, WeComCorp, msg_template_body

from .channels import Delivery, Outbound
from .domain import Clock
from .scheduler_repository import TASK_CREATED

log = logging.getLogger(__name__)

# Requests that never left this host: safe to try again.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


def transport_outcome(exc: httpx.HTTPError) -> Delivery:
    """A transport failure: retried if the request never left, else unknown."""
    name = type(exc).__name__
    if isinstance(exc, NOT_SENT):
        return Delivery("retry", reason=f"TRANSPORT: {name}", code=name)
    return Delivery("unknown", reason=f"NO_ANSWER: {name}", code=name)


# ---- WeChat mini-program subscribe message ----------------------------------------

# Over a quota or the platform busy: the message was not taken; later.
WECHAT_RETRY = frozenset({-1, 45009, 45011, 45047})


class WeChatSubscribeProvider:
    """`POST /cgi-bin/message/subscribe/send` with a stable access token
    (`POST /cgi-bin/stable_token`). The openid is the address (from the tap)."""

    channel = "miniprogram"

    def __init__(
        self,
        base_url: str,
        app_id: str,
        app_secret: str,
        client: httpx.AsyncClient,
        redis: RedisClient,
        namespace: str,
        clock: Clock,
        miniprogram_state: str = "formal",
        lang: str = "zh_CN",
    ) -> None:
        self._base = base_url.rstrip("/")
        self._app_id = app_id
        self._secret = app_secret
        self._client = client
        self._state = miniprogram_state
        self._lang = lang
        self.tokens = TokenCache(
            redis, f"{namespace}:provider-token:wechat:{app_id}", self._fetch, clock
        )

    async def _fetch(self, force: bool) -> tuple[str, int]:
        reply = await self._client.post(
            f"{self._base}/cgi-bin/stable_token",
            json={
                "grant_type": "client_credential",
                "appid": self._app_id,
                "secret": self._secret,
                "force_refresh": force,
            },
        )
        data = await _json(reply) or {}
        if not data.get("access_token"):
            code = str(data.get("errcode", f"HTTP {reply.status_code}"))
            raise TokenError(code, f"stable_token refused: {code}")
        return str(data["access_token"]), int(data.get("expires_in", 7200))

    def body(self, m: Outbound) -> dict[str, Any]:
        p = m.payload
        out: dict[str, Any] = {
            "touser": m.address,
            "template_id": p.get("template_id", m.template),
            "data": p.get("data", {}),
            "miniprogram_state": self._state,
            "lang": self._lang,
        }
        if p.get("page"):
            out["page"] = p["page"]
        return out

    async def send(self, message: Outbound) -> Delivery:
        if not message.address:
            return Delivery("failed", reason="NO_ADDRESS", code="NO_ADDRESS")
        return await _token_call(
            self.tokens,
            lambda token: self._client.post(
                f"{self._base}/cgi-bin/message/subscribe/send",
                params={"access_token": token},
                json=self.body(message),
            ),
            self._classify,
        )

    @staticmethod
    def _classify(data: dict[str, Any]) -> Delivery:
        code = int(data.get("errcode", 0) or 0)
        msg = str(data.get("errmsg", ""))[:120]
        if code == 0:
            return Delivery("delivered", provider_ref=str(data.get("msgid", "")))
        if code == 43101:
            # The member has no subscription credit left at WeChat: nothing was used.
            return Delivery("no_credit", reason=f"{code}: {msg}", code=str(code))
        if code in WECHAT_RETRY:
            return Delivery("retry", reason=f"{code}: {msg}", code=str(code))
        return Delivery("failed", reason=f"{code}: {msg}", code=str(code))


async def _token_call(
    tokens: TokenCache,
    call: Callable[[str], Awaitable[httpx.Response]],
    classify: Callable[[dict[str, Any]], Delivery],
) -> Delivery:
    """One provider call with the shared token; on a token errcode the token is
    refreshed (once, across replicas) and the call made once more: the provider
    refused the first, so nothing was sent twice."""
    try:
        token = await tokens.get()
    except TokenError as exc:
        return Delivery("retry", reason=f"TOKEN: {exc}", code=exc.code)
    except httpx.HTTPError as exc:
        return Delivery("retry", reason=f"TOKEN: {type(exc).__name__}", code="TOKEN_UNREACHABLE")
    for attempt in (1, 2):
        try:
            reply = await call(token)
        except httpx.HTTPError as exc:
            return transport_outcome(exc)
        if reply.status_code == 429:
            return Delivery("retry", reason="HTTP 429", code="HTTP_429")
        data = await _json(reply)
        if reply.status_code != 200 or data is None:
            # Something between us answered, not the provider: it may have sent.
            return Delivery(
                "unknown", reason=f"HTTP {reply.status_code}", code=f"HTTP_{reply.status_code}"
            )
        code = int(data.get("errcode", 0) or 0)
        if code in TOKEN_ERRCODES and attempt == 1:
            try:
                token = await tokens.refresh(token)
            except (TokenError, httpx.HTTPError) as exc:
                return Delivery("retry", reason=f"TOKEN: {exc!r}"[:200], code=str(code))
            continue
        if code in TOKEN_ERRCODES:
            return Delivery("retry", reason=f"{code}: token refused twice", code=str(code))
        return classify(data)
    raise AssertionError("unreachable")


# ---- WeCom customer contact --------------------------------------------------------


class WeComContactProvider:
    """`POST /cgi-bin/externalcontact/add_msg_template` for one external contact
    (chat_type single): text and an optional mini-program card. The answer's
    msgid is kept as the provider reference: WeCom creates a task the staff
    member confirms in their client, so the send stays `sending`
    (TASK_CREATED) and `send_result` reads per-contact outcomes later
    (get_groupmsg_send_result, wecom_results.py). The corp calls themselves
    (token, message task, paged reads) are servicekit/wecom.py's, shared with
    the guides service."""

    channel = "wecom"

    def __init__(self, corp: WeComCorp, sender: str = "") -> None:
        self.corp = corp
        self.tokens = corp.tokens
        self.sender = sender

    def body(self, m: Outbound) -> dict[str, Any]:
        p = m.payload
        # The member's guide, chosen when the send was written (scheduler.py);
        # WECOM_SENDER for a send written before senders were kept.
        sender = str(p.get("sender") or self.sender)
        return msg_template_body(sender, [m.address], p.get("text") or "", p.get("miniprogram"))

    async def send(self, message: Outbound) -> Delivery:
        if not message.address:
            return Delivery("failed", reason="NO_ADDRESS", code="NO_ADDRESS")
        address = message.address

        def classify(data: dict[str, Any]) -> Delivery:
            code = int(data.get("errcode", 0) or 0)
            msg = str(data.get("errmsg", ""))[:120]
            if code in WECOM_RETRY:
                return Delivery("retry", reason=f"{code}: {msg}", code=str(code))
            if code != 0:
                return Delivery("failed", reason=f"{code}: {msg}", code=str(code))
            if address in (data.get("fail_list") or []):
                # Not this sender's customer, or over WeCom's per-customer limit.
                return Delivery("failed", reason="FAIL_LIST", code="FAIL_LIST")
            # A task the staff member still has to send from their client:
            # not delivered yet (wecom_results.py reads what they did).
            return Delivery(
                "accepted", provider_ref=str(data.get("msgid", "")), reason=TASK_CREATED
            )

        return await _token_call(
            self.tokens,
            lambda token: self.corp.post(ADD_MSG_TEMPLATE, token, self.body(message)),
            classify,
        )

    async def task_senders(self, msgid: str, limit: int = 1000) -> list[str]:
        return await self.corp.task_senders(msgid, limit)

    async def send_result(self, msgid: str, userid: str, limit: int = 500) -> list[dict[str, Any]]:
        return await self.corp.send_result(msgid, userid, limit)

    async def task_results(self, msgid: str) -> list[dict[str, Any]]:
        return await self.corp.task_results(msgid)


# ---- Aliyun SMS ----------------------------------------------------------------------


def percent_encode(value: str) -> str:
    """Aliyun's POP encoding: RFC 3986 (space %20, * %2A, ~ kept)."""
    return urllib.parse.quote(value, safe="-_.~")


def aliyun_signature(method: str, params: dict[str, str], secret: str) -> str:
    """Aliyun RPC signature v1 (HMAC-SHA1): sorted, encoded query; then
    METHOD&%2F&encode(query), keyed with secret + '&', base64."""
    query = "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in sorted(params.items()))
    to_sign = f"{method}&{percent_encode('/')}&{percent_encode(query)}"
    digest = hmac.new(f"{secret}&".encode(), to_sign.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


# Codes that say the message was not taken and asking later can succeed.
SMS_RETRY = frozenset(
    {
        "isv.BUSINESS_LIMIT_CONTROL",
        "Throttling.User",
        "isp.SYSTEM_ERROR",
        "ServiceUnavailable",
        "SignatureNonceUsed",
        "InvalidTimeStamp.Expired",
    }
)


class PhoneGuard:
    """Carriers' usual per-phone limits, checked before calling the provider:
    at most N messages a minute / hour / day to one number (fixed windows of
    the service clock, in Redis so every replica counts together). The phone
    appears only hashed in the keys."""

    _SCRIPT = (
        "for i = 1, #KEYS do"
        " local v = tonumber(redis.call('GET', KEYS[i]) or '0')"
        " if v >= tonumber(ARGV[i]) then return i end end"
        " for i = 1, #KEYS do redis.call('INCR', KEYS[i])"
        " redis.call('EXPIRE', KEYS[i], ARGV[#KEYS + i]) end return 0"
    )

    def __init__(
        self, redis: RedisClient, namespace: str, limits: list[tuple[int, int]], clock: Clock
    ):
        self._redis = redis
        self._ns = namespace
        self._limits = limits  # (count, window seconds)
        self._clock = clock

    async def admit(self, phone: str) -> datetime | None:
        """None when the message may go (and it is counted), else when to try again."""
        if not self._limits:
            return None
        now = self._clock.now().timestamp()
        digest = hashlib.sha256(phone.encode()).hexdigest()[:32]
        # The phone's digest is the hash tag: the script's keys share a cluster slot.
        keys = [f"{self._ns}:sms-phone:{{{digest}}}:{w}:{int(now // w)}" for _, w in self._limits]
        args = [str(n) for n, _ in self._limits] + [str(w) for _, w in self._limits]
        hit = int(await self._redis.eval(self._SCRIPT, len(keys), *keys, *args))
        if hit == 0:
            return None
        window = self._limits[hit - 1][1]
        return datetime.fromtimestamp((now // window + 1) * window, UTC)


def parse_phone_limits(text: str) -> list[tuple[int, int]]:
    """ "1/60,5/3600,10/86400" -> [(1, 60), (5, 3600), (10, 86400)]; "" = no guard."""
    out: list[tuple[int, int]] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        count, _, window = item.partition("/")
        if not count.isdigit() or not window.isdigit() or int(window) <= 0:
            raise ValueError(f"SMS_PHONE_LIMITS: {item!r} is not count/seconds")
        out.append((int(count), int(window)))
    return out


class AliyunSmsProvider:
    """Aliyun `SendSms` (dysmsapi 2017-05-25, RPC style, signature v1), a form
    POST; OutId carries the send key so the delivery report finds the send.
    `Code: OK` means accepted: the send stays `sending` until its report."""

    channel = "sms"

    def __init__(
        self,
        endpoint: str,
        access_key_id: str,
        access_key_secret: str,
        client: httpx.AsyncClient,
        clock: Clock,
        sign_name: str,
        guard: PhoneGuard | None = None,
        region_id: str = "cn-hangzhou",
    ) -> None:
        self._endpoint = endpoint
        self._key_id = access_key_id
        self._secret = access_key_secret
        self._client = client
        self._clock = clock
        self._sign_name = sign_name
        self._guard = guard
        self._region = region_id

    def params(self, m: Outbound, nonce: str, timestamp: str) -> dict[str, str]:
        p = m.payload
        params = {
            "AccessKeyId": self._key_id,
            "Action": "SendSms",
            "Format": "JSON",
            "RegionId": self._region,
            "SignatureMethod": "HMAC-SHA1",
            "SignatureNonce": nonce,
            "SignatureVersion": "1.0",
            "Timestamp": timestamp,
            "Version": "2017-05-25",
            # Mainland numbers go without the country code.
            "PhoneNumbers": m.address.removeprefix("+86"),
            "SignName": str(p.get("sign_name") or self._sign_name),
            "TemplateCode": str(p.get("template_code", m.template)),
            "OutId": m.send_key,
        }
        if p.get("params"):
            params["TemplateParam"] = json.dumps(
                p["params"], ensure_ascii=False, separators=(",", ":")
            )
        params["Signature"] = aliyun_signature("POST", params, self._secret)
        return params

    async def send(self, message: Outbound) -> Delivery:
        if not message.address:
            return Delivery("failed", reason="NO_ADDRESS", code="NO_ADDRESS")
        if self._guard is not None:
            later = await self._guard.admit(message.address)
            if later is not None:
                return Delivery(
                    "retry", reason="PHONE_RATE_LIMITED", code="PHONE_RATE_LIMITED", retry_at=later
                )
        stamp = self._clock.now().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            reply = await self._client.post(
                self._endpoint, data=self.params(message, str(uuid.uuid4()), stamp)
            )
        except httpx.HTTPError as exc:
            return transport_outcome(exc)
        data = await _json(reply)
        if data is None or "Code" not in data:
            return Delivery(
                "unknown", reason=f"HTTP {reply.status_code}", code=f"HTTP_{reply.status_code}"
            )
        code = str(data["Code"])
        if code == "OK":
            return Delivery("accepted", provider_ref=str(data.get("BizId", "")))
        msg = str(data.get("Message", ""))[:120]
        if code in SMS_RETRY:
            return Delivery("retry", reason=f"{code}: {msg}", code=code)
        return Delivery("failed", reason=f"{code}: {msg}", code=code)


# ---- app push (a generic HTTP contract) -----------------------------------------------


class HttpPushProvider:
    """App push through a documented generic HTTP contract (docs/journeys.md,
    "App push"), not a named vendor: POST JSON {alias, title, body, page,
    message_id} with a bearer token; 2xx {"id"} = accepted; 429 and 503 = not
    accepted, retried; any other 4xx = refused; any other 5xx or no answer =
    unknown. A vendor (JPush, Getui, ...) sits behind a small relay that keeps
    this contract."""

    channel = "app_push"

    def __init__(self, endpoint: str, token: str, client: httpx.AsyncClient) -> None:
        self._endpoint = endpoint
        self._token = token
        self._client = client

    async def send(self, message: Outbound) -> Delivery:
        p = message.payload
        body = {
            "alias": message.address,
            "title": p.get("title", ""),
            "body": p.get("body", ""),
            "page": p.get("page", ""),
            "message_id": message.send_key,
        }
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            reply = await self._client.post(self._endpoint, json=body, headers=headers)
        except httpx.HTTPError as exc:
            return transport_outcome(exc)
        code = f"HTTP_{reply.status_code}"
        if reply.is_success:
            data = await _json(reply) or {}
            return Delivery("delivered", provider_ref=str(data.get("id", "")))
        if reply.status_code in (429, 503):
            return Delivery("retry", reason=f"HTTP {reply.status_code}", code=code)
        if reply.status_code >= 500:
            return Delivery("unknown", reason=f"HTTP {reply.status_code}", code=code)
        return Delivery("failed", reason=f"HTTP {reply.status_code}", code=code)


def build_providers(
    settings: Any, client: httpx.AsyncClient, redis: RedisClient, clock: Clock
) -> dict[str, Any]:
    """The provider of each channel from the engagement settings; a channel
    without credentials gets NotConfigured (its sends fail, visibly)."""
    from .channels import NotConfigured

    s = settings
    ns = s.redis_namespace
    out: dict[str, Any] = {c: NotConfigured(c) for c in ("wecom", "sms", "miniprogram", "app_push")}
    if s.wechat_app_id and s.wechat_app_secret.get_secret_value():
        out["miniprogram"] = WeChatSubscribeProvider(
            s.wechat_api_base,
            s.wechat_app_id,
            s.wechat_app_secret.get_secret_value(),
            client,
            redis,
            ns,
            clock,
            s.miniprogram_state,
        )
    if s.wecom_corp_id and s.wecom_corp_secret.get_secret_value():
        corp = WeComCorp(
            s.wecom_api_base,
            s.wecom_corp_id,
            s.wecom_corp_secret.get_secret_value(),
            client,
            redis,
            ns,
            clock,
        )
        out["wecom"] = WeComContactProvider(corp, s.wecom_sender)
    if s.sms_access_key_id and s.sms_access_key_secret.get_secret_value():
        guard = PhoneGuard(redis, ns, parse_phone_limits(s.sms_phone_limits), clock)
        out["sms"] = AliyunSmsProvider(
            s.sms_endpoint,
            s.sms_access_key_id,
            s.sms_access_key_secret.get_secret_value(),
            client,
            clock,
            s.sms_sign_name,
            guard,
            s.sms_region_id,
        )
    if s.app_push_endpoint:
        out["app_push"] = HttpPushProvider(
            s.app_push_endpoint, s.app_push_token.get_secret_value(), client
        )
    return out


def resend_unknown(settings: Any) -> frozenset[str]:
    """The channels configured to resend uncertain outcomes (default none)."""
    return frozenset(
        c
        for c in ("wecom", "sms", "miniprogram", "app_push")
        if getattr(settings, f"{c}_resend_unknown")
    )
