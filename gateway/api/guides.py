"""Guide routes (guides service, docs/guides.md): WeCom's customer-contact
callbacks (public, authenticated by WeCom's signature), and for operators
(every change audited under principal(request), never a body field):
store staff, directory sync, resigned-staff transfer, guide links, exclusive
bindings, order attribution, member tags and the private-domain reports."""

from __future__ import annotations

import asyncio
import uuid
from datetime import date, datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import grpc
from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from loyalty.guides.v1 import guides_pb2
from loyalty.member.v1 import member_pb2
from loyalty.rewards.v1 import rewards_pb2
from servicekit.errors import InvalidArgument

from ..errors import DownstreamError
from ..principal import principal
from .centre import CENTRE_EXAMPLE, MemberCentre, member_centre
from .common import MEMBER_ID_EXAMPLE, MemberId, downstreams, optional_utc, problem_response
from .coupons import CLAIMED_COUPON_EXAMPLE, Coupon, coupon_model

router = APIRouter()

# Suggested actions count days as the brand's stores do.
BRAND_TZ = ZoneInfo("Asia/Shanghai")

GUIDE_ERRORS: dict[int | str, dict[str, Any]] = {
    422: problem_response("Malformed request; `field` names the culprit"),
    404: problem_response("No such staff member, member or order"),
    503: problem_response("The guides service is unavailable; retry later"),
}

StaffId = Annotated[
    str,
    Path(
        description="The staff member's WeCom user id",
        examples=["zhangsan"],
        pattern=r"^[A-Za-z0-9_.@\-]{1,64}$",
    ),
]
Day = Annotated[str, Query(pattern=r"^\d{4}-\d{2}-\d{2}$", examples=["2026-05-01"])]

ROLES = {
    "guide": guides_pb2.STAFF_ROLE_GUIDE,
    "store_manager": guides_pb2.STAFF_ROLE_STORE_MANAGER,
    "operations": guides_pb2.STAFF_ROLE_OPERATIONS,
}
ROLE_NAMES = {v: k for k, v in ROLES.items()}
Role = Literal["guide", "store_manager", "operations"]
# WeCom's event messages are a few hundred bytes.
MAX_CALLBACK_BYTES = 65_536

STAFF_EXAMPLE: JsonDict = {
    "staff_id": "zhangsan",
    "name": "张三",
    "store_id": "SH001",
    "role": "guide",
    "status": "active",
    "staff_code": "G1024",
    "updated_by": "ops-li",
    "updated_at": "2026-05-01T02:00:00Z",
}


class StaffBody(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    store_id: str = Field(min_length=1, max_length=64)
    role: Role
    staff_code: str = Field(
        default="", max_length=64, description="Typed at the till; default the id"
    )


class Staff(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [STAFF_EXAMPLE]})

    staff_id: str
    name: str
    store_id: str
    role: str
    status: str = Field(examples=["active", "resigned"])
    staff_code: str
    updated_by: str
    updated_at: datetime | None


def _staff(s: guides_pb2.Staff) -> Staff:
    return Staff(
        staff_id=s.staff_id,
        name=s.name,
        store_id=s.store_id,
        role=ROLE_NAMES.get(s.role, "guide"),
        status=s.status,
        staff_code=s.staff_code,
        updated_by=s.actor,
        updated_at=optional_utc(s, "updated_at"),
    )


class StaffList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"staff": [STAFF_EXAMPLE]}]})

    staff: list[Staff]


class SyncResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"created": 3, "updated": 1, "resigned": 1, "unchanged": 40}]
        }
    )

    created: int
    updated: int
    resigned: int
    unchanged: int


class ResignBody(BaseModel):
    takeover_staff_id: str = Field(min_length=1, max_length=64)


class Resigned(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"transferred": 41, "failed": ["wmAJ2GCAAAme1Xq"]}]}
    )

    transferred: int = Field(
        description="Customers whose transfer WeCom started (errcode 0): pending until "
        "WeCom's transfer_result says taken over (status 1), when the binding follows"
    )
    failed: list[str] = Field(
        description="Customers WeCom refused to transfer; call again to retry"
    )


class GuideLink(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"staff_id": "zhangsan", "guide_ref": "zhangsan.1777600000.q8Yc1nq2"}]
        }
    )

    staff_id: str
    guide_ref: str = Field(description="The value of the shared link's `guide` parameter")


class BindingChange(BaseModel):
    from_staff_id: str
    to_staff_id: str
    reason: str = Field(examples=["wecom_add", "operator:complaint", "resigned_transfer"])
    actor: str
    changed_at: datetime | None


BINDING_EXAMPLE: JsonDict = {
    "member_id": MEMBER_ID_EXAMPLE,
    "staff_id": "zhangsan",
    "store_id": "SH001",
    "bound_at": "2026-05-01T02:00:00Z",
    "history": [
        {
            "from_staff_id": "",
            "to_staff_id": "zhangsan",
            "reason": "wecom_add",
            "actor": "wecom",
            "changed_at": "2026-05-01T02:00:00Z",
        }
    ],
}


class Binding(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [BINDING_EXAMPLE]})

    member_id: str
    staff_id: str = Field(description="Empty: no guide")
    store_id: str
    bound_at: datetime | None
    history: list[BindingChange] = Field(description="Newest first")


