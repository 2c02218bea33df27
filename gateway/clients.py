"""Downstream clients: one channel per service for the life of the process,
and a deadline on every call.

Every call goes through `_Client._call`, which applies the deadline and turns
a failed call into a `DownstreamError` (gateway/errors.py), so the POS
servicer and HTTP routes never handle raw gRPC errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from cachetools import TTLCache
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loyalty.engagement.v1 import engagement_pb2, engagement_pb2_grpc
from loyalty.guides.v1 import guides_pb2_grpc
from loyalty.member.v1 import member_pb2, member_pb2_grpc
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from loyalty.tiering.v1 import tiering_pb2, tiering_pb2_grpc
from servicekit.clients import create_channel

from .errors import UNAVAILABLE_MESSAGE, DownstreamError, from_rpc_error
from .settings import GatewaySettings
from .wechat import WeChatApi

Reply = TypeVar("Reply")
_C = TypeVar("_C", bound="_Client")

SERVING = health_pb2.HealthCheckResponse.SERVING
# A dashboard's aggregate over a long range may take seconds at scale
# (docs/operations.md): this many times the usual downstream deadline.
ANALYTICS_DEADLINE_FACTOR = 5
# Rewards takes at most 8 identifier hashes per referral party.
MAX_ABUSE_FINGERPRINTS = 8


class _Client:
    # The service's generated stub, made by each client.
    _stub: Any

    def __init__(self, name: str, target: str, timeout: float) -> None:
        self.name = name
        self.target = target
        self.timeout = timeout
        self.channel = create_channel(target)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        # The last call found the service unavailable; cleared by an answer.
        self.unavailable = False

    async def _call(
        self,
        rpc: Callable[..., Awaitable[Reply]],
        request: Any,
        fields: Mapping[str, str] | None = None,
    ) -> Reply:
        try:
            reply = await rpc(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc, self.name, fields)
            self.unavailable = error.status == grpc.StatusCode.UNAVAILABLE
            raise error from None
        self.unavailable = False
        return reply

    async def analytics(self, method: str, request: Any) -> Any:
        """A dashboard's Get*Analytics RPC: aggregates over up to a year of
        history, so ANALYTICS_DEADLINE_FACTOR times the usual deadline (a read:
        nothing is lost when it is cut off)."""

        def rpc(req: Any, timeout: float) -> Any:
            return getattr(self._stub, method)(req, timeout=timeout * ANALYTICS_DEADLINE_FACTOR)

        return await self._call(rpc, request)

    def degraded(self) -> bool:
        """Not answering: the channel is failing to connect, or the last call was
        UNAVAILABLE and it has not reconnected since. Asking for the state starts
        a reconnect, so a service that is back soon stops counting as degraded."""
        state = self.channel.get_state(try_to_connect=True)
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            return True
        return self.unavailable and state != grpc.ChannelConnectivity.READY

    async def health(self, timeout: float) -> str:
        """The service's overall health status name; UNREACHABLE when it did not answer."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=min(timeout, self.timeout)
            )
        except grpc.aio.AioRpcError:
            return "UNREACHABLE"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    async def close(self) -> None:
        await self.channel.close()


def identifier_fields(names: list[str]) -> dict[str, str]:
    """The caller's field names for the identifiers of one IdentifyMember call,
    in order: the member service names them "identifiers[n]"."""
    out = {}
    for n, name in enumerate(names):
        out[f"identifiers[{n}].value"] = name
        out[f"identifiers[{n}]"] = name
    return out


