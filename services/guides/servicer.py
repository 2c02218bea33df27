"""gRPC servicer: protobuf <-> domain mapping only; opens the unit of work."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from loyalty.guides.v1 import guides_pb2, guides_pb2_grpc
from servicekit.db import Database
from servicekit.protos import timestamp

from . import binding_repository as binding_repo
from . import domain, retries, tag_batch
from . import repository as repo
from .handlers import GuidesHandlers

ROLE_TO_PROTO = {
    "guide": guides_pb2.STAFF_ROLE_GUIDE,
    "store_manager": guides_pb2.STAFF_ROLE_STORE_MANAGER,
    "operations": guides_pb2.STAFF_ROLE_OPERATIONS,
}
ROLE_FROM_PROTO = {v: k for k, v in ROLE_TO_PROTO.items()}

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def staff_reply(s: repo.StaffRow) -> guides_pb2.Staff:
    return guides_pb2.Staff(
        staff_id=s.staff_id,
        name=s.name,
        store_id=s.store_id,
        role=ROLE_TO_PROTO.get(s.role, guides_pb2.STAFF_ROLE_UNSPECIFIED),
        status=s.status,
        staff_code=s.staff_code,
        actor=s.updated_by,
        updated_at=timestamp(s.updated_at),
    )


def tags_reply(member_id: str, rows: list[Any]) -> guides_pb2.MemberTags:
    return guides_pb2.MemberTags(
        member_id=member_id,
        tags=[
            guides_pb2.MemberTag(
                tag=r["tag"], source=r["source"], set_by=r["set_by"], set_at=timestamp(r["set_at"])
            )
            for r in rows
        ],
    )


class GuidesServicer(guides_pb2_grpc.GuidesServiceServicer):
    def __init__(self, db: Database, handlers: GuidesHandlers) -> None:
        self._db = db
        self._h = handlers

    async def UpsertStaff(self, request: guides_pb2.Staff, context: Ctx) -> guides_pb2.Staff:
        async with self._db.unit_of_work() as uow:
            row = await self._h.upsert_staff(
                uow,
                request.staff_id,
                request.name,
                request.store_id,
                ROLE_FROM_PROTO.get(request.role, ""),
                request.staff_code,
                request.actor,
            )
        return staff_reply(row)

    async def GetStaff(self, request: guides_pb2.StaffRef, context: Ctx) -> guides_pb2.Staff:
        async with self._db.reading() as uow:
            return staff_reply(await self._h.get_staff(uow, request.staff_id))

    async def ListStaff(
        self, request: guides_pb2.ListStaffRequest, context: Ctx
    ) -> guides_pb2.ListStaffResponse:
        async with self._db.reading() as uow:
            rows = await self._h.list_staff(uow, request.store_id)
        return guides_pb2.ListStaffResponse(staff=[staff_reply(r) for r in rows])

    async def SyncDirectory(
        self, request: guides_pb2.SyncDirectoryRequest, context: Ctx
    ) -> guides_pb2.SyncDirectoryResponse:
        counts = await self._h.sync_directory(self._db, request.actor or "wecom-directory")
        return guides_pb2.SyncDirectoryResponse(**counts)

    async def ResignStaff(
        self, request: guides_pb2.ResignStaffRequest, context: Ctx
    ) -> guides_pb2.ResignStaffResponse:
        moved, failed = await self._h.resign_staff(
            self._db, request.staff_id, request.takeover_staff_id, request.actor
        )
        return guides_pb2.ResignStaffResponse(transferred=moved, failed=failed)

    async def VerifyCallbackUrl(
        self, request: guides_pb2.CallbackRequest, context: Ctx
    ) -> guides_pb2.CallbackResponse:
        reply = self._h.verify_url(
            request.msg_signature, request.timestamp, request.nonce, request.echostr
        )
        return guides_pb2.CallbackResponse(reply=reply, outcome="verified")

    async def ReceiveCallback(
        self, request: guides_pb2.CallbackRequest, context: Ctx
    ) -> guides_pb2.CallbackResponse:
        async with self._db.unit_of_work() as uow:
            out = await self._h.receive_callback(
                uow, request.msg_signature, request.timestamp, request.nonce, request.body
            )
        return guides_pb2.CallbackResponse(reply=out.reply, outcome=out.outcome)

    async def GetBinding(self, request: guides_pb2.MemberRef, context: Ctx) -> guides_pb2.Binding:
        from servicekit.errors import parse_member_id

        member_id = parse_member_id(request.member_id)
        async with self._db.reading() as uow:
            binding = await binding_repo.get_binding(uow.conn, member_id)
            history = await binding_repo.binding_history(uow.conn, member_id)
        reply = guides_pb2.Binding(
            member_id=str(member_id),
            history=[
                guides_pb2.BindingChange(
                    from_staff_id=h["from_staff_id"],
                    to_staff_id=h["to_staff_id"],
                    reason=h["reason"],
                    actor=h["actor"],
                    changed_at=timestamp(h["changed_at"]),
                )
                for h in history
            ],
        )
        if binding is not None:
            reply.staff_id = binding.staff_id
            reply.store_id = binding.store_id
            reply.bound_at.CopyFrom(timestamp(binding.bound_at))
        return reply

    async def ReassignGuide(
        self, request: guides_pb2.ReassignGuideRequest, context: Ctx
    ) -> guides_pb2.Binding:
        async with self._db.unit_of_work() as uow:
            await self._h.reassign_guide(
                uow, request.member_id, request.staff_id, request.actor, request.reason
            )
        return await self.GetBinding(guides_pb2.MemberRef(member_id=request.member_id), context)

    async def SignGuideLink(
        self, request: guides_pb2.StaffRef, context: Ctx
    ) -> guides_pb2.GuideLink:
        async with self._db.reading() as uow:
            ref = await self._h.sign_link(uow, request.staff_id)
        return guides_pb2.GuideLink(staff_id=request.staff_id, guide_ref=ref)

    async def GetOrderAttribution(
        self, request: guides_pb2.OrderRef, context: Ctx
    ) -> guides_pb2.OrderAttribution:
        async with self._db.reading() as uow:
            r = await self._h.order_attribution(uow, request.order_id)
        return guides_pb2.OrderAttribution(
            order_id=str(r["order_id"]),
            member_id=str(r["member_id"]),
            staff_id=r["staff_id"],
            store_id=r["attributed_store_id"],
            rule=r["rule"],
            paid_amount_fen=r["paid_amount_fen"],
            refunded_amount_fen=r["refunded_amount_fen"],
            ordered_at=timestamp(r["ordered_at"]),
            day=r["day"].isoformat(),
        )

    async def GuideDailyReport(
        self, request: guides_pb2.GuideDailyReportRequest, context: Ctx
    ) -> guides_pb2.GuideDailyReportResponse:
        async with self._db.reading() as uow:
            rows = await self._h.daily_report(
                uow, request.from_day, request.to_day, request.store_id, request.staff_id
            )
        return guides_pb2.GuideDailyReportResponse(
            rows=[
                guides_pb2.GuideDailyRow(
                    day=r["day"].isoformat(),
                    staff_id=r["staff_id"],
                    store_id=r["store_id"],
                    orders=r["orders"],
                    paid_amount_fen=r["paid"],
                    refunded_amount_fen=r["refunded"],
                    net_amount_fen=r["paid"] - r["refunded"],
                )
                for r in rows
            ]
        )

    async def ListMemberTags(
        self, request: guides_pb2.MemberRef, context: Ctx
    ) -> guides_pb2.MemberTags:
        async with self._db.reading() as uow:
            rows = await self._h.list_tags(uow, request.member_id)
        return tags_reply(request.member_id, rows)

    async def SetManualTag(
        self, request: guides_pb2.SetManualTagRequest, context: Ctx
    ) -> guides_pb2.MemberTags:
        async with self._db.unit_of_work() as uow:
            await self._h.set_tag(
                uow, request.member_id, request.tag, request.present, request.actor
            )
        return await self.ListMemberTags(guides_pb2.MemberRef(member_id=request.member_id), context)

    async def RepushTags(
        self, request: guides_pb2.RepushTagsRequest, context: Ctx
    ) -> guides_pb2.RepushTagsResponse:
        actor = domain.require_id(request.actor, "actor")
        return guides_pb2.RepushTagsResponse(
            requeued=await retries.repush_tags(self._h, self._db, actor)
        )

    async def RunTagBatch(
        self, request: guides_pb2.RunTagBatchRequest, context: Ctx
    ) -> guides_pb2.RunTagBatchResponse:
        result = await tag_batch.run_or_refuse(self._h, self._db, request.window_days)
        return guides_pb2.RunTagBatchResponse(
            members=result.members, tags_added=result.added, tags_removed=result.removed
        )

    async def FunnelReport(
        self, request: guides_pb2.FunnelReportRequest, context: Ctx
    ) -> guides_pb2.FunnelReportResponse:
        async with self._db.reading() as uow:
            rows = await self._h.funnel_report(
                uow, request.from_day, request.to_day, request.group_by
            )
        return guides_pb2.FunnelReportResponse(
            rows=[
                guides_pb2.FunnelRow(
                    group=r["grp"],
                    registered=r["registered"],
                    added_on_wecom=r["added"],
                    first_order=r["first_order"],
                    repurchased=r["repurchased"],
                )
                for r in rows
            ]
        )

    # ---- the workstation

    async def OpenWorkstation(
        self, request: guides_pb2.OpenWorkstationRequest, context: Ctx
    ) -> guides_pb2.WorkstationSession:
        async with self._db.unit_of_work() as uow:
            staff, token, expires = await self._h.open_workstation(uow, request.code)
        return guides_pb2.WorkstationSession(
            staff_id=staff.staff_id,
            store_id=staff.store_id,
            token=token,
            expires_at=timestamp(expires),
        )

    async def GetWorkstationMember(
        self, request: guides_pb2.WorkstationMemberRequest, context: Ctx
    ) -> guides_pb2.WorkstationMember:
        async with self._db.unit_of_work() as uow:
            view = await self._h.workstation_member(uow, request.token, request.member_id)
        reply = guides_pb2.WorkstationMember(
            member_id=str(view["member_id"]),
            relation=str(view["relation"]),
            guide_staff_id=str(view["guide"]),
            tags=tags_reply("", view["tags"]).tags,  # type: ignore[arg-type]
            recent_orders=[
                guides_pb2.WorkstationOrder(
                    order_id=str(o["order_id"]),
                    store_id=o["store_id"],
                    channel=o["channel"],
                    paid_amount_fen=o["paid_amount_fen"],
                    refunded_amount_fen=o["refunded_amount_fen"],
                    ordered_at=timestamp(o["ordered_at"]),
                )
                for o in view["orders"]  # type: ignore[attr-defined]
            ],
            notes=[
                guides_pb2.WorkstationNote(
                    text=n["text"], staff_id=n["staff_id"], created_at=timestamp(n["created_at"])
                )
                for n in view["notes"]  # type: ignore[attr-defined]
            ],
        )
        if view["last_order_at"] is not None:
            reply.last_order_at.CopyFrom(timestamp(view["last_order_at"]))  # type: ignore[arg-type]
        return reply

    async def SetWorkstationTag(
        self, request: guides_pb2.WorkstationTagRequest, context: Ctx
    ) -> guides_pb2.MemberTags:
        async with self._db.unit_of_work() as uow:
            member_id = await self._h.workstation_tag(
                uow, request.token, request.member_id, request.tag, request.present
            )
        return await self.ListMemberTags(guides_pb2.MemberRef(member_id=member_id), context)

    async def AddWorkstationNote(
        self, request: guides_pb2.WorkstationNoteRequest, context: Ctx
    ) -> guides_pb2.WorkstationNote:
        async with self._db.unit_of_work() as uow:
            staff_id, at = await self._h.add_note(
                uow, request.token, request.member_id, request.text
            )
        return guides_pb2.WorkstationNote(
            text=request.text.strip(), staff_id=staff_id, created_at=timestamp(at)
        )

    async def GrantCoupon(
        self, request: guides_pb2.GrantCouponRequest, context: Ctx
    ) -> guides_pb2.GrantCouponResponse:
        coupon_id, code, staff_left, store_left, replayed = await self._h.grant_coupon(
            self._db, request.token, request.member_id, request.template_id, request.grant_key
        )
        return guides_pb2.GrantCouponResponse(
            coupon_id=coupon_id,
            coupon_code=code,
            staff_remaining=staff_left,
            store_remaining=store_left,
            replayed=replayed,
        )

    async def SetBudget(
        self, request: guides_pb2.SetBudgetRequest, context: Ctx
    ) -> guides_pb2.Budget:
        async with self._db.unit_of_work() as uow:
            r = await self._h.set_budget(
                uow, request.scope, request.owner_id, request.month, request.coupons, request.actor
            )
        return guides_pb2.Budget(
            scope=r["scope"],
            owner_id=r["owner_id"],
            month=r["month"],
            coupons=r["coupons"],
            used=r["used"],
        )

    async def ListGuideTasks(
        self, request: guides_pb2.ListGuideTasksRequest, context: Ctx
    ) -> guides_pb2.ListGuideTasksResponse:
        async with self._db.reading() as uow:
            tasks = await self._h.list_tasks(uow, request.token)
        return guides_pb2.ListGuideTasksResponse(
            tasks=[
                guides_pb2.GuideTask(
                    task_id=str(t["task_id"]),
                    journey_id=t["journey_id"],
                    step_id=t["step_id"],
                    day=t["day"].isoformat(),
                    title=t["title"],
                    script=t["script"],
                    status=t["status"],
                    targets=[
                        guides_pb2.GuideTaskTarget(
                            member_id=str(x["member_id"]),
                            external_userid=x["external_userid"],
                            status=x["status"],
                        )
                        for x in targets
                    ],
                )
                for t, targets in tasks
            ]
        )

    # ---- communities

    async def UpsertCommunity(
        self, request: guides_pb2.Community, context: Ctx
    ) -> guides_pb2.Community:
        async with self._db.unit_of_work() as uow:
            r = await self._h.upsert_community(
                uow, request.chat_id, request.name, request.store_id, request.audience,
                list(request.tiers), request.actor,
            )  # fmt: skip
        return community_reply(r)

    async def ListCommunities(
        self, request: guides_pb2.ListCommunitiesRequest, context: Ctx
    ) -> guides_pb2.ListCommunitiesResponse:
        async with self._db.reading() as uow:
            rows = await self._h.list_communities(uow, request.store_id)
        return guides_pb2.ListCommunitiesResponse(communities=[community_reply(r) for r in rows])

    async def SyncCommunities(
        self, request: guides_pb2.SyncCommunitiesRequest, context: Ctx
    ) -> guides_pb2.SyncCommunitiesResponse:
        groups, joined, left = await self._h.sync_communities(self._db, request.actor or "sync")
        return guides_pb2.SyncCommunitiesResponse(groups=groups, joined=joined, left=left)

    async def CommunityGaps(
        self, request: guides_pb2.CommunityGapsRequest, context: Ctx
    ) -> guides_pb2.CommunityGapsResponse:
        async with self._db.reading() as uow:
            invite, misfits = await self._h.community_gaps(uow, request.store_id, request.staff_id)
        return guides_pb2.CommunityGapsResponse(
            invite=[
                guides_pb2.CommunityInvite(member_id=m, staff_id=s, chat_id=c, audience=a)
                for m, s, c, a in invite
            ],
            misfits=[
                guides_pb2.CommunityMisfit(member_id=m, chat_id=c, audience=a, tier=t)
                for m, c, a, t in misfits
            ],
        )

    async def CommunityReport(
        self, request: guides_pb2.CommunityReportRequest, context: Ctx
    ) -> guides_pb2.CommunityReportResponse:
        async with self._db.reading() as uow:
            r = await self._h.community_report(
                uow, request.chat_id, request.from_day, request.to_day
            )
        return guides_pb2.CommunityReportResponse(
            chat_id=request.chat_id,
            members=r["members"],
            joins=r["joins"],
            leaves=r["leaves"],
            orders=r["orders"],
            paid_amount_fen=r["paid"],
        )


def community_reply(r: Any) -> guides_pb2.Community:
    return guides_pb2.Community(
        chat_id=r["chat_id"],
        name=r["name"],
        store_id=r["store_id"],
        audience=r["audience"],
        tiers=list(r["tiers"]),
        actor=r["updated_by"],
    )