def _binding(b: guides_pb2.Binding) -> Binding:
    return Binding(
        member_id=b.member_id,
        staff_id=b.staff_id,
        store_id=b.store_id,
        bound_at=optional_utc(b, "bound_at"),
        history=[
            BindingChange(
                from_staff_id=h.from_staff_id,
                to_staff_id=h.to_staff_id,
                reason=h.reason,
                actor=h.actor,
                changed_at=optional_utc(h, "changed_at"),
            )
            for h in b.history
        ],
    )


class ReassignBody(BaseModel):
    staff_id: str = Field(min_length=1, max_length=64)
    reason: str = Field(default="", max_length=200)


class Attribution(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "order_id": "5d0c7e2a-8f1b-4c3d-9e8f-0a1b2c3d4e5f",
                    "member_id": MEMBER_ID_EXAMPLE,
                    "staff_id": "zhangsan",
                    "store_id": "SH001",
                    "rule": "staff_code",
                    "paid_amount_fen": 1800,
                    "refunded_amount_fen": 0,
                    "ordered_at": "2026-05-01T03:00:00Z",
                    "day": "2026-05-01",
                }
            ]
        }
    )

    order_id: str
    member_id: str
    staff_id: str = Field(description="Empty: attributed to nobody")
    store_id: str
    rule: str = Field(examples=["guide_link", "staff_code", "binding", ""])
    paid_amount_fen: int
    refunded_amount_fen: int
    ordered_at: datetime | None
    day: str


class DailyRow(BaseModel):
    day: str
    staff_id: str
    store_id: str
    orders: int = Field(description="Orders not wholly refunded")
    paid_amount_fen: int
    refunded_amount_fen: int
    net_amount_fen: int


class DailyReport(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "rows": [
                        {
                            "day": "2026-05-01",
                            "staff_id": "zhangsan",
                            "store_id": "SH001",
                            "orders": 12,
                            "paid_amount_fen": 25600,
                            "refunded_amount_fen": 1800,
                            "net_amount_fen": 23800,
                        }
                    ]
                }
            ]
        }
    )

    rows: list[DailyRow]


class FunnelRow(BaseModel):
    group: str
    registered: int
    added_on_wecom: int
    first_order: int
    repurchased: int


class FunnelReport(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "group_by": "store",
                    "rows": [
                        {
                            "group": "SH001",
                            "registered": 1000,
                            "added_on_wecom": 420,
                            "first_order": 90,
                            "repurchased": 36,
                        }
                    ],
                }
            ]
        }
    )

    group_by: str
    rows: list[FunnelRow]


class MemberTag(BaseModel):
    tag: str
    source: str = Field(examples=["manual", "rule", "journey"])
    set_by: str
    set_at: datetime | None


class MemberTags(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "member_id": MEMBER_ID_EXAMPLE,
                    "tags": [
                        {
                            "tag": "category:fruit_tea",
                            "source": "rule",
                            "set_by": "rules",
                            "set_at": "2026-05-01T18:00:00Z",
                        },
                        {
                            "tag": "果茶控",
                            "source": "manual",
                            "set_by": "zhangsan",
                            "set_at": "2026-05-01T03:00:00Z",
                        },
                    ],
                }
            ]
        }
    )

    member_id: str
    tags: list[MemberTag]


def _tags(t: guides_pb2.MemberTags) -> MemberTags:
    return MemberTags(
        member_id=t.member_id,
        tags=[
            MemberTag(tag=x.tag, source=x.source, set_by=x.set_by, set_at=optional_utc(x, "set_at"))
            for x in t.tags
        ],
    )


class TagBatch(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"members": 5200, "tags_added": 830, "tags_removed": 120}]}
    )

    members: int
    tags_added: int
    tags_removed: int


class TagBatchBody(BaseModel):
    window_days: int = Field(default=0, ge=0, le=3660, description="0: the configured window")


# ---- WeCom callbacks -----------------------------------------------------------


@router.get(
    "/v1/wecom/callback",
    response_class=PlainTextResponse,
    tags=["wecom"],
    summary="WeCom's URL check: answers the decrypted echostr",
    responses={
        200: {"content": {"text/plain": {"example": "1234567890"}}},
        403: problem_response("Bad signature, or for another corp"),
        **GUIDE_ERRORS,
    },
)
async def verify_callback(
    request: Request,
    msg_signature: Annotated[str, Query(max_length=128)],
    timestamp: Annotated[str, Query(max_length=20)],
    nonce: Annotated[str, Query(max_length=64)],
    echostr: Annotated[str, Query(max_length=1024)],
) -> PlainTextResponse:
    reply = await downstreams(request).guides.call(
        "VerifyCallbackUrl",
        guides_pb2.CallbackRequest(
            msg_signature=msg_signature, timestamp=timestamp, nonce=nonce, echostr=echostr
        ),
    )
    return PlainTextResponse(reply.reply)


