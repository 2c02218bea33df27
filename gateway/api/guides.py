"""Guide routes (guides service, docs/guides.md): WeCom's customer-contact
callbacks (public, authenticated by WeCom's signature), and for operators:
store staff, directory sync, resigned-staff transfer, guide links, exclusive
bindings, order attribution, member tags and the private-domain reports."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from loyalty.guides.v1 import guides_pb2
from servicekit.errors import InvalidArgument

from .common import MEMBER_ID_EXAMPLE, MemberId, downstreams, optional_utc, problem_response

router = APIRouter()

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
Operator = Annotated[str, Field(min_length=1, max_length=128, description="Who acts (audited)")]
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
    operator: Operator


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


class SyncBody(BaseModel):
    operator: Operator


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
    operator: Operator


class Resigned(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"transferred": 41, "failed": ["wmAJ2GCAAAme1Xq"]}]}
    )

    transferred: int
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
    operator: Operator


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


class TagBody(BaseModel):
    operator: Operator


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
            actor=body.operator,
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
async def sync_staff(request: Request, body: SyncBody) -> SyncResult:
    r = await downstreams(request).guides.call(
        "SyncDirectory", guides_pb2.SyncDirectoryRequest(actor=body.operator)
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
            staff_id=staff_id, takeover_staff_id=body.takeover_staff_id, actor=body.operator
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
            actor=body.operator,
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


async def _set_tag(
    request: Request, member_id: uuid.UUID, tag: str, present: bool, operator: str
) -> MemberTags:
    r = await downstreams(request).guides.call(
        "SetManualTag",
        guides_pb2.SetManualTagRequest(
            member_id=str(member_id), tag=tag, present=present, actor=operator
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
async def put_tag(request: Request, member_id: MemberId, tag: TagPath, body: TagBody) -> MemberTags:
    return await _set_tag(request, member_id, tag, True, body.operator)


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
    operator: Annotated[str, Query(min_length=1, max_length=128)],
) -> MemberTags:
    return await _set_tag(request, member_id, tag, False, operator)


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
