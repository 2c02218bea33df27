"""Member routes (member service; spend from tiering).

Mini-program: login/identify (openid + unionid), phone binding, profile,
consent, member code. Operators, under /v1/admin/...: the OneID review
queue, merge, unmerge, erasure, quarantined identifiers and audited PII
reads, each audited under the authenticated principal (gateway/principal.py).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.config import JsonDict

from loyalty.member.v1 import member_pb2
from servicekit.errors import InvalidArgument, PermissionDenied
from servicekit.protos import to_datetime

from ..auth.model import ClientKind, Credential
from ..clients import identifier_fields
from ..errors import DownstreamError
from ..principal import principal
from .common import (
    MEMBER_ERRORS,
    MEMBER_ID_EXAMPLE,
    MemberId,
    downstreams,
    problem_response,
    utc,
)

# Every route here is about a member (or a merge of members): one error table.
router = APIRouter(responses=MEMBER_ERRORS)

# Examples of what the API answers (times come back in UTC): one person who
# enrolled in 2025 (MEMBER_EXAMPLE), enrolled again from another app in 2026
# (ABSORBED_MEMBER_EXAMPLE), and the merge, review and erasure of the two.
ABSORBED_MEMBER_ID_EXAMPLE = "6f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a09"
REVIEW_ID_EXAMPLE = "3e9d8c7b-6a5f-4e4d-9c3b-2a1f0e9d8c7b"
MERGE_ID_EXAMPLE = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
MEMBER_EXAMPLE: JsonDict = {
    "member_id": MEMBER_ID_EXAMPLE,
    # Member numbers are the digits of a sequence (member.member_number_seq).
    "member_number": "10001024",
    "phone_masked": "139****5678",
    "registered_at": "2025-03-08T06:30:00Z",
}
ABSORBED_MEMBER_EXAMPLE: JsonDict = {
    "member_id": ABSORBED_MEMBER_ID_EXAMPLE,
    "member_number": "10583317",
    "phone_masked": "186****2201",
    "registered_at": "2026-04-12T09:41:27Z",
}
# What identify records as evidence: every identifier of the call, masked.
OPENID_EVIDENCE = "wechat_openid:oG************************JE"
PHONE_EVIDENCE = "phone:139****5678 (verified)"


class Member(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [MEMBER_EXAMPLE]})

    member_id: str
    member_number: str = Field(description="Short human-facing member number")
    phone_masked: str = Field(description="Masked phone, empty when none is known")
    registered_at: datetime = Field(description="RFC 3339, UTC")


class MemberSpend(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "member_id": MEMBER_ID_EXAMPLE,
                    "total_paid_fen": 3200,
                    "order_count": 1,
                    "last_order_at": "2025-03-08T06:31:00Z",
                    "tier_code": "SVIP",
                    "tier_name": "SVIP",
                }
            ]
        }
    )

    member_id: str
    total_paid_fen: int = Field(description="Everything the member paid, in fen (1/100 yuan)")
    order_count: int
    last_order_at: datetime | None = Field(description="RFC 3339, UTC; null before any order")
    tier_code: str | None = Field(
        description="Tier the current programme gives for these totals; null when none applies"
    )
    tier_name: str | None = None


@router.get(
    "/v1/members/{member_id}",
    response_model=Member,
    tags=["members"],
    summary="A member's profile",
)
async def get_member(member_id: MemberId, request: Request) -> Member:
    reply = await downstreams(request).member.get_member(str(member_id))
    return Member(
        member_id=reply.member_id,
        member_number=reply.member_number,
        phone_masked=reply.phone_masked,
        registered_at=utc(reply.registered_at),
    )


@router.get(
    "/v1/members/{member_id}/spend",
    response_model=MemberSpend,
    tags=["members"],
    summary="What the member has spent, as tiering counts it",
)
async def get_spend(member_id: MemberId, request: Request) -> MemberSpend:
    reply = await downstreams(request).tiering.get_member_spend(str(member_id))
    return MemberSpend(
        member_id=reply.member_id or str(member_id),
        total_paid_fen=reply.total_paid_fen,
        order_count=reply.order_count,
        last_order_at=to_datetime(reply.last_order_at),
        tier_code=reply.tier_code or None,
        tier_name=reply.tier_name or None,
    )


# ---- OneID: mini-program login and phone binding ---------------------------

# bind-phone's answer when the phone belongs to another member it did not merge.
PHONE_OWNED_ELSEWHERE = "PHONE_OWNED_ELSEWHERE"

RequestKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        description="Client-chosen key; a retry with the same key returns the first answer",
        examples=["login-7f3c2a"],
    ),
]


class CausedMerge(BaseModel):
    merge_id: str = Field(description="Pass to /v1/admin/merges/{merge_id}/unmerge to undo it")
    absorbed_member_id: str = Field(description="The member merged into `member`")
    rule: str = Field(description='Why it merged, e.g. "identify:phone" (the merge key)')


class IgnoredIdentifier(BaseModel):
    field: str = Field(description="The request field that was not used")
    reason: str = Field(description="JUNK, QUARANTINED, LIMIT or OWNED_ELSEWHERE")


class Identified(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                # A first login: a new member, no phone yet.
                {
                    "member": {
                        "member_id": ABSORBED_MEMBER_ID_EXAMPLE,
                        "member_number": "10583317",
                        "phone_masked": "",
                        "registered_at": "2026-04-12T09:41:27Z",
                    },
                    "created": True,
                    "merged_member_ids": [],
                    "review_id": None,
                    "ignored": [],
                    "replayed": False,
                },
                # bind-phone: the verified phone belonged to an older member,
                # which survives and absorbs the one of this openid.
                {
                    "member": MEMBER_EXAMPLE,
                    "created": False,
                    "merged_member_ids": [ABSORBED_MEMBER_ID_EXAMPLE],
                    "merges": [
                        {
                            "merge_id": MERGE_ID_EXAMPLE,
                            "absorbed_member_id": ABSORBED_MEMBER_ID_EXAMPLE,
                            "rule": "identify:phone",
                        }
                    ],
                    "review_id": None,
                    "ignored": [],
                    "replayed": False,
                },
                # bind-phone: the phone belongs to another member and merging
                # would break a limit (two unionids), so an operator reviews
                # it; meanwhile the caller gets its own member, never the
                # other one, and the phone stays where it was.
                {
                    "member": {
                        "member_id": ABSORBED_MEMBER_ID_EXAMPLE,
                        "member_number": "10583317",
                        "phone_masked": "",
                        "registered_at": "2026-04-12T09:41:27Z",
                    },
                    "created": False,
                    "merged_member_ids": [],
                    "review_id": REVIEW_ID_EXAMPLE,
                    "ignored": [{"field": "phone", "reason": "OWNED_ELSEWHERE"}],
                    "replayed": False,
                    "conflict": "PHONE_OWNED_ELSEWHERE",
                },
            ]
        }
    )

    member: Member
    created: bool = Field(description="True when this call enrolled the member")
    merged_member_ids: list[str] = Field(description="Members merged into `member` by this call")
    merges: list[CausedMerge] = Field(
        default_factory=list, description="The merges this call made, by id and rule"
    )
    review_id: str | None = Field(
        description="Set when the identifiers linked members an operator must review"
    )
    ignored: list[IgnoredIdentifier]
    replayed: bool = Field(description="True when this answers a retry of the same request_key")
    conflict: str | None = Field(
        default=None,
        description="bind-phone: PHONE_OWNED_ELSEWHERE when the phone stays with another "
        "member; `member` is then still the caller's own",
    )


# What a mini-program sends when it has no unionid: an empty string or the
# string form of JavaScript's null/undefined. Absent, not an identifier.
PLACEHOLDERS = frozenset({"", "null", "undefined", "none", "nil", "nan"})


class LoginRequest(BaseModel):
    request_key: RequestKey
    app_id: str = Field(min_length=1, max_length=64, description="Mini-program appid")
    openid: str = Field(min_length=1, max_length=128)
    unionid: str | None = Field(
        default=None,
        max_length=128,
        description='When WeChat gave one; "", "null" and "undefined" count as absent',
    )

    @field_validator("unionid")
    @classmethod
    def _placeholder_is_absent(cls, value: str | None) -> str | None:
        if value is not None and value.strip().lower() in PLACEHOLDERS:
            return None
        return value


class BindPhoneRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_key": "bind-2b7e41",
                    "app_id": "wx8d5f0c1a2b3c4d5e",
                    "openid": "oGZUI0egBJY1zhBYw2KhdUfwVJJE",
                    "code": "e31968a7f94cc5ee25fafc2aef2773f0bb8c3937b22520eb8ee345274d00c144",
                }
            ]
        }
    )

    request_key: RequestKey
    app_id: str = Field(min_length=1, max_length=64)
    openid: str = Field(min_length=1, max_length=128)
    code: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="WeChat's phone-number code (getPhoneNumber): the gateway asks WeChat "
        "for the phone, which is then verified and may merge",
    )
    phone: str | None = Field(
        default=None,
        min_length=1,
        max_length=32,
        description="A phone the backend only asserts (e.g. typed by the member): attached "
        "unverified, never merges; give `code` or `phone`, not both",
    )


def _member(reply: member_pb2.Member) -> Member:
    return Member(
        member_id=reply.member_id,
        member_number=reply.member_number,
        phone_masked=reply.phone_masked,
        registered_at=utc(reply.registered_at),
    )


def _identified(reply: member_pb2.IdentifyMemberResponse, names: list[str]) -> Identified:
    return Identified(
        member=_member(reply.member),
        created=reply.created,
        merged_member_ids=list(reply.merged_member_ids),
        merges=[
            CausedMerge(merge_id=m.merge_id, absorbed_member_id=m.absorbed_member_id, rule=m.rule)
            for m in reply.merges
        ],
        review_id=reply.review_id or None,
        ignored=[IgnoredIdentifier(field=names[i.index], reason=i.reason) for i in reply.ignored],
        replayed=reply.replayed,
    )


def _require_app(request: Request, app_id: str) -> None:
    """A mini-program backend speaks only for the WeChat apps it was registered
    with (`clients create --app-id`); other kinds are not bound to apps."""
    credential: Credential | None = getattr(request.state, "credential", None)
    if (
        credential is not None
        and credential.kind is ClientKind.MINIPROGRAM_BACKEND
        and app_id not in credential.app_ids
    ):
        raise PermissionDenied(
            f"client {credential.client_id} is not registered for app {app_id}",
            code="APP_NOT_BOUND",
            field="app_id",
        )


def _openid(body: LoginRequest | BindPhoneRequest) -> member_pb2.Identifier:
    return member_pb2.Identifier(
        type=member_pb2.IDENTIFIER_TYPE_WECHAT_OPENID, value=body.openid, namespace=body.app_id
    )


@router.post(
    "/v1/members/identify",
    response_model=Identified,
    tags=["members"],
    summary="Mini-program login: the member of an openid (and unionid), enrolled if new",
)
async def identify(body: LoginRequest, request: Request) -> Identified:
    _require_app(request, body.app_id)
    idents = [_openid(body)]
    names = ["openid"]
    if body.unionid is not None:
        # Issued by WeChat for this login: proof, so it may merge.
        idents.append(
            member_pb2.Identifier(
                type=member_pb2.IDENTIFIER_TYPE_WECHAT_UNIONID, value=body.unionid, verified=True
            )
        )
        names.append("unionid")
    reply = await downstreams(request).member.identify(
        idents, f"mini-program:{body.app_id}", body.request_key, identifier_fields(names)
    )
    return _identified(reply, names)


@router.post(
    "/v1/members/bind-phone",
    response_model=Identified,
    tags=["members"],
    summary="Phone authorisation: bind the phone WeChat verified (merging the member that "
    "already has it), or attach an unverified one",
    responses={
        403: problem_response("The client is not registered for this app (APP_NOT_BOUND)"),
    },
)
async def bind_phone(body: BindPhoneRequest, request: Request) -> Identified:
    _require_app(request, body.app_id)
    if (body.code is None) == (body.phone is None):
        raise InvalidArgument(
            "give exactly one of code (WeChat's phone code) or phone (unverified)",
            code="CODE_OR_PHONE_REQUIRED",
            field="code",
        )
    down = downstreams(request)
    source = f"mini-program:{body.app_id}"
    openid = _openid(body)
    if body.code is not None:
        # Proven: WeChat says this WeChat user holds this phone. May merge.
        phone = await down.wechat.verified_phone(body.app_id, body.code)
        verified = True
    else:
        # Only asserted by the backend: attach-only, never a merge key. The
        # openid must first be a member of its own, or identify would attach
        # it to whoever holds the phone (the highest-priority owner).
        assert body.phone is not None
        phone, verified = body.phone, False
        await down.member.identify(
            [openid], source, f"{body.request_key}:login", identifier_fields(["openid"])
        )
    idents = [
        openid,
        member_pb2.Identifier(
            type=member_pb2.IDENTIFIER_TYPE_PHONE, value=phone, verified=verified
        ),
    ]
    names = ["openid", "phone"]
    reply = await down.member.identify(idents, source, body.request_key, identifier_fields(names))
    if not any(i.index == 0 for i in reply.ignored):
        return _identified(reply, names)
    # The phone's member answered, not the openid's: the phone stays with that
    # other member. Answer with the caller's own member, never the other one.
    try:
        own = await down.member.resolve_member(openid, {"identifier.value": "openid"})
    except DownstreamError as exc:
        if exc.code != "UNKNOWN_IDENTIFIER":
            raise
        # The openid could not be attached there (a limit): it enrols on its own.
        own = (
            await down.member.identify(
                [openid], source, f"{body.request_key}:own", identifier_fields(["openid"])
            )
        ).member
    return Identified(
        member=_member(own),
        created=False,
        merged_member_ids=[],
        review_id=reply.review_id or None,
        ignored=[IgnoredIdentifier(field="phone", reason="OWNED_ELSEWHERE")],
        replayed=reply.replayed,
        conflict=PHONE_OWNED_ELSEWHERE,
    )


# ---- profile and consent -----------------------------------------------------

Gender = Literal["female", "male", "other"]
Purpose = Literal["marketing", "personalisation"]
Channel = Literal["wecom", "sms", "mini_program", "app_push", "all"]

GENDERS: dict[str, int] = {
    "female": member_pb2.GENDER_FEMALE,
    "male": member_pb2.GENDER_MALE,
    "other": member_pb2.GENDER_OTHER,
}
GENDER_NAMES = {v: k for k, v in GENDERS.items()}
PURPOSES: dict[str, int] = {
    "marketing": member_pb2.CONSENT_PURPOSE_MARKETING,
    "personalisation": member_pb2.CONSENT_PURPOSE_PERSONALISATION,
}
PURPOSE_NAMES = {v: k for k, v in PURPOSES.items()}
CHANNELS: dict[str, int] = {
    "wecom": member_pb2.CONSENT_CHANNEL_WECOM,
    "sms": member_pb2.CONSENT_CHANNEL_SMS,
    "mini_program": member_pb2.CONSENT_CHANNEL_MINI_PROGRAM,
    "app_push": member_pb2.CONSENT_CHANNEL_APP_PUSH,
    "all": member_pb2.CONSENT_CHANNEL_ALL,
}
CHANNEL_NAMES = {v: k for k, v in CHANNELS.items()}


class Consent(BaseModel):
    purpose: Purpose
    channel: Channel = Field(description="`all` for personalisation, which is not per channel")
    granted: bool
    source: str
    actor: str
    recorded_at: datetime


MARKETING_SMS_EXAMPLE: JsonDict = {
    "purpose": "marketing",
    "channel": "sms",
    "granted": True,
    "source": "mini-program:privacy",
    "actor": "member",
    "recorded_at": "2026-04-12T09:45:02Z",
}
PERSONALISATION_EXAMPLE: JsonDict = {
    "purpose": "personalisation",
    "channel": "all",
    "granted": True,
    "source": "mini-program:privacy",
    "actor": "member",
    "recorded_at": "2026-04-12T09:45:02Z",
}
MARKETING_WECOM_EXAMPLE: JsonDict = {
    "purpose": "marketing",
    "channel": "wecom",
    "granted": False,
    "source": "wecom:unsubscribe",
    "actor": "member",
    "recorded_at": "2026-05-20T13:02:51Z",
}


class Profile(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "member_id": MEMBER_ID_EXAMPLE,
                    "nickname": "小满",
                    "birthday": "1998-06-21",
                    "gender": "female",
                    "registration_store_id": "SH001",
                    "acquisition_channel": "wecom",
                    "acquisition_campaign": "2026-spring-invite",
                    "consents": [
                        MARKETING_SMS_EXAMPLE,
                        MARKETING_WECOM_EXAMPLE,
                        PERSONALISATION_EXAMPLE,
                    ],
                    "personalisation_allowed": True,
                },
                # Nothing recorded yet: no consent (opt-in), no personalisation.
                {
                    "member_id": ABSORBED_MEMBER_ID_EXAMPLE,
                    "nickname": None,
                    "birthday": None,
                    "gender": None,
                    "registration_store_id": None,
                    "acquisition_channel": None,
                    "acquisition_campaign": None,
                    "consents": [],
                    "personalisation_allowed": False,
                },
            ]
        }
    )

    member_id: str
    nickname: str | None
    birthday: str | None = Field(description="YYYY-MM-DD")
    gender: Gender | None
    registration_store_id: str | None
    acquisition_channel: str | None
    acquisition_campaign: str | None
    consents: list[Consent] = Field(description="The effective choice per purpose and channel")
    personalisation_allowed: bool = Field(
        description="False is the member's 'no personalisation' choice (and the default)"
    )
    time_zone: str | None = Field(
        default=None,
        description="The member's IANA zone (journeys' quiet hours and caps); null: the "
        "registration store's",
    )


class ProfileUpdate(BaseModel):
    nickname: str | None = Field(default=None, max_length=64)
    birthday: str | None = Field(default=None, max_length=10, examples=["1995-04-01"])
    gender: Gender | None = None
    registration_store_id: str | None = Field(default=None, max_length=64)
    acquisition_channel: str | None = Field(default=None, max_length=64)
    acquisition_campaign: str | None = Field(default=None, max_length=64)
    time_zone: str | None = Field(default=None, max_length=64, examples=["Europe/London"])
    source: str = Field(min_length=1, max_length=128, examples=["mini-program"])
    verified: bool = Field(default=True, description="The member entered or confirmed it")


class ConsentChoice(BaseModel):
    purpose: Purpose
    channel: Channel
    granted: bool
    source: str = Field(min_length=1, max_length=128, examples=["mini-program:privacy"])
    actor: str = Field(default="member", min_length=1, max_length=128)


class ConsentHistory(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "records": [
                        MARKETING_SMS_EXAMPLE,
                        {**MARKETING_SMS_EXAMPLE, "channel": "wecom"},
                        PERSONALISATION_EXAMPLE,
                        MARKETING_WECOM_EXAMPLE,
                    ]
                }
            ]
        }
    )

    records: list[Consent] = Field(description="Oldest first, over the merged member")


def _consent(c: member_pb2.Consent) -> Consent:
    return Consent(
        purpose=PURPOSE_NAMES[c.purpose],  # type: ignore[arg-type]
        channel=CHANNEL_NAMES[c.channel],  # type: ignore[arg-type]
        granted=c.granted,
        source=c.source,
        actor=c.actor,
        recorded_at=utc(c.recorded_at),
    )


def _profile(p: member_pb2.Profile) -> Profile:
    return Profile(
        member_id=p.member_id,
        nickname=p.nickname or None,
        birthday=p.birthday or None,
        gender=GENDER_NAMES.get(p.gender),  # type: ignore[arg-type]
        registration_store_id=p.registration_store_id or None,
        acquisition_channel=p.acquisition_channel or None,
        acquisition_campaign=p.acquisition_campaign or None,
        consents=[_consent(c) for c in p.consents],
        personalisation_allowed=p.personalisation_allowed,
        time_zone=p.time_zone or None,
    )


@router.get(
    "/v1/members/{member_id}/profile",
    response_model=Profile,
    tags=["members"],
    summary="Profile and effective consents",
)
async def get_profile(member_id: MemberId, request: Request) -> Profile:
    reply = await downstreams(request).member.call(
        "GetProfile", member_pb2.GetProfileRequest(member_id=str(member_id))
    )
    return _profile(reply)


@router.patch(
    "/v1/members/{member_id}/profile",
    response_model=Profile,
    tags=["members"],
    summary="Record profile values (kept per source; the latest verified value shows)",
)
async def update_profile(member_id: MemberId, body: ProfileUpdate, request: Request) -> Profile:
    values: dict[str, Any] = body.model_dump(exclude_unset=True, exclude={"source", "verified"})
    if "gender" in values:
        values["gender"] = GENDERS[values["gender"]] if values["gender"] else 0
    update = member_pb2.UpdateProfileRequest(
        member_id=str(member_id),
        source=body.source,
        verified=body.verified,
        **{k: v for k, v in values.items() if v is not None},
    )
    reply = await downstreams(request).member.call("UpdateProfile", update)
    return _profile(reply)


@router.put(
    "/v1/members/{member_id}/consents",
    response_model=Profile,
    tags=["members"],
    summary="Record a consent choice (history is kept); personalisation/all=false is 'no personalisation'",
)
async def set_consent(member_id: MemberId, body: ConsentChoice, request: Request) -> Profile:
    reply = await downstreams(request).member.call(
        "SetConsent",
        member_pb2.SetConsentRequest(
            member_id=str(member_id),
            purpose=PURPOSES[body.purpose],  # type: ignore[arg-type]
            channel=CHANNELS[body.channel],  # type: ignore[arg-type]
            granted=body.granted,
            source=body.source,
            actor=body.actor,
        ),
    )
    return _profile(reply)


@router.get(
    "/v1/members/{member_id}/consents/history",
    response_model=ConsentHistory,
    tags=["members"],
    summary="Every consent choice: who, when, where",
)
async def consent_history(member_id: MemberId, request: Request) -> ConsentHistory:
    reply = await downstreams(request).member.call(
        "ListConsentHistory", member_pb2.ListConsentHistoryRequest(member_id=str(member_id))
    )
    return ConsentHistory(records=[_consent(c) for c in reply.records])


class MemberCode(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                # 8, the window's last digit, member number 10001024 in 10
                # digits, 8 digits of HMAC; good for this 30 s window and the next.
                {
                    "code": "83001000102447190582",
                    "expires_at": "2026-05-03T04:21:00Z",
                    "refresh_after_seconds": 18,
                }
            ]
        }
    )

    code: str = Field(description="20 digits; show as a barcode or QR code")
    expires_at: datetime
    refresh_after_seconds: int = Field(description="Ask for a new code after this long")


@router.post(
    "/v1/members/{member_id}/member-code",
    response_model=MemberCode,
    tags=["members"],
    summary="A fresh dynamic member code for the POS to scan (about a minute, once)",
)
async def member_code(member_id: MemberId, request: Request) -> MemberCode:
    reply = await downstreams(request).member.call(
        "IssueMemberCode", member_pb2.IssueMemberCodeRequest(member_id=str(member_id))
    )
    return MemberCode(
        code=reply.code,
        expires_at=utc(reply.expires_at),
        refresh_after_seconds=reply.refresh_after_seconds,
    )


# ---- operators (/v1/admin) -------------------------------------------------------
# Who acts is never a body field: every record names principal(request), the
# authenticated client (and the console's X-Operator-User); gateway/principal.py.

AnyId = Annotated[uuid.UUID, Path(description="A UUID")]


PENDING_REVIEW_EXAMPLE: JsonDict = {
    "review_id": REVIEW_ID_EXAMPLE,
    "status": "pending",
    "member_ids": [MEMBER_ID_EXAMPLE, ABSORBED_MEMBER_ID_EXAMPLE],
    "reason": "LIMIT_EXCEEDED:phone_verified",
    "detail": "merging would give one member more than allowed: phone_verified",
    "evidence": [OPENID_EVIDENCE, PHONE_EVIDENCE],
    "created_at": "2026-05-03T04:20:31Z",
    "decided_at": None,
    "decided_by": None,
    "note": None,
    "merge_ids": [],
}


class MergeReview(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **PENDING_REVIEW_EXAMPLE,
                    "status": "approved",
                    "decided_at": "2026-05-04T02:10:45Z",
                    "decided_by": "ops-li",
                    "note": "same person: the old phone was replaced",
                    "merge_ids": [MERGE_ID_EXAMPLE],
                },
                {
                    **PENDING_REVIEW_EXAMPLE,
                    "status": "rejected",
                    "decided_at": "2026-05-04T02:12:09Z",
                    "decided_by": "ops-li",
                    "note": "two family members sharing a phone",
                },
            ]
        }
    )

    review_id: str
    status: str
    member_ids: list[str]
    reason: str
    detail: str
    evidence: list[str] = Field(description="Masked identifiers that linked the members")
    created_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    note: str | None
    merge_ids: list[str]


class MergeReviews(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"reviews": [PENDING_REVIEW_EXAMPLE], "next_page_token": None}]
        }
    )

    reviews: list[MergeReview]
    next_page_token: str | None


class Decision(BaseModel):
    note: str = Field(default="", max_length=500)


class MergeRequest(BaseModel):
    member_ids: list[uuid.UUID] = Field(min_length=2, max_length=20)
    reason: str = Field(min_length=1, max_length=500)


class MergeRecord(BaseModel):
    merge_id: str
    survivor_member_id: str
    absorbed_member_id: str
    rule: str = Field(description='"identify:<type>" (automatic), "operator" or "review"')
    evidence: list[str] = Field(description="Masked identifiers, or the operator's reason")
    merged_at: datetime


class MemberMerge(MergeRecord):
    automatic: bool = Field(description="Merged by identify under the identity policy")
    actor: str = Field(description="The identify call's source, or the operator")
    status: Literal["active", "unmerged", "erased"]
    unmerged_at: datetime | None
    unmerged_by: str | None
    unmerge_reason: str | None


class MemberMerges(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "merges": [
                        {
                            "merge_id": MERGE_ID_EXAMPLE,
                            "survivor_member_id": MEMBER_ID_EXAMPLE,
                            "absorbed_member_id": ABSORBED_MEMBER_ID_EXAMPLE,
                            "rule": "identify:phone",
                            "evidence": [OPENID_EVIDENCE, PHONE_EVIDENCE],
                            "merged_at": "2026-05-04T02:10:45Z",
                            "automatic": True,
                            "actor": "mini-program:wx8d5f0c1a2b3c4d5e",
                            "status": "unmerged",
                            "unmerged_at": "2026-05-05T08:00:12Z",
                            "unmerged_by": "ops-li",
                            "unmerge_reason": "recycled phone number",
                        }
                    ]
                }
            ]
        }
    )

    merges: list[MemberMerge] = Field(description="Newest first, reversed ones included")


class Merged(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "member": MEMBER_EXAMPLE,
                    "merges": [
                        {
                            "merge_id": MERGE_ID_EXAMPLE,
                            "survivor_member_id": MEMBER_ID_EXAMPLE,
                            "absorbed_member_id": ABSORBED_MEMBER_ID_EXAMPLE,
                            "rule": "operator",
                            "evidence": ["reason:ticket 5521: same person, two phones"],
                            "merged_at": "2026-05-04T02:10:45Z",
                        }
                    ],
                }
            ]
        }
    )

    member: Member
    merges: list[MergeRecord]


class UnmergeRequest(BaseModel):
    reason: str = Field(min_length=1, max_length=500)


class Unmerged(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"survivor": MEMBER_EXAMPLE, "restored": ABSORBED_MEMBER_EXAMPLE}]
        }
    )

    survivor: Member
    restored: Member


class EraseRequest(BaseModel):
    reason: str = Field(min_length=1, max_length=500, examples=["PIPL request #1234"])


class Erased(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "erased_member_ids": [MEMBER_ID_EXAMPLE, ABSORBED_MEMBER_ID_EXAMPLE],
                    "identifiers_suppressed": 5,
                }
            ]
        }
    )

    erased_member_ids: list[str] = Field(description="The whole merged cluster, now tombstones")
    identifiers_suppressed: int


class MemberWithPii(Member):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{**MEMBER_EXAMPLE, "phone": "+8613912345678"}]}
    )

    phone: str | None = Field(description="E.164; this read is written to the PII audit")


class Quarantined(BaseModel):
    type: str
    namespace: str
    value_masked: str
    linked_members: int
    quarantined_at: datetime


class QuarantineList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "identifiers": [
                        {
                            "type": "phone",
                            "namespace": "",
                            "value_masked": "138****2046",
                            "linked_members": 4,
                            "quarantined_at": "2026-05-06T11:03:52Z",
                        },
                        {
                            "type": "pos_card",
                            "namespace": "",
                            "value_masked": "62************33",
                            "linked_members": 4,
                            "quarantined_at": "2026-05-02T03:14:07.512Z",
                        },
                    ],
                    # Opaque: pass it back as `cursor` as it is.
                    "next_cursor": "WyIyMDI2LTA1LTAyVDAzOjE0OjA3LjUxMjAwMCswMDowMCIsICJwb3NfY2FyZC"
                    "IsICIiLCAiYzI5YTE4OWMxODI0YzkxYWEzOWU5NTczNjJjNDU1MTVmNTM1NGFiYTgzOTZh"
                    "ZjNjNTUxYjk1ZDVhNzUzMjMwNCJd",
                },
                {"identifiers": [], "next_cursor": None},
            ]
        }
    )

    identifiers: list[Quarantined]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page")


# The operators' cursor-paged lists of identifiers (quarantined, velocity flags).
OperatorPageSize = Annotated[int, Query(ge=1, le=500)]
OperatorCursor = Annotated[
    str, Query(max_length=500, description="The previous page's next_cursor, as it was")
]


def _type_name(identifier_type: int) -> str:
    """IDENTIFIER_TYPE_POS_CARD -> "pos_card" (the member service's type names)."""
    return member_pb2.IdentifierType.Name(identifier_type).removeprefix("IDENTIFIER_TYPE_").lower()


def _review(r: member_pb2.MergeReview) -> MergeReview:
    return MergeReview(
        review_id=r.review_id,
        status=r.status,
        member_ids=list(r.member_ids),
        reason=r.reason,
        detail=r.detail,
        evidence=list(r.evidence),
        created_at=utc(r.created_at),
        decided_at=to_datetime(r.decided_at),
        decided_by=r.decided_by or None,
        note=r.note or None,
        merge_ids=list(r.merge_ids),
    )


@router.get(
    "/v1/admin/merge-reviews",
    response_model=MergeReviews,
    tags=["admin"],
    summary="The OneID review queue",
)
async def list_reviews(
    request: Request,
    status: Annotated[Literal["pending", "approved", "rejected", "closed"], Query()] = "pending",
    page_size: Annotated[int, Query(ge=1, le=500)] = 50,
    page_token: Annotated[str, Query(max_length=200)] = "",
) -> MergeReviews:
    reply = await downstreams(request).member.call(
        "ListMergeReviews",
        member_pb2.ListMergeReviewsRequest(
            status=status, page_size=page_size, page_token=page_token
        ),
    )
    return MergeReviews(
        reviews=[_review(r) for r in reply.reviews],
        next_page_token=reply.next_page_token or None,
    )


async def _decide(
    request: Request, method: str, review_id: uuid.UUID, body: Decision
) -> MergeReview:
    """Approve and reject take the same request and answer; only the RPC differs."""
    reply = await downstreams(request).member.call(
        method,
        member_pb2.DecideMergeReviewRequest(
            review_id=str(review_id), operator=principal(request), note=body.note
        ),
    )
    return _review(reply)


@router.post(
    "/v1/admin/merge-reviews/{review_id}/approve",
    response_model=MergeReview,
    tags=["admin"],
    summary="Approve: merge the review's members",
)
async def approve_review(review_id: AnyId, body: Decision, request: Request) -> MergeReview:
    return await _decide(request, "ApproveMergeReview", review_id, body)


@router.post(
    "/v1/admin/merge-reviews/{review_id}/reject",
    response_model=MergeReview,
    tags=["admin"],
    summary="Reject: the members stay apart (do-not-merge list)",
)
async def reject_review(review_id: AnyId, body: Decision, request: Request) -> MergeReview:
    return await _decide(request, "RejectMergeReview", review_id, body)


@router.post(
    "/v1/admin/members/merge",
    response_model=Merged,
    tags=["admin"],
    summary="Merge members known to be one person (the oldest survives)",
)
async def merge_members(body: MergeRequest, request: Request) -> Merged:
    reply = await downstreams(request).member.call(
        "MergeMembers",
        member_pb2.MergeMembersRequest(
            member_ids=[str(m) for m in body.member_ids],
            operator=principal(request),
            reason=body.reason,
        ),
    )
    return Merged(
        member=_member(reply.member),
        merges=[
            MergeRecord(
                merge_id=m.merge_id,
                survivor_member_id=m.survivor_member_id,
                absorbed_member_id=m.absorbed_member_id,
                rule=m.rule,
                evidence=list(m.evidence),
                merged_at=utc(m.merged_at),
            )
            for m in reply.merges
        ],
    )


@router.post(
    "/v1/admin/merges/{merge_id}/unmerge",
    response_model=Unmerged,
    tags=["admin"],
    summary="Reverse a merge (newest first when chained); the pair goes on do-not-merge",
)
async def unmerge(merge_id: AnyId, body: UnmergeRequest, request: Request) -> Unmerged:
    reply = await downstreams(request).member.call(
        "UnmergeMember",
        member_pb2.UnmergeMemberRequest(
            merge_id=str(merge_id), operator=principal(request), reason=body.reason
        ),
    )
    return Unmerged(survivor=_member(reply.survivor), restored=_member(reply.restored))


@router.get(
    "/v1/admin/members/{member_id}/merges",
    response_model=MemberMerges,
    tags=["admin"],
    summary="Every merge of the member's cluster, automatic or not, to find one to unmerge",
)
async def member_merges(member_id: MemberId, request: Request) -> MemberMerges:
    reply = await downstreams(request).member.call(
        "ListMemberMerges", member_pb2.ListMemberMergesRequest(member_id=str(member_id))
    )
    return MemberMerges(
        merges=[
            MemberMerge(
                merge_id=m.merge_id,
                survivor_member_id=m.survivor_member_id,
                absorbed_member_id=m.absorbed_member_id,
                rule=m.rule,
                evidence=list(m.evidence),
                merged_at=utc(m.merged_at),
                automatic=m.automatic,
                actor=m.actor,
                status=m.status,
                unmerged_at=to_datetime(m.unmerged_at),
                unmerged_by=m.unmerged_by or None,
                unmerge_reason=m.unmerge_reason or None,
            )
            for m in reply.merges
        ]
    )


@router.post(
    "/v1/admin/members/{member_id}/erase",
    response_model=Erased,
    tags=["admin"],
    summary="PIPL erasure of the member's whole merged cluster",
)
async def erase(member_id: MemberId, body: EraseRequest, request: Request) -> Erased:
    reply = await downstreams(request).member.call(
        "EraseMember",
        member_pb2.EraseMemberRequest(
            member_id=str(member_id), operator=principal(request), reason=body.reason
        ),
    )
    return Erased(
        erased_member_ids=list(reply.erased_member_ids),
        identifiers_suppressed=reply.identifiers_suppressed,
    )


@router.get(
    "/v1/admin/members/{member_id}/pii",
    response_model=MemberWithPii,
    tags=["admin"],
    summary="The member with the unmasked phone; every call is audited",
)
async def member_pii(
    member_id: MemberId,
    request: Request,
    purpose: Annotated[
        str, Query(min_length=1, max_length=500, description="Why (audited, free text)")
    ],
) -> MemberWithPii:
    # The accessor in the audit is who signed the request, not a parameter.
    reply = await downstreams(request).member.get_member(
        str(member_id), accessor=principal(request), purpose=purpose
    )
    return MemberWithPii(**_member(reply).model_dump(), phone=reply.phone or None)


class MemberLookup(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"phone": "13912345678"}]})

    phone: str | None = Field(default=None, min_length=1, max_length=32)
    member_number: str | None = Field(default=None, min_length=1, max_length=32)