@router.post(
    "/v1/wecom/callback",
    response_class=PlainTextResponse,
    tags=["wecom"],
    summary="WeCom's customer-contact event callback (encrypted XML); answers `success`",
    description="Verified and stored before answering; processed afterwards. A replay "
    "or WeCom's own retry is answered `success` and changes nothing.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/xml": {"schema": {"type": "string"}}},
        }
    },
    responses={
        200: {"content": {"text/plain": {"example": "success"}}},
        403: problem_response("Bad signature, or for another corp"),
        **GUIDE_ERRORS,
    },
)
async def receive_callback(
    request: Request,
    msg_signature: Annotated[str, Query(max_length=128)],
    timestamp: Annotated[str, Query(max_length=20)],
    nonce: Annotated[str, Query(max_length=64)],
) -> PlainTextResponse:
    raw = await request.body()
    if len(raw) > MAX_CALLBACK_BYTES:
        raise InvalidArgument(
            "the callback body is too large", code="CALLBACK_TOO_LARGE", field="body"
        )
    reply = await downstreams(request).guides.call(
        "ReceiveCallback",
        guides_pb2.CallbackRequest(
            msg_signature=msg_signature, timestamp=timestamp, nonce=nonce, body=raw
        ),
    )
    return PlainTextResponse(reply.reply)


# ---- staff ----------------------------------------------------------------------------


@router.get("/v1/admin/staff", response_model=StaffList, tags=["guides"], responses=GUIDE_ERRORS)
async def list_staff(
    request: Request, store_id: Annotated[str, Query(max_length=64)] = ""
) -> StaffList:
    reply = await downstreams(request).guides.call(
        "ListStaff", guides_pb2.ListStaffRequest(store_id=store_id)
    )
    return StaffList(staff=[_staff(s) for s in reply.staff])


@router.get(
    "/v1/admin/staff/{staff_id}", response_model=Staff, tags=["guides"], responses=GUIDE_ERRORS
)
async def get_staff(request: Request, staff_id: StaffId) -> Staff:
    return _staff(
        await downstreams(request).guides.call("GetStaff", guides_pb2.StaffRef(staff_id=staff_id))
    )


@router.put(
    "/v1/admin/staff/{staff_id}",
    response_model=Staff,
    tags=["guides"],
    summary="Create or update a staff member",
    responses={409: problem_response("The staff code belongs to someone else"), **GUIDE_ERRORS},
)
async def put_staff(request: Request, staff_id: StaffId, body: StaffBody) -> Staff:
    reply = await downstreams(request).guides.call(
        "UpsertStaff",
        guides_pb2.Staff(
            staff_id=staff_id,
            name=body.name,
            store_id=body.store_id,
            role=ROLES[body.role],
            staff_code=body.staff_code,
            actor=principal(request),
        ),
    )
    return _staff(reply)


@router.post(
    "/v1/admin/staff:sync",
    response_model=SyncResult,
    tags=["guides"],
    summary="Pull staff from WeCom's contact directory",
    responses=GUIDE_ERRORS,
)
async def sync_staff(request: Request) -> SyncResult:
    r = await downstreams(request).guides.call(
        "SyncDirectory", guides_pb2.SyncDirectoryRequest(actor=principal(request))
    )
    return SyncResult(
        created=r.created, updated=r.updated, resigned=r.resigned, unchanged=r.unchanged
    )


@router.post(
    "/v1/admin/staff/{staff_id}/resign",
    response_model=Resigned,
    tags=["guides"],
    summary="A staff member left: transfer their customers (WeCom resigned-staff transfer)",
    responses=GUIDE_ERRORS,
)
async def resign_staff(request: Request, staff_id: StaffId, body: ResignBody) -> Resigned:
    r = await downstreams(request).guides.call(
        "ResignStaff",
        guides_pb2.ResignStaffRequest(
            staff_id=staff_id, takeover_staff_id=body.takeover_staff_id, actor=principal(request)
        ),
    )
    return Resigned(transferred=r.transferred, failed=list(r.failed))


@router.post(
    "/v1/admin/staff/{staff_id}/guide-link",
    response_model=GuideLink,
    tags=["guides"],
    summary="The signed `guide` parameter of a guide's shared mini-program link",
    responses=GUIDE_ERRORS,
)
async def guide_link(request: Request, staff_id: StaffId) -> GuideLink:
    r = await downstreams(request).guides.call(
        "SignGuideLink", guides_pb2.StaffRef(staff_id=staff_id)
    )
    return GuideLink(staff_id=r.staff_id, guide_ref=r.guide_ref)


# ---- bindings, attribution, tags, reports ------------------------------------------------


@router.get(
    "/v1/admin/members/{member_id}/guide",
    response_model=Binding,
    tags=["guides"],
    responses=GUIDE_ERRORS,
)
async def get_guide(request: Request, member_id: MemberId) -> Binding:
    r = await downstreams(request).guides.call(
        "GetBinding", guides_pb2.MemberRef(member_id=str(member_id))
    )
    return _binding(r)


@router.put(
    "/v1/admin/members/{member_id}/guide",
    response_model=Binding,
    tags=["guides"],
    summary="Reassign the member's exclusive guide",
    responses=GUIDE_ERRORS,
)
async def put_guide(request: Request, member_id: MemberId, body: ReassignBody) -> Binding:
    r = await downstreams(request).guides.call(
        "ReassignGuide",
        guides_pb2.ReassignGuideRequest(
            member_id=str(member_id),
            staff_id=body.staff_id,
            actor=principal(request),
            reason=body.reason,
        ),
    )
    return _binding(r)


