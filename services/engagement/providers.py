"""The real channel providers: WeChat mini-program subscribe messages, WeCom
customer contact, Aliyun SMS and a generic HTTP app push, each speaking the
provider's own API (authentication, request shape, error codes), plus what they
share: access tokens cached in Redis for every replica, and the SMS per-phone
frequency guard.

Every provider answers a `Delivery` (channels.py). The rule for uncertain
outcomes: a request that may have reached the provider (a read time-out, a
connection dropped after sending, a 5xx from a gateway in between) is
`unknown`, never retried here (providers have no idempotency key); a request
the provider certainly refused or never received (connect error, a rate-limit
errcode) is retried with back-off.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from servicekit.redis_client import RedisClient

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


# ---- access tokens shared by replicas ---------------------------------------------


@dataclass(frozen=True)
class Token:
    value: str
    expires_at: float  # epoch seconds, of the service clock


TokenFetch = Callable[[bool], Awaitable[tuple[str, int]]]


class TokenError(Exception):
    """The provider refused to issue a token (bad app id or secret, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class TokenCache:
    """One provider access token for every replica, in Redis.

    Read from Redis; refreshed `margin` before it expires; one refresh at a
    time across replicas (a Redis lock, SET NX with a time-out): the others
    wait for the new token to appear instead of asking the provider, which
    would invalidate each other's tokens (WeChat's stable token with
    force_refresh does). `refresh(stale)` after a 40001/42001 replaces the
    token only if it is still the one that failed."""

    def __init__(
        self,
        redis: RedisClient,
        key: str,
        fetch: TokenFetch,
        clock: Clock,
        margin: timedelta = timedelta(minutes=5),
        lock_ttl: timedelta = timedelta(seconds=15),
        poll: float = 0.02,
    ) -> None:
        self._redis = redis
        self._key = key
        self._lock_key = f"{key}:lock"
        self._fetch = fetch
        self._clock = clock
        self._margin = margin.total_seconds()
        self._lock_ttl_ms = int(lock_ttl.total_seconds() * 1000)
        self._poll = poll
        self._local = asyncio.Lock()
        # This process's copy, so a send costs no Redis round trip; a token
        # another replica replaced is noticed by its 40001 (refresh reads Redis).
        self._memo: Token | None = None
        # How many tokens this replica fetched (tests, metrics).
        self.fetches = 0

    def _now(self) -> float:
        return self._clock.now().timestamp()

    async def _cached(self) -> Token | None:
        raw = await self._redis.get(self._key)
        if raw is None:
            return None
        data = json.loads(raw)
        return Token(str(data["token"]), float(data["expires_at"]))

    def _fresh(self, token: Token | None) -> bool:
        return token is not None and token.expires_at - self._margin > self._now()

    async def get(self) -> str:
        if self._memo is not None and self._fresh(self._memo):
            return self._memo.value
        async with self._local:  # one Redis read per process, not one per send
            if self._memo is not None and self._fresh(self._memo):
                return self._memo.value
            found = await self._cached()
            if found is not None and self._fresh(found):
                self._memo = found
                return found.value
            return await self._refresh_locked(found.value if found else None, force=False)

    async def refresh(self, stale: str | None, force: bool = True) -> str:
        """A token other than `stale`: the cached one if another task or replica
        already replaced it, else a new one from the provider (one replica at a time)."""
        async with self._local:  # the process's other tasks queue here
            memo = self._memo
            if memo is not None and memo.value != stale and self._fresh(memo):
                return memo.value
            return await self._refresh_locked(stale, force)

    async def _refresh_locked(self, stale: str | None, force: bool) -> str:
        # Waiting is measured on the event loop's clock (the service clock may be a fake).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._lock_ttl_ms / 1000 * 2
        while True:
            found = await self._cached()
            if found is not None and found.value != stale and self._fresh(found):
                self._memo = found
                return found.value
            me = secrets.token_hex(8)
            if await self._redis.set(self._lock_key, me, nx=True, px=self._lock_ttl_ms):
                try:
                    found = await self._cached()
                    if found is not None and found.value != stale and self._fresh(found):
                        self._memo = found
                        return found.value
                    value, expires_in = await self._fetch(force and stale is not None)
                    self.fetches += 1
                    token = Token(value, self._now() + expires_in)
                    stored = {"token": value, "expires_at": token.expires_at}
                    await self._redis.set(self._key, json.dumps(stored), ex=max(1, expires_in))
                    self._memo = token
                    return value
                finally:
                    await self._release(me)
            if loop.time() > deadline:
                raise TokenError("TOKEN_LOCK_TIMEOUT", "no replica finished refreshing")
            await asyncio.sleep(self._poll)

    async def _release(self, me: str) -> None:
        # Delete the lock only if it is still ours (it may have timed out).
        await self._redis.eval(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1])"
            " end return 0",
            1,
            self._lock_key,
            me,
        )


async def _json(reply: httpx.Response) -> dict[str, Any] | None:
    try:
        data = reply.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


# ---- WeChat mini-program subscribe message ----------------------------------------