class MemberClient(_Client):
    def __init__(self, target: str, timeout: float) -> None:
        super().__init__("member", target, timeout)
        self._stub = member_pb2_grpc.MemberServiceStub(self.channel)

    async def identify(
        self,
        identifiers: list[member_pb2.Identifier],
        source: str,
        request_key: str,
        fields: Mapping[str, str] | None = None,
        store_id: str = "",
    ) -> member_pb2.IdentifyMemberResponse:
        """Find, enrol or merge (OneID); idempotent under request_key. A store
        (POS) is counted by member's velocity watch."""
        request = member_pb2.IdentifyMemberRequest(
            identifiers=identifiers, source=source, request_key=request_key, store_id=store_id
        )
        return await self._call(self._stub.IdentifyMember, request, fields)

    async def _identify_one(
        self, ident: member_pb2.Identifier, source: str, field: str, store_id: str = ""
    ) -> member_pb2.IdentifyMemberResponse:
        """One identifier the caller sent as `field`: the member service's own
        field names are mapped back to it. A new request (a fresh key)."""
        fields = identifier_fields([field])
        return await self.identify([ident], source, str(uuid.uuid4()), fields, store_id)

    async def find_or_enrol(
        self, ident: member_pb2.Identifier, source: str, field: str, store_id: str = ""
    ) -> member_pb2.IdentifyMemberResponse:
        """The POS's identify of one attach-only identifier (a typed phone, a
        card): a known one is a ResolveMember read (served from member's Redis
        cache), with the answer IdentifyMember's plain lookup would give; only
        an unknown one (or quarantined, erased, junk: IdentifyMember says
        which) goes on to IdentifyMember, which enrols. Nothing is lost by not
        recording the read under a request key: the POS sends none, so a fresh
        key was never repeated."""
        try:
            member = await self.resolve_member(
                ident, {"identifier.value": field, "identifier": field}, store_id
            )
        except DownstreamError as exc:
            if exc.code != "UNKNOWN_IDENTIFIER":
                raise
            return await self._identify_one(ident, source, field, store_id)
        return member_pb2.IdentifyMemberResponse(member=member, created=False)

    async def redeem_member_code(
        self, code: str, source: str, *, code_field: str = "member_code"
    ) -> member_pb2.Member:
        """The member behind a scanned dynamic member code, once."""
        request = member_pb2.RedeemMemberCodeRequest(code=code, source=source)
        return await self._call(self._stub.RedeemMemberCode, request, {"code": code_field})

    async def get_member(
        self, member_id: str, *, accessor: str = "", purpose: str = ""
    ) -> member_pb2.Member:
        """Masked; with an accessor and purpose the phone comes unmasked (audited)."""
        request = member_pb2.GetMemberRequest(
            member_id=member_id, include_pii=bool(accessor), accessor=accessor, purpose=purpose
        )
        return await self._call(self._stub.GetMember, request)

    async def abuse_fingerprints(self, member_id: str) -> list[str]:
        """The member's phone and unionid as the member service's keyed hashes
        (never the values): what referral counts invitees by."""
        reply = await self._call(
            self._stub.ListIdentities, member_pb2.ListIdentitiesRequest(member_id=member_id)
        )
        kinds = {member_pb2.IDENTIFIER_TYPE_PHONE, member_pb2.IDENTIFIER_TYPE_WECHAT_UNIONID}
        return sorted(
            {
                f"{member_pb2.IdentifierType.Name(i.type)}:{i.value_hash.hex()}"
                for i in reply.identities
                if i.type in kinds and i.value_hash
            }
        )[:MAX_ABUSE_FINGERPRINTS]

    async def resolve_member(
        self,
        identifier: member_pb2.Identifier,
        fields: Mapping[str, str] | None = None,
        store_id: str = "",
    ) -> member_pb2.Member:
        """The live member owning one identifier; never enrols (NOT_FOUND if none).
        A store (POS) is counted by member's velocity watch."""
        request = member_pb2.ResolveMemberRequest(identifier=identifier, store_id=store_id)
        return await self._call(self._stub.ResolveMember, request, fields)

    async def call(self, method: str, request: Any, fields: Mapping[str, str] | None = None) -> Any:
        """Any other MemberService RPC by name (profile, consent, member code,
        review queue, merge, unmerge, erase); same deadline and error mapping."""
        return await self._call(getattr(self._stub, method), request, fields)


# Open stores are remembered this long: POS identify then costs one hop less.
# Only open stores are cached, so a new store works at once; a store closed
# meanwhile is still refused at checkout by rewards itself.
OPEN_STORE_TTL_SECONDS = 30.0
STORE_OPEN = "active"  # rewards' status of a store that takes orders
# A bulk coupon issue (IssueCoupons) may take this many times the usual deadline.
BULK_DEADLINE_FACTOR = 5