@router.get(
    "/v1/admin/orders/{order_id}/attribution",
    response_model=Attribution,
    tags=["guides"],
    responses=GUIDE_ERRORS,
)
async def order_attribution(
    request: Request, order_id: Annotated[uuid.UUID, Path(description="The order id")]
) -> Attribution:
    r = await downstreams(request).guides.call(
        "GetOrderAttribution", guides_pb2.OrderRef(order_id=str(order_id))
    )
    return Attribution(
        order_id=r.order_id,
        member_id=r.member_id,
        staff_id=r.staff_id,
        store_id=r.store_id,
        rule=r.rule,
        paid_amount_fen=r.paid_amount_fen,
        refunded_amount_fen=r.refunded_amount_fen,
        ordered_at=optional_utc(r, "ordered_at"),
        day=r.day,
    )


@router.get(
    "/v1/admin/reports/guides-daily",
    response_model=DailyReport,
    tags=["guides"],
    summary="Attributed orders per day, guide and store",
    responses=GUIDE_ERRORS,
)
async def guides_daily(
    request: Request,
    from_day: Day,
    to_day: Day,
    store_id: Annotated[str, Query(max_length=64)] = "",
    staff_id: Annotated[str, Query(max_length=64)] = "",
) -> DailyReport:
    r = await downstreams(request).guides.call(
        "GuideDailyReport",
        guides_pb2.GuideDailyReportRequest(
            from_day=from_day, to_day=to_day, store_id=store_id, staff_id=staff_id
        ),
    )
    return DailyReport(
        rows=[
            DailyRow(
                day=x.day,
                staff_id=x.staff_id,
                store_id=x.store_id,
                orders=x.orders,
                paid_amount_fen=x.paid_amount_fen,
                refunded_amount_fen=x.refunded_amount_fen,
                net_amount_fen=x.net_amount_fen,
            )
            for x in r.rows
        ]
    )


@router.get(
    "/v1/admin/reports/private-domain-funnel",
    response_model=FunnelReport,
    tags=["guides"],
    summary="Register → added on WeCom → first order → repurchase, for members registered in the range",
    responses=GUIDE_ERRORS,
)
async def funnel(
    request: Request,
    from_day: Day,
    to_day: Day,
    group_by: Literal["store", "guide", "channel"] = "store",
) -> FunnelReport:
    r = await downstreams(request).guides.call(
        "FunnelReport",
        guides_pb2.FunnelReportRequest(from_day=from_day, to_day=to_day, group_by=group_by),
    )
    return FunnelReport(
        group_by=group_by,
        rows=[
            FunnelRow(
                group=x.group,
                registered=x.registered,
                added_on_wecom=x.added_on_wecom,
                first_order=x.first_order,
                repurchased=x.repurchased,
            )
            for x in r.rows
        ],
    )


TagPath = Annotated[
    str, Path(min_length=1, max_length=32, description="The tag", examples=["果茶控"])
]


@router.get(
    "/v1/admin/members/{member_id}/tags",
    response_model=MemberTags,
    tags=["guides"],
    responses=GUIDE_ERRORS,
)
async def member_tags(request: Request, member_id: MemberId) -> MemberTags:
    r = await downstreams(request).guides.call(
        "ListMemberTags", guides_pb2.MemberRef(member_id=str(member_id))
    )
    return _tags(r)


async def _set_tag(request: Request, member_id: uuid.UUID, tag: str, present: bool) -> MemberTags:
    r = await downstreams(request).guides.call(
        "SetManualTag",
        guides_pb2.SetManualTagRequest(
            member_id=str(member_id), tag=tag, present=present, actor=principal(request)
        ),
    )
    return _tags(r)


@router.put(
    "/v1/admin/members/{member_id}/tags/{tag}",
    response_model=MemberTags,
    tags=["guides"],
    summary="Add a manual tag (pushed to WeCom's customer tags)",
    responses=GUIDE_ERRORS,
)
async def put_tag(request: Request, member_id: MemberId, tag: TagPath) -> MemberTags:
    return await _set_tag(request, member_id, tag, True)


@router.delete(
    "/v1/admin/members/{member_id}/tags/{tag}",
    response_model=MemberTags,
    tags=["guides"],
    summary="Remove a manual tag",
    responses=GUIDE_ERRORS,
)
async def delete_tag(
    request: Request,
    member_id: MemberId,
    tag: TagPath,
) -> MemberTags:
    return await _set_tag(request, member_id, tag, False)


@router.post(
    "/v1/admin/tags:recompute",
    response_model=TagBatch,
    tags=["guides"],
    summary="Recompute every member's rule tags now (the nightly batch)",
    responses=GUIDE_ERRORS,
)
async def recompute_tags(request: Request, body: TagBatchBody) -> TagBatch:
    r = await downstreams(request).guides.call(
        "RunTagBatch", guides_pb2.RunTagBatchRequest(window_days=body.window_days)
    )
    return TagBatch(members=r.members, tags_added=r.tags_added, tags_removed=r.tags_removed)


class Repushed(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"requeued": 12}]})

    requeued: int = Field(description="Abandoned WeCom tag pushes requeued (due now)")


@router.post(
    "/v1/admin/tags:repush",
    response_model=Repushed,
    tags=["guides"],
    summary="Requeue the WeCom tag pushes abandoned after their attempts (after an outage)",
    responses=GUIDE_ERRORS,
)
async def repush_tags(request: Request) -> Repushed:
    r = await downstreams(request).guides.call(
        "RepushTags", guides_pb2.RepushTagsRequest(actor=principal(request))
    )
    return Repushed(requeued=r.requeued)


