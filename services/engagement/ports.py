"""Ports: what engagement needs from other services, and today's adapters.

- Consent by channel and purpose lives in the member service (issue 3), the
  one source of truth with its history. `LocalConsent` reads the engagement
  schema's consent projection, fed by member's ConsentChanged events (last
  write wins by recorded_at). A choice made through engagement's RPCs
  (Unsubscribe, SetConsent, SetNonPersonalised) is recorded at member first
  (`MemberConsent`, MEMBER_ADDR) and then applied to the projection with
  member's recorded_at, so the event that follows changes nothing. The
  scheduler and the dispatcher ask for a whole batch at once, inside their
  transaction, so the answer is the one in force at send time.
- Addresses: the SMS phone and the WeCom external_userid stay in the member
  service (encrypted). `MemberAddresses` asks member for the one address a
  send needs, when it is sent (GetMember / ListIdentities with include_pii,
  accessor "engagement", the send key as purpose), so every read is in
  member's pii_access_log and engagement stores no phone (PIPL: minimal
  collection, audited access; docs/journeys.md).
- Coupons and points come from the rewards service (issue 4). Steps write a
  durable `reward_requests` row (key = enrollment:seq, once); the
  `RewardDispatcher` (fulfilment.py) hands each to a `RewardsPort`.
  `RewardsGrpc` awards points through rewards' idempotent AdjustPoints and
  issues coupons through IssueCoupon; the request key (enrollment:seq, one per
  step run) is the idempotency / issue key, so a retried step never gives twice.
  A refusal rewards decided (stock out, per-member limit, template paused or
  ended, member erased) fails the request with rewards' code; a transport
  failure or a conflict is retried with backoff.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Protocol

import grpc

from loyalty.member.v1 import member_pb2, member_pb2_grpc
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from servicekit.clients import create_channel
from servicekit.db import Connection
from servicekit.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    error_info,
)

from . import facts_repository as facts_repo
from . import scheduler_repository as scheduler_repo
from .channels import Delivery
from .domain import MemberFacts

# gRPC codes worth retrying; anything else is the request's own fault.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


def classify_refusal(status: grpc.StatusCode, code: str) -> Delivery:
    """retry or failed, with rewards' stable code as the reason.

    RESOURCE_EXHAUSTED is retried only without a domain code (a transport
    limit): with one (e.g. coupon stock out) it is rewards' decision, and
    asking again would not change it."""
    reason = code or status.name
    if status is grpc.StatusCode.RESOURCE_EXHAUSTED and code and code != status.name:
        return Delivery("failed", reason=reason)
    return Delivery("retry" if status in RETRYABLE else "failed", reason=reason)


class ConsentPort(Protocol):
    async def facts_with_consent(
        self, conn: Connection, member_ids: list[uuid.UUID]
    ) -> dict[str, MemberFacts]:
        """Member facts with `consents` (channel -> marketing consent) and the
        non-personalised choice, for every known member among `member_ids`."""
        ...


class LocalConsent:
    """The engagement schema's consent projection, read in the caller's transaction."""

    async def facts_with_consent(
        self, conn: Connection, member_ids: list[uuid.UUID]
    ) -> dict[str, MemberFacts]:
        return await facts_repo.load_facts(conn, member_ids)


class ConsentRecorder(Protocol):
    async def record(
        self, member_id: str, purpose: str, channel: str, granted: bool, source: str
    ) -> datetime:
        """Record a member's choice where consent lives; returns its recorded_at.
        `channel` is this service's name ("" = not per channel)."""
        ...


# This service's channel names -> member's consent channels.
MEMBER_CONSENT_CHANNELS = {
    "wecom": member_pb2.CONSENT_CHANNEL_WECOM,
    "sms": member_pb2.CONSENT_CHANNEL_SMS,
    "miniprogram": member_pb2.CONSENT_CHANNEL_MINI_PROGRAM,
    "app_push": member_pb2.CONSENT_CHANNEL_APP_PUSH,
    "": member_pb2.CONSENT_CHANNEL_ALL,
}
MEMBER_CONSENT_PURPOSES = {
    "marketing": member_pb2.CONSENT_PURPOSE_MARKETING,
    "personalisation": member_pb2.CONSENT_PURPOSE_PERSONALISATION,
}


