"""gRPC servicer: protobuf <-> domain mapping only."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import grpc

from loyalty.common.v1 import common_pb2
from loyalty.member.v1 import member_pb2, member_pb2_grpc
from servicekit.analytics import day_range
from servicekit.db import Database, UnitOfWork
from servicekit.errors import InvalidArgument, Unavailable
from servicekit.protos import timestamp

from .analytics import member_counts
from .cache import MemberUnitOfWork, ResolveCache
from .domain import (
    PROFILE_FIELDS,
    ConsentChannel,
    ConsentPurpose,
    ConsentRecord,
    IdType,
    ObservedIdentifier,
    mask,
    normalise,
)
from .handlers import MemberHandlers
from .handlers_common import LostRace
from .metrics import MemberMetrics
from .oneid_handlers import Identified
from .oneid_repository import MergeRow, ReviewRow
from .profile_handlers import Profile
from .repository import MemberRecord
from .velocity import Burst, Sighting, VelocityWatch

log = logging.getLogger(__name__)

ID_TYPES = {
    member_pb2.IDENTIFIER_TYPE_PHONE: IdType.PHONE,
    member_pb2.IDENTIFIER_TYPE_WECHAT_UNIONID: IdType.WECHAT_UNIONID,
    member_pb2.IDENTIFIER_TYPE_WECHAT_OPENID: IdType.WECHAT_OPENID,
    member_pb2.IDENTIFIER_TYPE_WECOM_EXTERNAL_USERID: IdType.WECOM_EXTERNAL_USERID,
    member_pb2.IDENTIFIER_TYPE_POS_CARD: IdType.POS_CARD,
    member_pb2.IDENTIFIER_TYPE_DELIVERY_PLATFORM_ID: IdType.DELIVERY_PLATFORM_ID,
    member_pb2.IDENTIFIER_TYPE_MEMBER_NUMBER: IdType.MEMBER_NUMBER,
}
PROTO_ID_TYPES = {v: k for k, v in ID_TYPES.items()}

PURPOSES = {
    member_pb2.CONSENT_PURPOSE_MARKETING: ConsentPurpose.MARKETING,
    member_pb2.CONSENT_PURPOSE_PERSONALISATION: ConsentPurpose.PERSONALISATION,
}
PROTO_PURPOSES = {v: k for k, v in PURPOSES.items()}
CHANNELS = {
    member_pb2.CONSENT_CHANNEL_WECOM: ConsentChannel.WECOM,
    member_pb2.CONSENT_CHANNEL_SMS: ConsentChannel.SMS,
    member_pb2.CONSENT_CHANNEL_MINI_PROGRAM: ConsentChannel.MINI_PROGRAM,
    member_pb2.CONSENT_CHANNEL_APP_PUSH: ConsentChannel.APP_PUSH,
    member_pb2.CONSENT_CHANNEL_ALL: ConsentChannel.ALL,
}
PROTO_CHANNELS = {v: k for k, v in CHANNELS.items()}
GENDERS = {
    member_pb2.GENDER_FEMALE: "female",
    member_pb2.GENDER_MALE: "male",
    member_pb2.GENDER_OTHER: "other",
}
PROTO_GENDERS = {v: k for k, v in GENDERS.items()}
_R = member_pb2.ResolvedMemberId
RESOLVED_STATES = {
    "active": _R.ACTIVE,
    "absorbed": _R.ABSORBED,
    "erased": _R.ERASED,
    "unknown": _R.UNKNOWN,
}

# Races a retry can win: our read moved before we locked it, or Postgres
# broke a lock cycle the ordering rules could not prevent (operator paths).
RETRYABLE = (
    LostRace,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.UniqueViolationError,
)


def member_message(member: MemberRecord, phone: str = "") -> member_pb2.Member:
    return member_pb2.Member(
        member_id=member.member_id,
        member_number=member.member_number,
        phone_masked=member.phone_masked,
        registered_at=timestamp(member.registered_at),
        phone=phone,
    )


def merge_message(row: MergeRow) -> member_pb2.MergeRecord:
    message = member_pb2.MergeRecord(
        merge_id=row.merge_id,
        survivor_member_id=row.survivor_id,
        absorbed_member_id=row.absorbed_id,
        rule=row.rule,
        evidence=row.evidence,
        merged_at=timestamp(row.merged_at),
        status=row.status,
        automatic=row.automatic,
        actor=row.actor,
        unmerged_by=row.unmerged_by,
        unmerge_reason=row.unmerge_reason,
    )
    if row.unmerged_at is not None:
        message.unmerged_at.CopyFrom(timestamp(row.unmerged_at))
    return message


def review_message(row: ReviewRow) -> member_pb2.MergeReview:
    return member_pb2.MergeReview(
        review_id=row.review_id,
        status=row.status,
        member_ids=row.member_ids,
        reason=row.reason,
        detail=row.detail,
        evidence=row.evidence,
        created_at=timestamp(row.created_at),
        decided_at=timestamp(row.decided_at),
        decided_by=row.decided_by,
        note=row.note,
        merge_ids=row.merge_ids,
    )


def consent_message(record: ConsentRecord) -> member_pb2.Consent:
    return member_pb2.Consent(
        purpose=PROTO_PURPOSES[record.purpose],
        channel=PROTO_CHANNELS[record.channel],
        granted=record.granted,
        source=record.source,
        actor=record.actor,
        recorded_at=timestamp(record.recorded_at),
    )


def profile_message(profile: Profile) -> member_pb2.Profile:
    f = profile.fields
    return member_pb2.Profile(
        member_id=profile.member_id,
        nickname=f.get("nickname", ""),
        birthday=f.get("birthday", ""),
        gender=PROTO_GENDERS.get(f.get("gender", ""), member_pb2.GENDER_UNSPECIFIED),
        registration_store_id=f.get("registration_store_id", ""),
        acquisition_channel=f.get("acquisition_channel", ""),
        acquisition_campaign=f.get("acquisition_campaign", ""),
        consents=[consent_message(r) for r in profile.consents.values()],
        personalisation_allowed=profile.personalisation_allowed,
        time_zone=f.get("time_zone", ""),
    )


T = TypeVar("T")

# A brand's store code (the gateway checked the store exists); longer is not one.
MAX_STORE_ID = 64


def _store_id(value: str) -> str:
    """The store a till named, for the velocity watch; "" when none."""
    store_id = value.strip()
    if len(store_id) > MAX_STORE_ID:
        raise InvalidArgument(
            f"store_id is longer than {MAX_STORE_ID} characters",
            code="VALUE_TOO_LONG",
            field="store_id",
        )
    return store_id


class MemberServicer(member_pb2_grpc.MemberServiceServicer):
    def __init__(
        self,
        db: Database,
        handlers: MemberHandlers,
        max_attempts: int = 6,
        cache: ResolveCache | None = None,
        metrics: MemberMetrics | None = None,
        velocity: VelocityWatch | None = None,
    ) -> None:
        self._metrics = metrics or MemberMetrics()
        self._velocity = velocity
        self._db = db
        self._handlers = handlers
        self._max_attempts = max_attempts
        self._cache = cache
        # Every transaction here: invalidates the resolve cache around its
        # commit when it changed what an identifier resolves to.
        self._unit_of_work = MemberUnitOfWork(db, cache)

    async def _in_transaction(
        self,
        work: Callable[[UnitOfWork], Awaitable[T]],
        contended: str = "the member changed concurrently too often; retry",
        code: str = "CONTENDED",
    ) -> T:
        """One transaction, retried when it lost a race (operator writes lock
        whole clusters and can meet an identify in a lock cycle Postgres breaks)."""
        for attempt in range(self._max_attempts):
            try:
                async with self._unit_of_work() as uow:
                    return await work(uow)
            except RETRYABLE:
                if attempt + 1 == self._max_attempts:
                    raise Unavailable(contended, code=code) from None
                # Jittered backoff, so the losers do not collide again in step.
                await asyncio.sleep(random.uniform(0.001, 0.004) * (2**attempt))
        raise AssertionError("unreachable")

    async def IdentifyMember(
        self, request: member_pb2.IdentifyMemberRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.IdentifyMemberResponse:
        store_id = _store_id(request.store_id)
        observed = []
        for n, ident in enumerate(request.identifiers):
            field = f"identifiers[{n}]"
            id_type = ID_TYPES.get(ident.type)
            if id_type is None:
                raise InvalidArgument(
                    f"{field}.type is missing or unknown",
                    code="UNKNOWN_IDENTIFIER_TYPE",
                    field=f"{field}.type",
                )
            observed.append(
                normalise(id_type, ident.value, ident.namespace, ident.verified, f"{field}.value")
            )
        if not request.request_key.strip():
            raise InvalidArgument(
                "request_key is required: a retry must be recognisable",
                code="REQUEST_KEY_REQUIRED",
                field="request_key",
            )
        source = request.source.strip() or "unknown"
        # One list per attempt: only the committed (last) attempt counts.
        attempts: list[list[str]] = []

        def attempt(uow: UnitOfWork) -> Awaitable[Identified]:
            attempts.append([])
            return self._handlers.identify(
                uow, observed, source, request.request_key, request.reenrol, attempts[-1]
            )

        result = await self._in_transaction(
            attempt,
            "identify kept losing races to concurrent calls; retry",
            "IDENTIFY_CONTENDED",
        )
        for quarantined_type in attempts[-1]:
            self._metrics.quarantined.labels(identifier_type=quarantined_type).inc()
        if result.refusal is not None:
            raise result.refusal
        assert result.member is not None
        if store_id and not result.replayed:
            await self._count_stores(observed, store_id, result.member.member_id)
        return member_pb2.IdentifyMemberResponse(
            member=member_message(result.member),
            created=result.created,
            merged_member_ids=result.merged_member_ids,
            review_id=result.review_id,
            ignored=[member_pb2.IgnoredIdentifier(index=n, reason=r) for n, r in result.ignored],
            replayed=result.replayed,
            merges=[merge_message(m) for m in result.merges],
        )

    async def GetMember(
        self, request: member_pb2.GetMemberRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.Member:
        async with self._unit_of_work() as uow:
            member, phone = await self._handlers.get(
                uow, request.member_id, request.include_pii, request.accessor, request.purpose
            )
        return member_message(member, phone)

    async def ResolveMemberIds(
        self, request: member_pb2.ResolveMemberIdsRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.ResolveMemberIdsResponse:
        async with self._db.reading() as uow:
            answers = await self._handlers.resolve_ids(uow, list(request.member_ids))
        return member_pb2.ResolveMemberIdsResponse(
            members=[
                member_pb2.ResolvedMemberId(
                    member_id=a.member_id,
                    state=RESOLVED_STATES[a.state],
                    survivor_id=a.survivor_id,
                )
                for a in answers
            ]
        )

    async def ResolveMember(
        self, request: member_pb2.ResolveMemberRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.Member:
        store_id = _store_id(request.store_id)
        ident = request.identifier
        id_type = ID_TYPES.get(ident.type)
        if id_type is None:
            raise InvalidArgument(
                "identifier.type is missing or unknown",
                code="UNKNOWN_IDENTIFIER_TYPE",
                field="identifier.type",
            )
        observed = normalise(id_type, ident.value, ident.namespace, False, "identifier.value")
        if (
            store_id
            and self._cache is not None
            and self._velocity is not None
            and observed.id_type is not IdType.MEMBER_NUMBER
        ):
            # The POS identify of a known member: one script answers and counts.
            return member_message(await self._resolve_counting(observed, store_id))
        member = await self._resolve(observed)
        if store_id:
            await self._count_stores([observed], store_id, member.member_id)
        return member_message(member)

    async def _resolve_counting(self, observed: ObservedIdentifier, store_id: str) -> MemberRecord:
        """_resolve and _count_stores of one identifier at a till: a cached
        answer is read and the store counted in one Redis script; a miss reads
        Postgres, fills, and counts as before (the member is known only then)."""
        assert self._cache is not None and self._velocity is not None
        velocity = self._velocity
        # Junk names nobody and is not counted (before any lookup, Redis included).
        self._handlers.refuse_junk(observed)
        value_hash = self._handlers.lookup_hash(observed)
        at = velocity.now()
        cached, seen = await self._cache.get_counting(
            value_hash, velocity.keys(value_hash), velocity.args(store_id, at)
        )
        if isinstance(cached, MemberRecord):
            if seen is not None and int(seen[0]) == 1:
                sighting = Sighting(
                    observed.id_type.value,
                    observed.namespace,
                    value_hash,
                    mask(observed.id_type, observed.value),
                )
                burst = velocity.burst(sighting, seen, at)
                if burst is not None:
                    await self._flag(burst, cached.member_id)
            return cached
        async with self._unit_of_work() as uow:
            member = await self._handlers.resolve_identifier(uow, observed)
        await self._cache.fill(value_hash, member, cached)
        await self._count_stores([observed], store_id, member.member_id)
        return member

    async def _resolve(self, observed: ObservedIdentifier) -> MemberRecord:
        if self._cache is None:
            async with self._unit_of_work() as uow:
                return await self._handlers.resolve_identifier(uow, observed)
        # The POS identify of a known member lands here first (gateway/pos.py).
        # The blocklist first: an answer cached before it listed a value stays
        # in Redis until its TTL.
        self._handlers.refuse_junk(observed)
        value_hash = self._handlers.lookup_hash(observed)
        cached = await self._cache.get(value_hash)
        if isinstance(cached, MemberRecord):
            return cached
        async with self._unit_of_work() as uow:
            member = await self._handlers.resolve_identifier(uow, observed)
        await self._cache.fill(value_hash, member, cached)
        return member

    async def _count_stores(
        self, observed: list[ObservedIdentifier], store_id: str, member_id: str
    ) -> None:
        """The velocity watch counts the store for each identifier the till
        presented; a burst it sees start is flagged (row, event, metric). Never
        fails the call: the member is served either way."""
        if self._velocity is None:
            return
        # One per identifier (a call may repeat one); junk and member numbers
        # (printed on receipts, never typed for strangers) are not counted.
        sightings = {
            s.value_hash: s
            for s in (
                Sighting(
                    o.id_type.value,
                    o.namespace,
                    self._handlers.lookup_hash(o),
                    mask(o.id_type, o.value),
                )
                for o in observed
                if o.id_type is not IdType.MEMBER_NUMBER
                and not self._handlers.policy.is_junk(o.id_type, o.value)
            )
        }
        for burst in await self._velocity.observe(list(sightings.values()), store_id):
            await self._flag(burst, member_id)

    async def _flag(self, burst: Burst, member_id: str) -> None:
        """A burst the velocity watch saw start: its flag (row, event, metric);
        if that cannot be written, the burst is cleared so the next sighting
        flags. Never fails the call."""
        velocity = self._velocity
        assert velocity is not None
        try:
            flag = functools.partial(
                self._handlers.flag_velocity,
                burst=burst,
                member_id=member_id,
                window_seconds=velocity.window_seconds,
            )
            await self._in_transaction(flag)
        except Exception:
            log.exception("velocity flag not written; the next sighting flags again")
            await velocity.forget(burst)
            return
        self._metrics.velocity_flagged.labels(identifier_type=burst.sighting.id_type).inc()

    async def ListIdentities(
        self, request: member_pb2.ListIdentitiesRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.ListIdentitiesResponse:
        async with self._unit_of_work() as uow:
            views = await self._handlers.identities(
                uow, request.member_id, request.include_pii, request.accessor, request.purpose
            )
        return member_pb2.ListIdentitiesResponse(
            identities=[
                member_pb2.Identity(
                    type=PROTO_ID_TYPES[IdType(v.id_type)],
                    namespace=v.namespace,
                    value_masked=v.value_masked,
                    verified=v.verified,
                    source=v.source,
                    attached_at=timestamp(v.attached_at),
                    member_id=v.member_id,
                    value=value,
                    value_hash=v.value_hash,
                )
                for v, value in views
            ]
        )

    # ---- operators -------------------------------------------------------------

    async def ListMergeReviews(
        self, request: member_pb2.ListMergeReviewsRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.ListMergeReviewsResponse:
        async with self._unit_of_work() as uow:
            rows, token = await self._handlers.list_reviews(
                uow, request.status, request.page_size, request.page_token
            )
        return member_pb2.ListMergeReviewsResponse(
            reviews=[review_message(r) for r in rows], next_page_token=token
        )

    async def ApproveMergeReview(
        self, request: member_pb2.DecideMergeReviewRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.MergeReview:
        row = await self._in_transaction(
            lambda uow: self._handlers.approve_review(
                uow, request.review_id, request.operator, request.note
            )
        )
        return review_message(row)

    async def RejectMergeReview(
        self, request: member_pb2.DecideMergeReviewRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.MergeReview:
        async with self._unit_of_work() as uow:
            row = await self._handlers.reject_review(
                uow, request.review_id, request.operator, request.note
            )
        return review_message(row)

    async def MergeMembers(
        self, request: member_pb2.MergeMembersRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.MergeMembersResponse:
        member, records = await self._in_transaction(
            lambda uow: self._handlers.merge_members(
                uow, list(request.member_ids), request.operator, request.reason
            )
        )
        return member_pb2.MergeMembersResponse(
            member=member_message(member), merges=[merge_message(r) for r in records]
        )

    async def UnmergeMember(
        self, request: member_pb2.UnmergeMemberRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.UnmergeMemberResponse:
        survivor, restored = await self._in_transaction(
            lambda uow: self._handlers.unmerge(
                uow, request.merge_id, request.operator, request.reason
            )
        )
        return member_pb2.UnmergeMemberResponse(
            survivor=member_message(survivor), restored=member_message(restored)
        )

    async def ListQuarantinedIdentifiers(
        self,
        request: member_pb2.ListQuarantinedIdentifiersRequest,
        context: grpc.aio.ServicerContext,
    ) -> member_pb2.ListQuarantinedIdentifiersResponse:
        async with self._unit_of_work() as uow:
            rows, token = await self._handlers.list_quarantined(
                uow, request.page_size, request.page_token
            )
        return member_pb2.ListQuarantinedIdentifiersResponse(
            next_page_token=token,
            identifiers=[
                member_pb2.QuarantinedIdentifier(
                    type=PROTO_ID_TYPES[IdType(r.id_type)],
                    namespace=r.namespace,
                    value_masked=r.value_masked,
                    linked_members=r.linked_members,
                    quarantined_at=timestamp(r.quarantined_at),
                )
                for r in rows
            ],
        )

    async def ListMemberMerges(
        self, request: member_pb2.ListMemberMergesRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.ListMemberMergesResponse:
        async with self._unit_of_work() as uow:
            rows = await self._handlers.list_merges(uow, request.member_id)
        return member_pb2.ListMemberMergesResponse(merges=[merge_message(r) for r in rows])

    async def ListVelocityFlags(
        self, request: member_pb2.ListVelocityFlagsRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.ListVelocityFlagsResponse:
        async with self._unit_of_work() as uow:
            rows, token = await self._handlers.list_velocity_flags(
                uow, request.page_size, request.page_token
            )
        return member_pb2.ListVelocityFlagsResponse(
            next_page_token=token,
            flags=[
                member_pb2.VelocityFlag(
                    flag_id=r.flag_id,
                    type=PROTO_ID_TYPES[IdType(r.id_type)],
                    namespace=r.namespace,
                    value_masked=r.value_masked,
                    member_id=r.member_id,
                    store_count=r.store_count,
                    store_ids=r.store_ids,
                    window_seconds=r.window_seconds,
                    flagged_at=timestamp(r.flagged_at),
                )
                for r in rows
            ],
        )

    # ---- profile and consent -------------------------------------------------

    async def GetMemberAnalytics(
        self, request: common_pb2.AnalyticsFilter, context: grpc.aio.ServicerContext
    ) -> member_pb2.MemberAnalytics:
        r = day_range(request)
        async with self._db.reading() as uow:
            c = await member_counts(uow.conn, r)
        return member_pb2.MemberAnalytics(
            total=c.total,
            new_members=c.new_members,
            new_by_day=[common_pb2.KeyCount(key=k, count=n) for k, n in c.new_by_day],
            new_by_channel=[common_pb2.KeyCount(key=k, count=n) for k, n in c.new_by_channel],
            new_by_store=[common_pb2.KeyCount(key=k, count=n) for k, n in c.new_by_store],
        )

    async def GetProfile(
        self, request: member_pb2.GetProfileRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.Profile:
        async with self._unit_of_work() as uow:
            profile = await self._handlers.profile(uow, request.member_id)
        return profile_message(profile)

    async def UpdateProfile(
        self, request: member_pb2.UpdateProfileRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.Profile:
        values: dict[str, str] = {}
        for name in PROFILE_FIELDS:
            if not request.HasField(name):
                continue
            if name == "gender":
                gender = GENDERS.get(request.gender)
                if gender is None:
                    raise InvalidArgument(
                        "gender is female, male or other", code="INVALID_GENDER", field="gender"
                    )
                values[name] = gender
            else:
                values[name] = getattr(request, name)
        async with self._unit_of_work() as uow:
            profile = await self._handlers.update_profile(
                uow, request.member_id, values, request.source, request.verified
            )
        return profile_message(profile)

    async def SetConsent(
        self, request: member_pb2.SetConsentRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.Profile:
        purpose = PURPOSES.get(request.purpose)
        if purpose is None:
            raise InvalidArgument(
                "purpose is missing or unknown", code="INVALID_CONSENT_PURPOSE", field="purpose"
            )
        channel = CHANNELS.get(request.channel)
        if channel is None:
            raise InvalidArgument(
                "channel is missing or unknown", code="INVALID_CONSENT_CHANNEL", field="channel"
            )
        async with self._unit_of_work() as uow:
            profile = await self._handlers.set_consent(
                uow,
                request.member_id,
                purpose,
                channel,
                request.granted,
                request.source,
                request.actor,
            )
        return profile_message(profile)

    async def ListConsentHistory(
        self, request: member_pb2.ListConsentHistoryRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.ListConsentHistoryResponse:
        async with self._unit_of_work() as uow:
            records = await self._handlers.consent_history(uow, request.member_id)
        return member_pb2.ListConsentHistoryResponse(records=[consent_message(r) for r in records])

    # ---- erasure, keys, member code ------------------------------------------

    async def EraseMember(
        self, request: member_pb2.EraseMemberRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.EraseMemberResponse:
        erased, suppressed = await self._in_transaction(
            lambda uow: self._handlers.erase(
                uow, request.member_id, request.operator, request.reason
            )
        )
        return member_pb2.EraseMemberResponse(
            erased_member_ids=erased, identifiers_suppressed=suppressed
        )

    async def ReencryptPii(
        self, request: member_pb2.ReencryptPiiRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.ReencryptPiiResponse:
        async with self._unit_of_work() as uow:
            done, remaining = await self._handlers.reencrypt(uow, request.batch_size)
        return member_pb2.ReencryptPiiResponse(reencrypted=done, remaining=remaining)

    async def IssueMemberCode(
        self, request: member_pb2.IssueMemberCodeRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.MemberCode:
        async with self._unit_of_work() as uow:
            issued = await self._handlers.issue_code(uow, request.member_id)
        return member_pb2.MemberCode(
            code=issued.code,
            expires_at=timestamp(issued.expires_at),
            refresh_after_seconds=issued.refresh_after_seconds,
        )

    async def RedeemMemberCode(
        self, request: member_pb2.RedeemMemberCodeRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.Member:
        async with self._unit_of_work() as uow:
            member = await self._handlers.redeem_code(uow, request.code, request.source)
        return member_message(member)