# ---- coupon budgets (operators) ----------------------------------------------------------


class BudgetBody(BaseModel):
    coupons: int = Field(ge=0, le=1_000_000)


class Budget(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "scope": "staff",
                    "owner_id": "zhangsan",
                    "month": "2026-05",
                    "coupons": 30,
                    "used": 12,
                }
            ]
        }
    )

    scope: str
    owner_id: str
    month: str
    coupons: int
    used: int


@router.put(
    "/v1/admin/coupon-budgets/{scope}/{owner_id}/{month}",
    response_model=Budget,
    tags=["guides"],
    summary="Set a guide's or a store's coupon budget for a month (brand time)",
    responses=GUIDE_ERRORS,
)
async def put_budget(
    request: Request,
    scope: Annotated[Literal["staff", "store"], Path()],
    owner_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9_.@\-]{1,64}$", examples=["zhangsan"])],
    month: Annotated[str, Path(pattern=r"^\d{4}-\d{2}$", examples=["2026-05"])],
    body: BudgetBody,
) -> Budget:
    r = await downstreams(request).guides.call(
        "SetBudget",
        guides_pb2.SetBudgetRequest(
            scope=scope,
            owner_id=owner_id,
            month=month,
            coupons=body.coupons,
            actor=principal(request),
        ),
    )
    return Budget(scope=r.scope, owner_id=r.owner_id, month=r.month, coupons=r.coupons, used=r.used)


# ---- the guide's workstation (WeCom sidebar) ----------------------------------------------

SESSION_HEADER = "X-Workstation-Session"
Session = Annotated[
    str,
    Header(
        alias=SESSION_HEADER,
        max_length=512,
        description="The guide's session from POST /v1/workstation/session",
    ),
]


class OpenBody(BaseModel):
    code: str = Field(min_length=1, max_length=512, description="WeCom's OAuth code")


class WorkstationSession(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "staff_id": "zhangsan",
                    "store_id": "SH001",
                    "token": "ws1.zhangsan.1777607200.Zm9v",
                    "expires_at": "2026-05-01T04:00:00Z",
                }
            ]
        }
    )

    staff_id: str
    store_id: str
    token: str = Field(description=f"Send it as the {SESSION_HEADER} header")
    expires_at: datetime | None


class WorkstationOrder(BaseModel):
    order_id: str
    store_id: str
    channel: str
    paid_amount_fen: int
    refunded_amount_fen: int
    ordered_at: datetime | None


class Note(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"text": "喜欢少冰", "staff_id": "zhangsan", "created_at": "2026-05-01T03:00:00Z"}
            ]
        }
    )

    text: str
    staff_id: str
    created_at: datetime | None


class NoteBody(BaseModel):
    text: str = Field(min_length=1, max_length=1000)


class ConsentView(BaseModel):
    purpose: str
    channel: str
    granted: bool


def suggested_actions(
    today: date,
    birthday: str,
    last_order_at: datetime | None,
    keep_needed: int | None,
    period_last_day: str | None,
) -> list[str]:
    """What the guide might do now: `birthday_this_week` (the birthday falls
    in the 7 days from today), `silent_30_days` (no order for 30 days or
    never), `tier_at_risk` (the tier is not yet kept and its period ends
    within 30 days)."""
    out = []
    if len(birthday) == 10:
        try:
            month, day = int(birthday[5:7]), int(birthday[8:10])
            for n in range(7):
                d = today + timedelta(days=n)
                if (d.month, d.day) == (month, day):
                    out.append("birthday_this_week")
                    break
        except ValueError:
            pass
    if last_order_at is None or (today - last_order_at.date()).days >= 30:
        out.append("silent_30_days")
    if keep_needed and period_last_day:
        try:
            if (date.fromisoformat(period_last_day) - today).days <= 30:
                out.append("tier_at_risk")
        except ValueError:
            pass
    return out


class WorkstationView(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "member_id": MEMBER_ID_EXAMPLE,
                    "relation": "bound",
                    "guide_staff_id": "zhangsan",
                    "phone_masked": "139****5678",
                    "centre": CENTRE_EXAMPLE,
                    "coupons": [CLAIMED_COUPON_EXAMPLE],
                    "recent_orders": [
                        {
                            "order_id": "5d0c7e2a-8f1b-4c3d-9e8f-0a1b2c3d4e5f",
                            "store_id": "SH001",
                            "channel": "store",
                            "paid_amount_fen": 1800,
                            "refunded_amount_fen": 0,
                            "ordered_at": "2026-04-20T03:00:00Z",
                        }
                    ],
                    "tags": [
                        {
                            "tag": "category:fruit_tea",
                            "source": "rule",
                            "set_by": "rules",
                            "set_at": "2026-05-01T18:00:00Z",
                        }
                    ],
                    "notes": [
                        {
                            "text": "喜欢少冰",
                            "staff_id": "zhangsan",
                            "created_at": "2026-05-01T03:00:00Z",
                        }
                    ],
                    "consents": [{"purpose": "marketing", "channel": "wecom", "granted": True}],
                    "suggested_actions": ["tier_at_risk"],
                    "degraded": [],
                }
            ]
        }
    )

    member_id: str
    relation: str = Field(description="bound (yours) or store (a colleague's member)")
    guide_staff_id: str
    phone_masked: str | None
    centre: MemberCentre | None = Field(description="Tier, progress and points; null if unanswered")
    coupons: list[Coupon] = Field(description="Available coupons")
    recent_orders: list[WorkstationOrder]
    tags: list[MemberTag]
    notes: list[Note]
    consents: list[ConsentView]
    suggested_actions: list[str] = Field(
        examples=[["birthday_this_week", "silent_30_days", "tier_at_risk"]]
    )
    degraded: list[str]


