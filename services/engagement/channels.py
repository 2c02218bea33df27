"""Channel providers and the dispatcher that delivers committed sends.

A send row is written by the scheduler (with its cap reservation) before any
provider is called. The dispatcher leases pending rows, calls the provider
with the send key as the idempotency key, and records the outcome. A crash
between the provider call and the status update leaves the lease to expire;
the retry carries the same key, so the provider drops the duplicate: each
send is effectively once.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import httpx

from servicekit.db import Connection, Database

from . import facts_repository as facts_repo
from . import scheduler_repository as scheduler_repo
from .domain import DAILY_CAPS, Clock, consent_refusal

log = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"


@dataclass(frozen=True)
class Outbound:
    send_key: str
    member_id: str
    channel: str
    template: str
    address: str


@dataclass(frozen=True)
class Delivery:
    status: str  # delivered | retry | failed
    provider_ref: str = ""
    reason: str = ""


class Provider(Protocol):
    channel: str

    async def send(self, message: Outbound) -> Delivery: ...


class AddressPort(Protocol):
    """Where a message to a member goes on a channel, asked at send time from
    the service that holds it (engagement keeps no phone numbers)."""

    channels: frozenset[str]

    async def resolve(self, member_id: str, channel: str, send_key: str) -> str | Delivery:
        """The address, or the outcome for the send (failed / retry) when there is none."""
        ...


class HttpProvider:
    """Calls a configurable endpoint in the provider's request shape.
    2xx delivered; 408/429/5xx and transport errors are retried; other 4xx fail."""

    channel = ""

    def __init__(self, endpoint: str, client: httpx.AsyncClient) -> None:
        self._endpoint = endpoint
        self._client = client

    def body(self, m: Outbound) -> dict[str, Any]:
        raise NotImplementedError

    async def send(self, message: Outbound) -> Delivery:
        if not message.address:
            return Delivery("failed", reason="NO_ADDRESS")
        try:
            reply = await self._client.post(
                self._endpoint,
                json=self.body(message),
                headers={IDEMPOTENCY_HEADER: message.send_key},
            )
        except httpx.HTTPError as exc:
            return Delivery("retry", reason=f"TRANSPORT: {type(exc).__name__}")
        if reply.is_success:
            ref = ""
            try:
                data = reply.json()
                ref = str(data.get("msgid") or data.get("BizId") or data.get("id") or "")
            except ValueError:
                pass
            return Delivery("delivered", provider_ref=ref)
        if reply.status_code in (408, 429) or reply.status_code >= 500:
            return Delivery("retry", reason=f"HTTP {reply.status_code}")
        return Delivery("failed", reason=f"HTTP {reply.status_code}")


class WeComProvider(HttpProvider):
    """WeCom "add_msg_template" to one external contact."""

    channel = "wecom"

    def body(self, m: Outbound) -> dict[str, Any]:
        return {
            "chat_type": "single",
            "external_userid": [m.address],
            "text": {"content": m.template},
            "msgid_hint": m.send_key,
        }


class SmsProvider(HttpProvider):
    """An Aliyun-style SendSms request; OutId carries the idempotency key."""

    channel = "sms"

    def body(self, m: Outbound) -> dict[str, Any]:
        return {
            "PhoneNumbers": m.address,
            "SignName": "loyalty",
            "TemplateCode": m.template,
            "TemplateParam": "{}",
            "OutId": m.send_key,
        }


class MiniProgramProvider(HttpProvider):
    """WeChat subscribeMessage.send (a credit was spent when the send was written)."""

    channel = "miniprogram"

    def body(self, m: Outbound) -> dict[str, Any]:
        return {"touser": m.address, "template_id": m.template, "page": "pages/index", "data": {}}


class AppPushProvider(HttpProvider):
    channel = "app_push"

    def body(self, m: Outbound) -> dict[str, Any]:
        return {"to": m.address, "template": m.template, "idempotency_key": m.send_key}


class LocalSink:
    """What `make run` uses when no endpoint is configured: records and logs
    what would have been sent, deduplicating by idempotency key like a provider."""

    def __init__(self, channel: str, keep: int = 1000) -> None:
        self.channel = channel
        self.sent: deque[Outbound] = deque(maxlen=keep)
        self._keys: set[str] = set()

    async def send(self, message: Outbound) -> Delivery:
        if message.send_key not in self._keys:
            self._keys.add(message.send_key)
            self.sent.append(message)
            log.info(
                "local sink: would send %s template=%s to member=%s",
                message.channel,
                message.template,
                message.member_id,
            )
        return Delivery("delivered", provider_ref=f"sink:{message.send_key}")


PROVIDERS: dict[str, type[HttpProvider]] = {
    "wecom": WeComProvider,
    "sms": SmsProvider,
    "miniprogram": MiniProgramProvider,
    "app_push": AppPushProvider,
}


class RateLimiter:
    """Token bucket per channel (providers throttle senders; stay under it)."""

    def __init__(self, per_second: float) -> None:
        self._rate = per_second
        self._tokens = per_second
        self._last = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        if self._rate <= 0:
            return
        async with self._lock:
            loop = asyncio.get_running_loop()
            while True:
                now = loop.time()
                self._tokens = min(self._rate, self._tokens + (now - self._last) * self._rate)
                self._last = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self._rate)


def backoff(attempts: int, base: timedelta, cap: timedelta) -> timedelta:
    return min(cap, base * (2 ** max(0, attempts - 1)))


def as_delivery(outcome: Delivery | BaseException) -> Delivery:
    """A call that raised counts as a transient failure, retried with backoff."""
    if isinstance(outcome, BaseException):
        return Delivery("retry", reason=f"ERROR: {outcome!r}"[:200])
    return outcome


async def poll_forever(
    step: Callable[[], Awaitable[int]], poll_interval: float, logger: logging.Logger, what: str
) -> None:
    """Run `step` back to back while it finds work; sleep when it finds none or fails."""
    while True:
        try:
            n = await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("%s failed; retrying", what)
            n = 0
        if n == 0:
            await asyncio.sleep(poll_interval)


class Dispatcher:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        providers: dict[str, Provider],
        rate_per_second: dict[str, float],
        batch_size: int = 200,
        lease: timedelta = timedelta(seconds=60),
        max_attempts: int = 5,
        retry_base: timedelta = timedelta(seconds=5),
        retry_cap: timedelta = timedelta(minutes=10),
        resolver: AddressPort | None = None,
        caps: dict[str, int] | None = None,
    ) -> None:
        self._db = db
        # The capped classes: a send suppressed at delivery gives its slot back.
        self._caps = caps if caps is not None else DAILY_CAPS
        self._clock = clock
        self.providers = providers
        self._resolver = resolver
        self._limits = {c: RateLimiter(r) for c, r in rate_per_second.items()}
        self._batch = batch_size
        self._lease = lease
        self._max_attempts = max_attempts
        self._retry_base = retry_base
        self._retry_cap = retry_cap

    async def dispatch_once(self) -> int:
        now = self._clock.now()
        async with self._db.unit_of_work() as uow:
            leased = await scheduler_repo.lease_pending_sends(
                uow.conn, now, now + self._lease, self._batch
            )
            # Consent as it is now, not as it was when the send was written: a
            # send that waited (quiet hours, a retry's back-off) does not go
            # after the member refused the channel.
            rows = await self._drop_refused(uow.conn, leased, now)
            ids = list({r.member_id for r in rows if r.member_id is not None})
            addresses = await facts_repo.addresses(uow.conn, ids) if ids else {}
        if not leased:
            return 0
        if not rows:
            return len(leased)
        deliveries = await asyncio.gather(
            *(self._deliver(r, addresses) for r in rows), return_exceptions=True
        )
        done = self._clock.now()
        results: list[tuple[str, str, str, str, Any]] = []
        for row, outcome in zip(rows, deliveries, strict=True):
            d = as_delivery(outcome)
            if d.status == "retry" and row.attempts < self._max_attempts:
                nxt = done + backoff(row.attempts, self._retry_base, self._retry_cap)
                results.append((row.send_key, "pending", d.reason, d.provider_ref, nxt))
            else:
                status = "delivered" if d.status == "delivered" else "failed"
                results.append((row.send_key, status, d.reason, d.provider_ref, None))
        async with self._db.unit_of_work() as uow:
            await scheduler_repo.record_deliveries(uow.conn, results, done)
        return len(rows)

    async def _drop_refused(
        self, conn: Connection, rows: list[scheduler_repo.OutboundRow], now: datetime
    ) -> list[scheduler_repo.OutboundRow]:
        """Record as suppressed (NO_CONSENT) the leased sends the member's
        consent no longer allows, giving back what they held: the day's cap
        slot and a mini-program subscription credit. Returns the rest."""
        ids = list({r.member_id for r in rows if r.member_id is not None})
        consents = await facts_repo.consents_of(conn, ids) if ids else {}
        keep: list[scheduler_repo.OutboundRow] = []
        refused: list[tuple[str, str, str, str, datetime | None]] = []
        for r in rows:
            member = str(r.member_id) if r.member_id else ""
            reason = consent_refusal(
                r.channel, r.message_class, consents.get(member, {}).get(r.channel)
            )
            if reason is None or r.member_id is None:
                keep.append(r)
                continue
            refused.append((r.send_key, "suppressed", reason, "", None))
            if r.message_class in self._caps and r.local_day is not None:
                await scheduler_repo.release_cap(conn, r.member_id, r.local_day, r.message_class)
            if r.channel == "miniprogram":
                await facts_repo.give_back_subscription_credit(conn, r.member_id, r.template)
        if refused:
            await scheduler_repo.record_deliveries(conn, refused, now)
        return keep

    async def _deliver(
        self, row: scheduler_repo.OutboundRow, addresses: dict[tuple[str, str], str]
    ) -> Delivery:
        provider = self.providers.get(row.channel)
        if provider is None:
            return Delivery("failed", reason="NO_PROVIDER")
        member = str(row.member_id) if row.member_id else ""
        address = addresses.get((member, row.channel), "")
        if not address and row.channel == "app_push":
            address = member  # app push targets the member alias the app registered
        if (
            not address
            and member
            and isinstance(provider, HttpProvider)  # the local sink needs no address
            and self._resolver is not None
            and row.channel in self._resolver.channels
        ):
            found = await self._resolver.resolve(member, row.channel, row.send_key)
            if isinstance(found, Delivery):
                return found
            address = found
        limiter = self._limits.get(row.channel)
        if limiter is not None:
            await limiter.acquire()
        return await provider.send(
            Outbound(row.send_key, member, row.channel, row.template, address)
        )

    async def run(self, poll_interval: float) -> None:
        await poll_forever(self.dispatch_once, poll_interval, log, "dispatcher")


def build_providers(
    endpoints: dict[str, str], client: httpx.AsyncClient | None
) -> dict[str, Provider]:
    """An HTTP provider where an endpoint is configured, the local sink elsewhere."""
    out: dict[str, Provider] = {}
    for channel, cls in PROVIDERS.items():
        url = endpoints.get(channel, "")
        out[channel] = cls(url, client) if url and client is not None else LocalSink(channel)
    return out


def new_send_key(enrollment_id: uuid.UUID, seq: int) -> str:
    return f"{enrollment_id}:{seq}"