class MemberConsent:
    """Records consent choices in the member service (SetConsent: history kept,
    ConsentChanged emitted). Member's refusals come back as engagement errors
    with member's code (unknown or erased member, bad channel); a transport
    failure is UNAVAILABLE, for the caller to retry."""

    def __init__(self, target: str, timeout: float) -> None:
        self._channel = create_channel(target)
        self._stub = member_pb2_grpc.MemberServiceStub(self._channel)
        self._timeout = timeout

    async def record(
        self, member_id: str, purpose: str, channel: str, granted: bool, source: str
    ) -> datetime:
        want_purpose = MEMBER_CONSENT_PURPOSES[purpose]
        want_channel = MEMBER_CONSENT_CHANNELS[channel]
        try:
            profile = await self._stub.SetConsent(
                member_pb2.SetConsentRequest(
                    member_id=member_id,
                    purpose=want_purpose,
                    channel=want_channel,
                    granted=granted,
                    source=source,
                    actor="member",
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            code, field = error_info(exc)
            message = f"the member service refused the consent choice: {exc.details()}"
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                raise NotFound(message, code=code, field="member_id") from None
            if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(message, code=code, field=field) from None
            if exc.code() is grpc.StatusCode.FAILED_PRECONDITION:
                raise FailedPrecondition(message, code=code, field=field) from None
            raise Unavailable(
                f"the member service is unavailable: {exc.code().name}", code="MEMBER_UNAVAILABLE"
            ) from None
        for c in profile.consents:
            if (
                c.purpose == want_purpose
                and c.channel == want_channel
                and c.HasField("recorded_at")
            ):
                return c.recorded_at.ToDatetime(tzinfo=UTC)
        return datetime.now(UTC)  # not echoed (never expected): now is the latest

    async def close(self) -> None:
        await self._channel.close()


class StoreZones(Protocol):
    async def zone_of(self, store_id: str) -> str:
        """The store's IANA time zone; "" when unknown (no such store, no zone)."""
        ...

    async def name_of(self, store_id: str) -> str:
        """The store's name (`{store_name}`); "" when no such store."""
        ...


class RewardsStoreZones:
    """Stores are rewards' data: a store's zone is its `Store.time_zone` and
    its name `Store.name`, read with GetStore (operators set them, docs/api.md
    "Stores"). An unknown store answers "" (the member keeps the default zone).
    Answers are kept for `ttl_seconds` (a store hardly ever changes)."""

    def __init__(self, target: str, timeout: float, ttl_seconds: float = 3600.0) -> None:
        self._channel = create_channel(target)
        self._stub = rewards_pb2_grpc.RewardsServiceStub(self._channel)
        self._timeout = timeout
        self._ttl = ttl_seconds
        # store_id -> (when read, zone, name)
        self._cache: dict[str, tuple[float, str, str]] = {}

    async def _store(self, store_id: str) -> tuple[str, str]:
        now = time.monotonic()
        hit = self._cache.get(store_id)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1], hit[2]
        try:
            store = await self._stub.GetStore(
                rewards_pb2.GetStoreRequest(store_id=store_id), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                self._cache[store_id] = (now, "", "")
                return "", ""
            raise  # transient: the event is retried
        zone = str(store.time_zone)
        self._cache[store_id] = (now, zone, store.name)
        return zone, store.name

    async def zone_of(self, store_id: str) -> str:
        return (await self._store(store_id))[0]

    async def name_of(self, store_id: str) -> str:
        return (await self._store(store_id))[1]

    async def close(self) -> None:
        await self._channel.close()


class RewardsPort(Protocol):
    async def fulfil(self, request: scheduler_repo.RewardRequestRow) -> Delivery:
        """delivered (done), retry (transient) or failed (permanent, with the code)."""
        ...


class RewardsGrpc:
    def __init__(self, target: str, timeout: float) -> None:
        self._channel = create_channel(target)
        self._stub = rewards_pb2_grpc.RewardsServiceStub(self._channel)
        self._timeout = timeout

    async def fulfil(self, request: scheduler_repo.RewardRequestRow) -> Delivery:
        if request.member_id is None:
            return Delivery("failed", reason="MEMBER_ERASED")
        try:
            if request.kind == "coupon":
                coupon = await self._stub.IssueCoupon(
                    rewards_pb2.IssueCouponRequest(
                        template_id=request.coupon,
                        member_id=str(request.member_id),
                        reason="journey",
                        issue_key=request.request_key,
                        issued_by="engagement",
                    ),
                    timeout=self._timeout,
                )
                return Delivery("delivered", provider_ref=coupon.coupon_id)
            reply = await self._stub.AdjustPoints(
                rewards_pb2.AdjustPointsRequest(
                    member_id=str(request.member_id),
                    points=request.points,
                    operator_id="engagement",
                    reason=f"journey reward {request.request_key}",
                    idempotency_key=request.request_key,
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            code, _ = error_info(exc)
            return classify_refusal(exc.code(), code)
        return Delivery("delivered", provider_ref=reply.transaction_id)

    async def close(self) -> None:
        await self._channel.close()


# Who reads member PII for a send, as member's pii_access_log records it.
ACCESSOR = "engagement"


class MemberAddresses:
    """The phone (SMS) or WeCom external_userid of a member, read from the
    member service at send time and never stored here."""

    channels = frozenset({"sms", "wecom"})

    def __init__(self, target: str, timeout: float) -> None:
        self._channel = create_channel(target)
        self._stub = member_pb2_grpc.MemberServiceStub(self._channel)
        self._timeout = timeout

    async def resolve(self, member_id: str, channel: str, send_key: str) -> str | Delivery:
        purpose = f"journey message {send_key} via {channel}"
        try:
            if channel == "sms":
                member = await self._stub.GetMember(
                    member_pb2.GetMemberRequest(
                        member_id=member_id, include_pii=True, accessor=ACCESSOR, purpose=purpose
                    ),
                    timeout=self._timeout,
                )
                address = member.phone
            else:
                reply = await self._stub.ListIdentities(
                    member_pb2.ListIdentitiesRequest(
                        member_id=member_id, include_pii=True, accessor=ACCESSOR, purpose=purpose
                    ),
                    timeout=self._timeout,
                )
                address = next(
                    (
                        i.value
                        for i in reply.identities
                        if i.type == member_pb2.IDENTIFIER_TYPE_WECOM_EXTERNAL_USERID and i.value
                    ),
                    "",
                )
        except grpc.aio.AioRpcError as exc:
            code, _ = error_info(exc)
            return classify_refusal(exc.code(), code)
        return address or Delivery("failed", reason="NO_ADDRESS")

    async def close(self) -> None:
        await self._channel.close()