class GrantBody(BaseModel):
    template_id: str = Field(min_length=1, max_length=64)
    grant_key: str = Field(min_length=1, max_length=64, description="A retry with it grants once")


class Granted(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "coupon_id": "7e1c2a1e-1d2b-4c3d-9e8f-0a1b2c3d4e5f",
                    "coupon_code": "C8K2M4Q7",
                    "staff_remaining": 17,
                    "store_remaining": 240,
                    "replayed": False,
                }
            ]
        }
    )

    coupon_id: str
    coupon_code: str
    staff_remaining: int
    store_remaining: int
    replayed: bool


@router.post(
    "/v1/workstation/session",
    response_model=WorkstationSession,
    tags=["workstation"],
    summary="Exchange the sidebar page's WeCom OAuth code for the guide's session",
    responses={403: problem_response("Not a valid code, or not active staff"), **GUIDE_ERRORS},
)
async def open_session(request: Request, body: OpenBody) -> WorkstationSession:
    r = await downstreams(request).guides.call(
        "OpenWorkstation", guides_pb2.OpenWorkstationRequest(code=body.code)
    )
    return WorkstationSession(
        staff_id=r.staff_id,
        store_id=r.store_id,
        token=r.token,
        expires_at=optional_utc(r, "expires_at"),
    )


async def _optional(read: Any) -> Any:
    """A part of the page whose service did not answer is None (degraded)."""
    try:
        return await read
    except DownstreamError as exc:
        if exc.status == grpc.StatusCode.UNAVAILABLE:
            return None
        raise


@router.get(
    "/v1/workstation/members/{member_id}",
    response_model=WorkstationView,
    tags=["workstation"],
    summary="The current customer, as the guide may see them",
    responses={
        403: problem_response("Not your customer, or the session is not valid"),
        **GUIDE_ERRORS,
    },
)
async def workstation_member(
    request: Request, member_id: MemberId, session: Session
) -> WorkstationView:
    down = downstreams(request)
    mid = str(member_id)
    # The guides service decides first whether this guide may see the member.
    view = await down.guides.call(
        "GetWorkstationMember", guides_pb2.WorkstationMemberRequest(token=session, member_id=mid)
    )
    member, centre, wallet, profile = await asyncio.gather(
        _optional(down.member.get_member(mid)),
        _optional(member_centre(down, mid)),
        _optional(
            down.rewards.call(
                "ListMemberCoupons",
                rewards_pb2.ListMemberCouponsRequest(
                    member_id=mid, statuses=["available"], page_size=20
                ),
            )
        ),
        _optional(down.member.call("GetProfile", member_pb2.GetProfileRequest(member_id=mid))),
    )
    degraded = sorted(
        {
            name
            for name, part in (("member", member), ("rewards", wallet), ("member", profile))
            if part is None
        }
        | (set(centre.degraded) if centre is not None else {"tiering", "rewards"})
    )
    last_order = optional_utc(view, "last_order_at")
    tier = centre.tier if centre is not None else None
    return WorkstationView(
        member_id=mid,
        relation=view.relation,
        guide_staff_id=view.guide_staff_id,
        phone_masked=member.phone_masked if member is not None else None,
        centre=centre,
        coupons=[coupon_model(c) for c in wallet.coupons] if wallet is not None else [],
        recent_orders=[
            WorkstationOrder(
                order_id=o.order_id,
                store_id=o.store_id,
                channel=o.channel,
                paid_amount_fen=o.paid_amount_fen,
                refunded_amount_fen=o.refunded_amount_fen,
                ordered_at=optional_utc(o, "ordered_at"),
            )
            for o in view.recent_orders
        ],
        tags=_tags(guides_pb2.MemberTags(tags=view.tags)).tags,
        notes=[
            Note(text=n.text, staff_id=n.staff_id, created_at=optional_utc(n, "created_at"))
            for n in view.notes
        ],
        consents=[
            ConsentView(
                purpose=member_pb2.ConsentPurpose.Name(c.purpose)
                .removeprefix("CONSENT_PURPOSE_")
                .lower(),
                channel=member_pb2.ConsentChannel.Name(c.channel)
                .removeprefix("CONSENT_CHANNEL_")
                .lower(),
                granted=c.granted,
            )
            for c in (profile.consents if profile is not None else [])
        ],
        suggested_actions=suggested_actions(
            datetime.now(BRAND_TZ).date(),
            profile.birthday if profile is not None else "",
            last_order,
            tier.keep_needed if tier is not None else None,
            tier.period_last_day if tier is not None else None,
        ),
        degraded=degraded,
    )


async def _ws_tag(
    request: Request, member_id: uuid.UUID, tag: str, present: bool, session: str
) -> MemberTags:
    r = await downstreams(request).guides.call(
        "SetWorkstationTag",
        guides_pb2.WorkstationTagRequest(
            token=session, member_id=str(member_id), tag=tag, present=present
        ),
    )
    return _tags(r)