class RewardsClient(_Client):
    def __init__(self, target: str, timeout: float) -> None:
        super().__init__("rewards", target, timeout)
        self._stub = rewards_pb2_grpc.RewardsServiceStub(self.channel)
        self._open_stores: TTLCache[str, rewards_pb2.Store] = TTLCache(
            maxsize=10_000, ttl=OPEN_STORE_TTL_SECONDS
        )

    async def get_store(self, store_id: str) -> rewards_pb2.Store:
        cached = self._open_stores.get(store_id)
        if cached is not None:
            return cached
        store: rewards_pb2.Store = await self._call(
            self._stub.GetStore, rewards_pb2.GetStoreRequest(store_id=store_id)
        )
        if store.status == STORE_OPEN:
            self._open_stores[store_id] = store
        return store

    async def get_points_balance(self, member_id: str) -> rewards_pb2.PointsBalance:
        return await self._call(
            self._stub.GetPointsBalance, rewards_pb2.GetPointsBalanceRequest(member_id=member_id)
        )

    async def complete_order(
        self, request: rewards_pb2.CompleteOrderRequest
    ) -> rewards_pb2.CompleteOrderResponse:
        return await self._call(self._stub.CompleteOrder, request)

    async def refund_order(
        self, request: rewards_pb2.RefundOrderRequest
    ) -> rewards_pb2.RefundOrderResponse:
        return await self._call(self._stub.RefundOrder, request)

    async def get_points_history(
        self, member_id: str, page_size: int, cursor: str
    ) -> rewards_pb2.PointsHistory:
        return await self._call(
            self._stub.GetPointsHistory,
            rewards_pb2.GetPointsHistoryRequest(
                member_id=member_id, page_size=page_size, cursor=cursor
            ),
        )

    async def get_points_summary(self, member_id: str, days: int) -> rewards_pb2.PointsSummary:
        """Balance and points lapsing within `days` (0: rewards' horizon), one hop."""
        return await self._call(
            self._stub.GetPointsSummary,
            rewards_pb2.GetExpiringPointsRequest(member_id=member_id, days=days),
        )

    async def get_expiring_points(self, member_id: str, days: int) -> rewards_pb2.ExpiringPoints:
        return await self._call(
            self._stub.GetExpiringPoints,
            rewards_pb2.GetExpiringPointsRequest(member_id=member_id, days=days),
        )

    async def adjust_points(
        self, request: rewards_pb2.AdjustPointsRequest
    ) -> rewards_pb2.PointsMovement:
        return await self._call(self._stub.AdjustPoints, request)

    async def get_points_liability(self, days: int) -> rewards_pb2.PointsLiability:
        return await self._call(
            self._stub.GetPointsLiability,
            rewards_pb2.GetPointsLiabilityRequest(expiring_within_days=days),
        )

    async def issue_coupons(
        self, request: rewards_pb2.IssueCouponsRequest
    ) -> rewards_pb2.IssueCouponsResponse:
        """IssueCoupons: up to 1,000 issues in one transaction, so a deadline of
        BULK_DEADLINE_FACTOR times the usual one (a batch cut off by it is all
        work lost, redone by the caller's retry)."""

        def rpc(req: Any, timeout: float) -> Any:
            return self._stub.IssueCoupons(req, timeout=timeout * BULK_DEADLINE_FACTOR)

        return await self._call(rpc, request)

    async def bulk_earn_points(
        self, request: rewards_pb2.BulkEarnPointsRequest
    ) -> rewards_pb2.BulkEarnPointsResponse:
        """BulkEarnPoints: up to 1,000 earns in one transaction (the bulk deadline)."""

        def rpc(req: Any, timeout: float) -> Any:
            return self._stub.BulkEarnPoints(req, timeout=timeout * BULK_DEADLINE_FACTOR)

        return await self._call(rpc, request)

    async def call(self, method: str, request: Any, fields: Mapping[str, str] | None = None) -> Any:
        """Any other RewardsService RPC by name (referral, points mall); same
        deadline and error mapping."""
        return await self._call(getattr(self._stub, method), request, fields)


# Tiering names a programme's entries "programme.ladder[2].threshold"; the HTTP
# caller sent the programme itself as the body, so to it that is "ladder[2].threshold".
PROGRAMME_FIELDS = {
    "programme.ladder_json": "ladder",
    "programme.rules_json": "rules",
    "programme.": "",
}