@router.post(
    "/v1/admin/members/lookup",
    response_model=Member,
    tags=["admin"],
    summary="The member owning a phone or member number (masked; never enrols)",
    description="A POST so the identifier travels in the body, never in a URL or an "
    "access log line. 404 UNKNOWN_IDENTIFIER when no member owns it.",
)
async def lookup_member(body: MemberLookup, request: Request) -> Member:
    if (body.phone is None) == (body.member_number is None):
        raise InvalidArgument(
            "give exactly one of phone or member_number",
            code="PHONE_OR_MEMBER_NUMBER_REQUIRED",
            field="phone",
        )
    if body.phone is not None:
        identifier = member_pb2.Identifier(type=member_pb2.IDENTIFIER_TYPE_PHONE, value=body.phone)
        field = "phone"
    else:
        identifier = member_pb2.Identifier(
            type=member_pb2.IDENTIFIER_TYPE_MEMBER_NUMBER, value=body.member_number or ""
        )
        field = "member_number"
    reply = await downstreams(request).member.resolve_member(
        identifier, {"identifier.value": field, "identifier": field}
    )
    return _member(reply)


@router.get(
    "/v1/admin/quarantined-identifiers",
    response_model=QuarantineList,
    tags=["admin"],
    summary="Identifiers that linked too many members and no longer merge",
)
async def quarantined(
    request: Request,
    page_size: OperatorPageSize = 100,
    cursor: OperatorCursor = "",
) -> QuarantineList:
    reply = await downstreams(request).member.call(
        "ListQuarantinedIdentifiers",
        member_pb2.ListQuarantinedIdentifiersRequest(page_size=page_size, page_token=cursor),
        {"page_token": "cursor"},
    )
    return QuarantineList(
        identifiers=[
            Quarantined(
                type=_type_name(q.type),
                namespace=q.namespace,
                value_masked=q.value_masked,
                linked_members=q.linked_members,
                quarantined_at=utc(q.quarantined_at),
            )
            for q in reply.identifiers
        ],
        next_cursor=reply.next_page_token or None,
    )