@router.put(
    "/v1/workstation/members/{member_id}/tags/{tag}",
    response_model=MemberTags,
    tags=["workstation"],
    summary="The guide adds a manual tag (audited under the guide)",
    responses=GUIDE_ERRORS,
)
async def ws_put_tag(
    request: Request, member_id: MemberId, tag: TagPath, session: Session
) -> MemberTags:
    return await _ws_tag(request, member_id, tag, True, session)


@router.delete(
    "/v1/workstation/members/{member_id}/tags/{tag}",
    response_model=MemberTags,
    tags=["workstation"],
    summary="The guide removes a manual tag",
    responses=GUIDE_ERRORS,
)
async def ws_delete_tag(
    request: Request, member_id: MemberId, tag: TagPath, session: Session
) -> MemberTags:
    return await _ws_tag(request, member_id, tag, False, session)


@router.post(
    "/v1/workstation/members/{member_id}/notes",
    response_model=Note,
    tags=["workstation"],
    summary="The guide notes something about the member",
    responses=GUIDE_ERRORS,
)
async def ws_note(request: Request, member_id: MemberId, body: NoteBody, session: Session) -> Note:
    r = await downstreams(request).guides.call(
        "AddWorkstationNote",
        guides_pb2.WorkstationNoteRequest(token=session, member_id=str(member_id), text=body.text),
    )
    return Note(text=r.text, staff_id=r.staff_id, created_at=optional_utc(r, "created_at"))


@router.post(
    "/v1/workstation/members/{member_id}/coupons",
    response_model=Granted,
    tags=["workstation"],
    summary="Grant a coupon from the guide's monthly budget (and the store's)",
    responses={
        429: problem_response("BUDGET_EXHAUSTED: no budget left this month"),
        **GUIDE_ERRORS,
    },
)
async def ws_grant(
    request: Request, member_id: MemberId, body: GrantBody, session: Session
) -> Granted:
    r = await downstreams(request).guides.call(
        "GrantCoupon",
        guides_pb2.GrantCouponRequest(
            token=session,
            member_id=str(member_id),
            template_id=body.template_id,
            grant_key=body.grant_key,
        ),
    )
    return Granted(
        coupon_id=r.coupon_id,
        coupon_code=r.coupon_code,
        staff_remaining=r.staff_remaining,
        store_remaining=r.store_remaining,
        replayed=r.replayed,
    )


# ---- tiered communities (operators) --------------------------------------------------------

ChatId = Annotated[
    str,
    Path(
        pattern=r"^[A-Za-z0-9_\-]{1,64}$",
        description="The WeCom group chat id",
        examples=["wrOgQhDgAAMYQiS5ol9G7gK9JVAAAA"],
    ),
]


class CommunityBody(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    store_id: str = Field(min_length=1, max_length=64)
    audience: Literal["vip", "growth", "general"]
    tiers: list[str] = Field(default_factory=list, max_length=20, description="Empty: everyone")


COMMUNITY_EXAMPLE: JsonDict = {
    "chat_id": "wrOgQhDgAAMYQiS5ol9G7gK9JVAAAA",
    "name": "SH001 VIP群",
    "store_id": "SH001",
    "audience": "vip",
    "tiers": ["VIP"],
    "updated_by": "ops-li",
}


class CommunityModel(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [COMMUNITY_EXAMPLE]})

    chat_id: str
    name: str
    store_id: str
    audience: str
    tiers: list[str]
    updated_by: str


def _community(c: guides_pb2.Community) -> CommunityModel:
    return CommunityModel(
        chat_id=c.chat_id,
        name=c.name,
        store_id=c.store_id,
        audience=c.audience,
        tiers=list(c.tiers),
        updated_by=c.actor,
    )


class Communities(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"communities": [COMMUNITY_EXAMPLE]}]}
    )

    communities: list[CommunityModel]


class CommunitySync(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"groups": 12, "joined": 40, "left": 3}]}
    )

    groups: int
    joined: int
    left: int


class Invite(BaseModel):
    member_id: str
    staff_id: str
    chat_id: str
    audience: str


class Misfit(BaseModel):
    member_id: str
    chat_id: str
    audience: str
    tier: str


class CommunityGaps(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "invite": [
                        {
                            "member_id": MEMBER_ID_EXAMPLE,
                            "staff_id": "zhangsan",
                            "chat_id": "wrOgQhDgAAMYQiS5ol9G7gK9JVAAAA",
                            "audience": "vip",
                        }
                    ],
                    "misfits": [],
                }
            ]
        }
    )

    invite: list[Invite] = Field(
        description="Eligible members not in their group, with their guide"
    )
    misfits: list[Misfit] = Field(description="Members in a group whose audience they left")


class CommunityReport(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "chat_id": "wrOgQhDgAAMYQiS5ol9G7gK9JVAAAA",
                    "members": 180,
                    "joins": 25,
                    "leaves": 4,
                    "orders": 96,
                    "paid_amount_fen": 215000,
                }
            ]
        }
    )

    chat_id: str
    members: int
    joins: int
    leaves: int
    orders: int
    paid_amount_fen: int