class TieringClient(_Client):
    def __init__(self, target: str, timeout: float) -> None:
        super().__init__("tiering", target, timeout)
        self._stub = tiering_pb2_grpc.TieringServiceStub(self.channel)

    async def get_member_spend(self, member_id: str) -> tiering_pb2.MemberSpend:
        return await self._call(
            self._stub.GetMemberSpend, tiering_pb2.GetMemberSpendRequest(member_id=member_id)
        )

    async def get_member_tier(self, member_id: str) -> tiering_pb2.MemberTier:
        return await self._call(
            self._stub.GetMemberTier, tiering_pb2.GetMemberTierRequest(member_id=member_id)
        )

    async def get_member_tier_badge(self, member_id: str) -> tiering_pb2.MemberTierBadge:
        return await self._call(
            self._stub.GetMemberTierBadge, tiering_pb2.GetMemberTierRequest(member_id=member_id)
        )

    async def get_tier_history(self, member_id: str, limit: int) -> tiering_pb2.TierHistory:
        return await self._call(
            self._stub.GetTierHistory,
            tiering_pb2.GetTierHistoryRequest(member_id=member_id, limit=limit),
        )

    async def record_growth_action(
        self, request: tiering_pb2.RecordGrowthActionRequest
    ) -> tiering_pb2.RecordGrowthActionResponse:
        return await self._call(self._stub.RecordGrowthAction, request)

    async def get_programme(
        self, request: tiering_pb2.GetProgrammeRequest
    ) -> tiering_pb2.Programme:
        return await self._call(self._stub.GetProgramme, request)

    async def publish_programme(self, programme: tiering_pb2.Programme) -> tiering_pb2.Programme:
        return await self._call(
            self._stub.PublishProgramme,
            tiering_pb2.PublishProgrammeRequest(programme=programme),
            PROGRAMME_FIELDS,
        )

    async def simulate_programme(
        self, programme: tiering_pb2.Programme
    ) -> tiering_pb2.SimulationReport:
        return await self._call(
            self._stub.SimulateProgramme,
            tiering_pb2.SimulateProgrammeRequest(programme=programme),
            PROGRAMME_FIELDS,
        )

    async def set_tier_override(
        self, request: tiering_pb2.SetTierOverrideRequest
    ) -> tiering_pb2.MemberTier:
        return await self._call(self._stub.SetTierOverride, request)

    async def get_distribution_report(self) -> tiering_pb2.DistributionReport:
        return await self._call(
            self._stub.GetDistributionReport, tiering_pb2.GetDistributionReportRequest()
        )

    async def call(self, method: str, request: Any, fields: Mapping[str, str] | None = None) -> Any:
        """Any other TieringService RPC by name (the analytics dashboards); same
        deadline and error mapping."""
        return await self._call(getattr(self._stub, method), request, fields)


class EngagementClient(_Client):
    def __init__(self, target: str, timeout: float) -> None:
        super().__init__("engagement", target, timeout)
        self._stub = engagement_pb2_grpc.EngagementServiceStub(self.channel)

    async def publish_journey(self, definition_json: str) -> engagement_pb2.PublishJourneyResponse:
        return await self._call(
            self._stub.PublishJourney,
            engagement_pb2.PublishJourneyRequest(definition_json=definition_json),
            {"definition_json": "definition"},
        )

    async def pause_journey(self, journey_id: str) -> engagement_pb2.JourneyStatus:
        return await self._call(
            self._stub.PauseJourney, engagement_pb2.JourneyRef(journey_id=journey_id)
        )

    async def resume_journey(self, journey_id: str) -> engagement_pb2.JourneyStatus:
        return await self._call(
            self._stub.ResumeJourney, engagement_pb2.JourneyRef(journey_id=journey_id)
        )

    async def journey_metrics(self, journey_id: str) -> engagement_pb2.JourneyMetrics:
        return await self._call(
            self._stub.GetJourneyMetrics, engagement_pb2.JourneyRef(journey_id=journey_id)
        )

    async def journey_sends(self, journey_id: str) -> engagement_pb2.JourneySends:
        return await self._call(
            self._stub.GetJourneySends, engagement_pb2.JourneyRef(journey_id=journey_id)
        )

    async def unknown_sends(
        self, request: engagement_pb2.ListUnknownSendsRequest
    ) -> engagement_pb2.ListUnknownSendsResponse:
        return await self._call(self._stub.ListUnknownSends, request)

    async def apply_sms_receipts(
        self, request: engagement_pb2.ApplySmsReceiptsRequest
    ) -> engagement_pb2.ApplySmsReceiptsResponse:
        return await self._call(self._stub.ApplySmsReceipts, request)

    async def ingest_event(
        self, request: engagement_pb2.IngestEventRequest
    ) -> engagement_pb2.IngestEventResponse:
        return await self._call(self._stub.IngestEvent, request)

    async def launch_near_store(
        self, request: engagement_pb2.LaunchNearStoreRequest
    ) -> engagement_pb2.LaunchNearStoreResponse:
        return await self._call(self._stub.LaunchNearStore, request)

    async def unsubscribe(
        self, member_id: str, channels: list[str]
    ) -> engagement_pb2.UnsubscribeResponse:
        return await self._call(
            self._stub.Unsubscribe,
            engagement_pb2.UnsubscribeRequest(member_id=member_id, channels=channels),
        )

    async def list_journeys(
        self, request: engagement_pb2.ListJourneysRequest
    ) -> engagement_pb2.ListJourneysResponse:
        return await self._call(self._stub.ListJourneys, request)

    async def list_parked_events(
        self, request: engagement_pb2.ListParkedEventsRequest
    ) -> engagement_pb2.ListParkedEventsResponse:
        return await self._call(self._stub.ListParkedEvents, request)

    async def replay_parked_events(
        self, member_id: str
    ) -> engagement_pb2.ReplayParkedEventsResponse:
        return await self._call(
            self._stub.ReplayParkedEvents,
            engagement_pb2.ReplayParkedEventsRequest(member_id=member_id),
        )

    async def expire_parked_events(
        self, older_than_days: int
    ) -> engagement_pb2.ExpireParkedEventsResponse:
        return await self._call(
            self._stub.ExpireParkedEvents,
            engagement_pb2.ExpireParkedEventsRequest(older_than_days=older_than_days),
        )

    async def call(self, method: str, request: Any, fields: Mapping[str, str] | None = None) -> Any:
        """Any other EngagementService RPC by name (the analytics dashboards); same
        deadline and error mapping."""
        return await self._call(getattr(self._stub, method), request, fields)


