"""Channel adapters and the dispatcher that delivers committed sends.

A send row is written by the scheduler (with its cap reservation and its
rendered template) before any provider is called. The dispatcher moves due
sends `pending -> sending` in one transaction that re-reads consent, calls
each send's provider once, and records what happened:

    pending -> sending -> delivered | failed(code) | no_credit | unknown

Providers have no idempotency key, so a call whose outcome is uncertain (a
time-out after the request left, a dropped connection, a dispatcher that died
mid-call) is `unknown` and is not sent again automatically: at most once for
uncertain outcomes (a channel can be configured to resend them; default off).
A definite refusal that may pass later (rate limit, busy) goes back to
`pending` with back-off. An SMS the provider accepted stays `sending` until
its delivery report settles it (apply_receipts), or becomes `unknown`
(NO_RECEIPT, never resent) when no report came within the receipt cut-off. A
WeCom task stays `sending` (TASK_CREATED) until wecom_results.py reads what the
staff member did. The providers themselves live in providers.py.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from servicekit.db import Connection, Database

from . import facts_repository as facts_repo
from . import scheduler_repository as scheduler_repo
from .domain import DAILY_CAPS, Clock, consent_refusal

log = logging.getLogger(__name__)

CHANNELS = ("wecom", "sms", "miniprogram", "app_push")


@dataclass(frozen=True)
class Outbound:
    send_key: str
    member_id: str
    channel: str
    template: str
    address: str
    # The rendered provider content (templates.render).
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Delivery:
    # delivered | accepted (awaiting a receipt) | retry | failed | no_credit | unknown
    status: str
    provider_ref: str = ""
    reason: str = ""
    # The provider's own code (errcode, SMS Code, HTTP_503, ...).
    code: str = ""
    # For a retry: not before this (e.g. the end of a per-phone window).
    retry_at: datetime | None = None


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


class LocalSink:
    """Records and logs what would have been sent, for tests that are not about
    providers; it needs no address. Deployments and `make run` use the real
    providers (pointed at devtools/provider_fakes in `make run`)."""

    needs_address = False

    def __init__(self, channel: str, keep: int = 1000) -> None:
        self.channel = channel
        self.sent: deque[Outbound] = deque(maxlen=keep)

    async def send(self, message: Outbound) -> Delivery:
        self.sent.append(message)
        log.info(
            "local sink: would send %s template=%s to member=%s",
            message.channel,
            message.template,
            message.member_id,
        )
        return Delivery("delivered", provider_ref=f"sink:{message.send_key}")


class NotConfigured:
    """A channel with no provider credentials: its sends fail, visibly, with
    CHANNEL_NOT_CONFIGURED (never a pretend delivery)."""

    needs_address = False

    def __init__(self, channel: str) -> None:
        self.channel = channel

    async def send(self, message: Outbound) -> Delivery:
        return Delivery("failed", reason="CHANNEL_NOT_CONFIGURED", code="CHANNEL_NOT_CONFIGURED")


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
        resend_unknown: frozenset[str] = frozenset(),
        receipt_cutoff: timedelta = timedelta(hours=72),
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
        # Channels whose uncertain outcomes go back to pending (default: none).
        self._resend_unknown = resend_unknown
        # An accepted send whose delivery report has not come by then is `unknown`.
        self._receipt_cutoff = receipt_cutoff

    async def dispatch_once(self) -> int:
        now = self._clock.now()
        async with self._db.unit_of_work() as uow:
            expired = await scheduler_repo.expire_in_flight(
                uow.conn, now, sorted(self._resend_unknown), self._batch
            )
            leased = await scheduler_repo.lease_pending_sends(
                uow.conn, now, now + self._lease, self._batch
            )
            # Consent as it is now, in the step that moves pending -> sending:
            # a send that waited (quiet hours, a retry's back-off) does not go
            # after the member refused the channel.
            rows = await self._drop_refused(uow.conn, leased, now)
            # Credits too: a mini-program send whose credit WeChat has voided
            # since it was written (43101 on another send) is no_credit here.
            rows = await self._drop_voided_credits(uow.conn, rows, now)
            ids = list({r.member_id for r in rows if r.member_id is not None})
            addresses = await facts_repo.addresses(uow.conn, ids) if ids else {}
        if not leased:
            return expired
        if not rows:
            return len(leased)
        deliveries = await asyncio.gather(
            *(self._deliver(r, addresses) for r in rows), return_exceptions=True
        )
        done = self._clock.now()
        results = [
            self._outcome(row, as_delivery(outcome), done)
            for row, outcome in zip(rows, deliveries, strict=True)
        ]
        async with self._db.unit_of_work() as uow:
            await scheduler_repo.record_outcomes(uow.conn, results, done)
            for row, r in zip(rows, results, strict=True):
                if r.status == "no_credit" and row.member_id is not None:
                    # WeChat says the member has no credit for this template:
                    # our count was wrong, the provider's is the truth.
                    await facts_repo.clear_subscription_credits(
                        uow.conn, row.member_id, row.template
                    )
        return len(rows)

    def _outcome(
        self, row: scheduler_repo.OutboundRow, d: Delivery, done: datetime
    ) -> scheduler_repo.Outcome:
        def final(status: str) -> scheduler_repo.Outcome:
            return scheduler_repo.Outcome(row.send_key, status, d.reason, d.provider_ref, d.code)

        if d.status == "accepted":
            if d.reason == scheduler_repo.TASK_CREATED:
                # A WeCom task the staff member still has to send: the results
                # job (wecom_results.py) settles it; first look at once.
                return scheduler_repo.Outcome(
                    row.send_key, "sending", d.reason, d.provider_ref, "", done
                )
            # Taken by the provider; the delivery report settles it, or, when
            # none came by the cut-off, expire_in_flight makes it `unknown`.
            return scheduler_repo.Outcome(
                row.send_key,
                "sending",
                scheduler_repo.ACCEPTED,
                d.provider_ref,
                "",
                done + self._receipt_cutoff,
            )
        if d.status == "unknown" and row.channel in self._resend_unknown:
            d = Delivery("retry", d.provider_ref, d.reason, d.code)
        if d.status == "retry":
            if row.attempts >= self._max_attempts:
                return final("failed")
            nxt = done + backoff(row.attempts, self._retry_base, self._retry_cap)
            if d.retry_at is not None:
                nxt = max(nxt, d.retry_at)
            return scheduler_repo.Outcome(row.send_key, "pending", d.reason, "", d.code, nxt)
        if d.status in ("delivered", "failed", "no_credit", "unknown"):
            return final(d.status)
        return final("failed")

    async def _drop_refused(
        self, conn: Connection, rows: list[scheduler_repo.OutboundRow], now: datetime
    ) -> list[scheduler_repo.OutboundRow]:
        """Record as suppressed (NO_CONSENT) the leased sends the member's
        consent no longer allows, giving back what they held: the day's cap
        slot and a mini-program subscription credit. Returns the rest."""
        ids = list({r.member_id for r in rows if r.member_id is not None})
        consents = await facts_repo.consents_of(conn, ids) if ids else {}
        keep: list[scheduler_repo.OutboundRow] = []
        refused: list[scheduler_repo.Outcome] = []
        for r in rows:
            member = str(r.member_id) if r.member_id else ""
            reason = consent_refusal(
                r.channel, r.message_class, consents.get(member, {}).get(r.channel)
            )
            if reason is None or r.member_id is None:
                keep.append(r)
                continue
            refused.append(scheduler_repo.Outcome(r.send_key, "suppressed", reason))
            if r.message_class in self._caps and r.local_day is not None:
                await scheduler_repo.release_cap(conn, r.member_id, r.local_day, r.message_class)
            if r.channel == "miniprogram":
                await facts_repo.give_back_subscription_credit(
                    conn, r.member_id, r.template, r.credit_epoch
                )
        if refused:
            await scheduler_repo.record_outcomes(conn, refused, now)
        return keep

    async def _drop_voided_credits(
        self, conn: Connection, rows: list[scheduler_repo.OutboundRow], now: datetime
    ) -> list[scheduler_repo.OutboundRow]:
        """A mini-program send holds the subscription credit it took when it
        was written, in that credit's epoch. When WeChat has since said the
        member has none left for the template (43101 to another send: the
        epoch moved on), the held credit is void: the send takes a fresh one
        (a tap since), or ends `no_credit` without calling WeChat, giving back
        its cap slot. A member with no credit row (erased) has none."""
        held = [r for r in rows if r.channel == "miniprogram" and r.member_id is not None]
        if not held:
            return rows
        epochs = await facts_repo.credit_epochs(
            conn, list({(r.member_id, r.template) for r in held if r.member_id is not None})
        )
        void: set[str] = set()
        outcomes: list[scheduler_repo.Outcome] = []
        for r in held:
            assert r.member_id is not None
            current = epochs.get((str(r.member_id), r.template))
            if current is not None and current == (r.credit_epoch or 0):
                continue
            fresh = await facts_repo.take_subscription_credit(conn, r.member_id, r.template)
            if fresh is not None:
                await scheduler_repo.set_credit_epoch(conn, r.send_key, fresh)
                continue
            void.add(r.send_key)
            outcomes.append(scheduler_repo.Outcome(r.send_key, "no_credit", "CREDIT_VOIDED"))
            if r.message_class in self._caps and r.local_day is not None:
                await scheduler_repo.release_cap(conn, r.member_id, r.local_day, r.message_class)
        if outcomes:
            await scheduler_repo.record_outcomes(conn, outcomes, now)
        return [r for r in rows if r.send_key not in void]

    async def _deliver(
        self, row: scheduler_repo.OutboundRow, addresses: dict[tuple[str, str], str]
    ) -> Delivery:
        provider = self.providers.get(row.channel)
        if provider is None:
            return Delivery("failed", reason="NO_PROVIDER", code="NO_PROVIDER")
        member = str(row.member_id) if row.member_id else ""
        address = addresses.get((member, row.channel), "")
        if not address and row.channel == "app_push":
            address = member  # app push targets the member alias the app registered
        if (
            not address
            and member
            and getattr(provider, "needs_address", True)
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
            Outbound(row.send_key, member, row.channel, row.template, address, row.payload)
        )

    async def run(self, poll_interval: float) -> None:
        await poll_forever(self.dispatch_once, poll_interval, log, "dispatcher")


def new_send_key(enrollment_id: uuid.UUID, seq: int) -> str:
    return f"{enrollment_id}:{seq}"