@router.put(
    "/v1/admin/communities/{chat_id}",
    response_model=CommunityModel,
    tags=["guides"],
    summary="Define a community group (a WeCom customer group chat) by store and audience",
    responses=GUIDE_ERRORS,
)
async def put_community(request: Request, chat_id: ChatId, body: CommunityBody) -> CommunityModel:
    r = await downstreams(request).guides.call(
        "UpsertCommunity",
        guides_pb2.Community(
            chat_id=chat_id,
            name=body.name,
            store_id=body.store_id,
            audience=body.audience,
            tiers=body.tiers,
            actor=principal(request),
        ),
    )
    return _community(r)


@router.get(
    "/v1/admin/communities", response_model=Communities, tags=["guides"], responses=GUIDE_ERRORS
)
async def list_communities(
    request: Request, store_id: Annotated[str, Query(max_length=64)] = ""
) -> Communities:
    r = await downstreams(request).guides.call(
        "ListCommunities", guides_pb2.ListCommunitiesRequest(store_id=store_id)
    )
    return Communities(communities=[_community(c) for c in r.communities])


@router.post(
    "/v1/admin/communities:sync",
    response_model=CommunitySync,
    tags=["guides"],
    summary="Pull the groups' members from WeCom; joins and leaves are recorded and published",
    responses=GUIDE_ERRORS,
)
async def sync_communities(request: Request) -> CommunitySync:
    r = await downstreams(request).guides.call(
        "SyncCommunities", guides_pb2.SyncCommunitiesRequest(actor=principal(request))
    )
    return CommunitySync(groups=r.groups, joined=r.joined, left=r.left)


@router.get(
    "/v1/admin/stores/{store_id}/community-gaps",
    response_model=CommunityGaps,
    tags=["guides"],
    summary="Who to invite to which group (per guide), and who is in a group they no longer fit",
    responses=GUIDE_ERRORS,
)
async def community_gaps(
    request: Request,
    store_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9_\-]{1,64}$", examples=["SH001"])],
    staff_id: Annotated[str, Query(max_length=64)] = "",
) -> CommunityGaps:
    r = await downstreams(request).guides.call(
        "CommunityGaps", guides_pb2.CommunityGapsRequest(store_id=store_id, staff_id=staff_id)
    )
    return CommunityGaps(
        invite=[
            Invite(
                member_id=i.member_id, staff_id=i.staff_id, chat_id=i.chat_id, audience=i.audience
            )
            for i in r.invite
        ],
        misfits=[
            Misfit(member_id=m.member_id, chat_id=m.chat_id, audience=m.audience, tier=m.tier)
            for m in r.misfits
        ],
    )


@router.get(
    "/v1/admin/communities/{chat_id}/report",
    response_model=CommunityReport,
    tags=["guides"],
    summary="A group's members now, joins and leaves, and orders by its members in the range",
    responses=GUIDE_ERRORS,
)
async def community_report(
    request: Request, chat_id: ChatId, from_day: Day, to_day: Day
) -> CommunityReport:
    r = await downstreams(request).guides.call(
        "CommunityReport",
        guides_pb2.CommunityReportRequest(chat_id=chat_id, from_day=from_day, to_day=to_day),
    )
    return CommunityReport(
        chat_id=r.chat_id,
        members=r.members,
        joins=r.joins,
        leaves=r.leaves,
        orders=r.orders,
        paid_amount_fen=r.paid_amount_fen,
    )


class TaskTarget(BaseModel):
    member_id: str
    external_userid: str
    status: str = Field(examples=["pending", "sent", "not_contact", "failed"])


class GuideTask(BaseModel):
    task_id: str
    journey_id: str
    step_id: str
    day: str
    title: str
    script: str
    status: str = Field(description="open (gathering), sent (in WeCom, waiting for you)")
    targets: list[TaskTarget]


class GuideTasks(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "tasks": [
                        {
                            "task_id": "1b2c3d4e-5f60-4718-8a9b-0c1d2e3f4a5b",
                            "journey_id": "wake-silent-vip",
                            "step_id": "ask-guide",
                            "day": "2026-05-01",
                            "title": "唤醒沉睡VIP",
                            "script": "好久不见，本周送您一杯新品",
                            "status": "sent",
                            "targets": [
                                {
                                    "member_id": MEMBER_ID_EXAMPLE,
                                    "external_userid": "wmAJ2GCAAAme1Xq",
                                    "status": "pending",
                                }
                            ],
                        }
                    ]
                }
            ]
        }
    )

    tasks: list[GuideTask]


@router.get(
    "/v1/workstation/tasks",
    response_model=GuideTasks,
    tags=["workstation"],
    summary="The guide's open tasks from journeys, with each customer's status",
    responses=GUIDE_ERRORS,
)
async def ws_tasks(request: Request, session: Session) -> GuideTasks:
    r = await downstreams(request).guides.call(
        "ListGuideTasks", guides_pb2.ListGuideTasksRequest(token=session)
    )
    return GuideTasks(
        tasks=[
            GuideTask(
                task_id=t.task_id,
                journey_id=t.journey_id,
                step_id=t.step_id,
                day=t.day,
                title=t.title,
                script=t.script,
                status=t.status,
                targets=[
                    TaskTarget(
                        member_id=x.member_id, external_userid=x.external_userid, status=x.status
                    )
                    for x in t.targets
                ],
            )
            for t in r.tasks
        ]
    )