class GuidesClient(_Client):
    def __init__(self, target: str, timeout: float) -> None:
        super().__init__("guides", target, timeout)
        self._stub = guides_pb2_grpc.GuidesServiceStub(self.channel)

    async def call(self, method: str, request: Any, fields: Mapping[str, str] | None = None) -> Any:
        """A GuidesService RPC by name (staff, WeCom callbacks, bindings,
        attribution, tags, reports); same deadline and error mapping."""
        return await self._call(getattr(self._stub, method), request, fields)


class Downstreams:
    """Every downstream client of the process. A service whose address is empty
    is not deployed: readiness ignores it and a call that needs it is UNAVAILABLE."""

    def __init__(self, settings: GatewaySettings) -> None:
        timeout = settings.downstream_timeout_seconds
        self.readiness_timeout = settings.readiness_timeout_seconds
        candidates: list[tuple[type[_Client], str]] = [
            (MemberClient, settings.member_addr),
            (TieringClient, settings.tiering_addr),
            (EngagementClient, settings.engagement_addr),
            (RewardsClient, settings.rewards_addr),
            (GuidesClient, settings.guides_addr),
        ]
        self._clients: dict[type[_Client], _Client] = {
            cls: cls(target, timeout)  # type: ignore[call-arg]
            for cls, target in candidates
            if target.strip()
        }
        # Not gRPC, but a downstream all the same: WeChat, for phone codes.
        self.wechat = WeChatApi(
            settings.wechat_api_base,
            settings.wechat_apps,
            timeout_seconds=settings.wechat_timeout_seconds,
        )
        # What the SMS provider's delivery-report URL carries (never logged).
        self.sms_receipt_token = settings.sms_receipt_token.get_secret_value()

    def _get(self, cls: type[_C]) -> _C:
        client = self._clients.get(cls)
        if client is None:
            raise DownstreamError(
                grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_MESSAGE, code="SERVICE_NOT_DEPLOYED"
            )
        return client  # type: ignore[return-value]

    @property
    def member(self) -> MemberClient:
        return self._get(MemberClient)

    @property
    def rewards(self) -> RewardsClient:
        return self._get(RewardsClient)

    @property
    def tiering(self) -> TieringClient:
        return self._get(TieringClient)

    @property
    def engagement(self) -> EngagementClient:
        return self._get(EngagementClient)

    @property
    def guides(self) -> GuidesClient:
        return self._get(GuidesClient)

    def degraded(self) -> list[str]:
        """Deployed services a POS reply can do without that are not answering,
        for the reply's `degraded` list (no extra call: see _Client.degraded)."""
        optional = (TieringClient, EngagementClient)
        return sorted(
            c.name for cls, c in self._clients.items() if cls in optional and c.degraded()
        )

    def probes(self) -> dict[str, Callable[[], Awaitable[str]]]:
        """A health probe per deployed downstream (servicekit.dependencies)."""
        return {
            c.name: functools.partial(c.health, self.readiness_timeout)
            for c in self._clients.values()
        }

    async def health(self) -> dict[str, str]:
        """Each deployed downstream's health status, asked concurrently."""
        clients = list(self._clients.values())
        statuses = await asyncio.gather(*(c.health(self.readiness_timeout) for c in clients))
        return {c.name: s for c, s in zip(clients, statuses, strict=True)}

    async def close(self) -> None:
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.close()
        with contextlib.suppress(Exception):
            await self.wechat.close()