class VelocityFlag(BaseModel):
    flag_id: str
    type: str = Field(description="phone, pos_card, ...")
    namespace: str
    value_masked: str = Field(description="The identifier, masked: never the value")
    member_id: str = Field(description="The member it resolved to when flagged")
    store_count: int = Field(description="Distinct stores within the window at the flag")
    store_ids: list[str]
    window_seconds: int
    flagged_at: datetime


class VelocityFlags(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "flags": [
                        {
                            "flag_id": "5c0f8e2a-7b1d-4c3e-9a6f-2d4b8e1c7a90",
                            "type": "phone",
                            "namespace": "",
                            "value_masked": "139****5678",
                            "member_id": MEMBER_ID_EXAMPLE,
                            "store_count": 5,
                            "store_ids": ["SH001", "SH002", "SH003", "SH004", "SH005"],
                            "window_seconds": 600,
                            "flagged_at": "2026-05-06T11:03:52Z",
                        }
                    ],
                    "next_cursor": None,
                }
            ]
        }
    )

    flags: list[VelocityFlag]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page")


@router.get(
    "/v1/admin/velocity-flags",
    response_model=VelocityFlags,
    tags=["admin"],
    summary="Identifiers presented at too many stores too fast (flagged, still served)",
)
async def velocity_flags(
    request: Request,
    page_size: OperatorPageSize = 100,
    cursor: OperatorCursor = "",
) -> VelocityFlags:
    reply = await downstreams(request).member.call(
        "ListVelocityFlags",
        member_pb2.ListVelocityFlagsRequest(page_size=page_size, page_token=cursor),
        {"page_token": "cursor"},
    )
    return VelocityFlags(
        flags=[
            VelocityFlag(
                flag_id=f.flag_id,
                type=_type_name(f.type),
                namespace=f.namespace,
                value_masked=f.value_masked,
                member_id=f.member_id,
                store_count=f.store_count,
                store_ids=list(f.store_ids),
                window_seconds=f.window_seconds,
                flagged_at=utc(f.flagged_at),
            )
            for f in reply.flags
        ],
        next_cursor=reply.next_page_token or None,
    )