# errcodes that mean the access token is no good: refresh once, send again.
TOKEN_ERRCODES = frozenset({40001, 40014, 42001})
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

WECOM_RETRY = frozenset({-1, 45009, 45011, 45033})


class WeComContactProvider:
    """`POST /cgi-bin/externalcontact/add_msg_template` for one external contact
    (chat_type single): text and an optional mini-program card. The answer's
    msgid is kept as the provider reference: WeCom creates a task the staff
    member confirms in their client, so the send stays `sending`
    (TASK_CREATED) and `send_result` reads per-contact outcomes later
    (get_groupmsg_send_result, wecom_results.py)."""

    channel = "wecom"

    def __init__(
        self,
        base_url: str,
        corp_id: str,
        corp_secret: str,
        client: httpx.AsyncClient,
        redis: RedisClient,
        namespace: str,
        clock: Clock,
        sender: str = "",
    ) -> None:
        self._base = base_url.rstrip("/")
        self._corp_id = corp_id
        self._secret = corp_secret
        self._client = client
        self.sender = sender
        self.tokens = TokenCache(
            redis, f"{namespace}:provider-token:wecom:{corp_id}", self._fetch, clock
        )

    async def _fetch(self, force: bool) -> tuple[str, int]:
        reply = await self._client.get(
            f"{self._base}/cgi-bin/gettoken",
            params={"corpid": self._corp_id, "corpsecret": self._secret},
        )
        data = await _json(reply) or {}
        if int(data.get("errcode", 0) or 0) != 0 or not data.get("access_token"):
            code = str(data.get("errcode", f"HTTP {reply.status_code}"))
            raise TokenError(code, f"gettoken refused: {code}")
        return str(data["access_token"]), int(data.get("expires_in", 7200))

    def body(self, m: Outbound) -> dict[str, Any]:
        p = m.payload
        out: dict[str, Any] = {"chat_type": "single", "external_userid": [m.address]}
        # The member's guide, chosen when the send was written (scheduler.py);
        # WECOM_SENDER for a send written before senders were kept.
        sender = str(p.get("sender") or self.sender)
        if sender:
            out["sender"] = sender
        if p.get("text"):
            out["text"] = {"content": p["text"]}
        card = p.get("miniprogram")
        if card:
            out["attachments"] = [{"msgtype": "miniprogram", "miniprogram": card}]
        return out

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
            lambda token: self._client.post(
                f"{self._base}/cgi-bin/externalcontact/add_msg_template",
                params={"access_token": token},
                json=self.body(message),
            ),
            classify,
        )

    async def _pages(
        self, path: str, body: dict[str, Any], rows: str, limit: int
    ) -> list[dict[str, Any]]:
        """Every page of one of WeCom's cursor-paged reads."""
        out: list[dict[str, Any]] = []
        cursor = ""
        refreshed = False
        for _ in range(1000):
            token = await self.tokens.get()
            reply = await self._client.post(
                f"{self._base}{path}",
                params={"access_token": token},
                json={**body, "limit": limit, "cursor": cursor},
            )
            data = await _json(reply) or {}
            code = int(data.get("errcode", -1) or 0)
            if code in TOKEN_ERRCODES and not refreshed:
                await self.tokens.refresh(token)
                refreshed = True
                continue
            if code != 0:
                raise TokenError(str(code), f"{path.rsplit('/', 1)[-1]}: {code}")
            out += list(data.get(rows) or [])
            cursor = str(data.get("next_cursor") or "")
            if not cursor:
                break
        return out

    async def task_senders(self, msgid: str, limit: int = 1000) -> list[str]:
        """The staff members a task was given to (`get_groupmsg_task`, every
        page): a task without a sender goes to every staff member who has the
        customer, so its results are read per sender."""
        rows = await self._pages(
            "/cgi-bin/externalcontact/get_groupmsg_task", {"msgid": msgid}, "task_list", limit
        )
        return sorted({str(r["userid"]) for r in rows if r.get("userid")})

    async def send_result(self, msgid: str, userid: str, limit: int = 500) -> list[dict[str, Any]]:
        """Per-contact outcomes of one task for one sender (status 0 not sent,
        1 sent, 2 not a friend, 3 over the contact's limit), every page. WeCom
        requires the sender's userid (40003 without it)."""
        return await self._pages(
            "/cgi-bin/externalcontact/get_groupmsg_send_result",
            {"msgid": msgid, "userid": userid},
            "send_list",
            limit,
        )

    async def task_results(self, msgid: str) -> list[dict[str, Any]]:
        """Every sender's per-contact outcomes of one task, as WeCom documents
        the reading: get_groupmsg_task for its senders, then
        get_groupmsg_send_result per sender."""
        out: list[dict[str, Any]] = []
        for userid in await self.task_senders(msgid):
            out += await self.send_result(msgid, userid)
        return out


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
        out["wecom"] = WeComContactProvider(
            s.wecom_api_base,
            s.wecom_corp_id,
            s.wecom_corp_secret.get_secret_value(),
            client,
            redis,
            ns,
            clock,
            s.wecom_sender,
        )
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
