"""gRPC servicer: protobuf <-> domain mapping only."""

from __future__ import annotations

import json

import grpc

from loyalty.common.v1 import common_pb2
from loyalty.tiering.v1 import tiering_pb2, tiering_pb2_grpc
from servicekit.analytics import day_range
from servicekit.db import Database
from servicekit.protos import timestamp, to_datetime

from . import analytics, reports
from .domain import Tier, TierProgramme
from .handlers import MemberTierView, TieringHandlers, build_programme
from .repository import programme_at


def tier_info(tier: Tier) -> tiering_pb2.TierInfo:
    b = tier.benefits
    return tiering_pb2.TierInfo(
        code=tier.code,
        name=tier.name,
        threshold=tier.threshold,
        retention=tier.retention_bar,
        benefits=tiering_pb2.Benefits(
            points_multiplier_bp=b.points_multiplier_bp,
            birthday_coupon_template=b.birthday_coupon_template or "",
            free_delivery=b.free_delivery,
            upgrade_gift_coupon_template=b.upgrade_gift_coupon_template or "",
            priority=b.priority,
        ),
    )


def member_tier_reply(view: MemberTierView) -> tiering_pb2.MemberTier:
    state, p = view.state, view.projection
    reply = tiering_pb2.MemberTier(
        member_id=view.member_id,
        programme_id=view.programme.programme_id,
        programme_version=view.programme.version,
        tier=tier_info(view.effective),
        earned_tier=state.earned_tier,
        qualifying_metric=view.programme.qualifying_metric.value,
        metric_value=view.metric,
        growth_value=view.growth_value,
        period_last_day=p.period_last_day.isoformat(),
        keep_needed=p.keep_needed,
        next_needed=p.next_needed,
        projection=p.message,
        progress_bp=view.progress_bp,
    )
    if p.next_tier is not None:
        reply.next_tier.CopyFrom(tier_info(p.next_tier))
    if state.override_tier and state.override_until:
        reply.override_tier = state.override_tier
        reply.override_until.CopyFrom(timestamp(state.override_until))
        reply.override_reason = state.override_reason or ""
    if state.grace_until is not None:
        reply.grace_until.CopyFrom(timestamp(state.grace_until))
    return reply


def programme_reply(programme: TierProgramme, note: str = "") -> tiering_pb2.Programme:
    return tiering_pb2.Programme(
        programme_id=programme.programme_id,
        version=programme.version,
        effective_from=timestamp(programme.effective_from),
        qualifying_metric=programme.qualifying_metric.value,
        window_months=programme.window_months,
        ladder_json=json.dumps(programme.ladder.to_json(), ensure_ascii=False),
        rules_json=json.dumps(programme.rules.to_json(), ensure_ascii=False),
        note=note,
    )


def draft_of(message: tiering_pb2.Programme, version: int = 1) -> TierProgramme:
    return build_programme(
        message.programme_id,
        version,
        to_datetime(message.effective_from),
        message.qualifying_metric,
        message.window_months,
        message.ladder_json,
        message.rules_json,
    )


class TieringServicer(tiering_pb2_grpc.TieringServiceServicer):
    def __init__(self, db: Database, handlers: TieringHandlers) -> None:
        self._db = db
        self._handlers = handlers

    async def GetMemberSpend(
        self, request: tiering_pb2.GetMemberSpendRequest, context: grpc.aio.ServicerContext
    ) -> tiering_pb2.MemberSpend:
        async with self._db.reading() as uow:
            view = await self._handlers.member_spend(uow, request.member_id)
        reply = tiering_pb2.MemberSpend(
            member_id=view.spend.member_id,
            total_paid_fen=view.spend.total_paid_fen,
            order_count=view.spend.order_count,
        )
        if view.spend.last_order_at is not None:
            reply.last_order_at.CopyFrom(timestamp(view.spend.last_order_at))
        if view.tier is not None:
            reply.tier_code = view.tier.code
            reply.tier_name = view.tier.name
        return reply

    async def GetMemberTier(
        self, request: tiering_pb2.GetMemberTierRequest, context: grpc.aio.ServicerContext
    ) -> tiering_pb2.MemberTier:
        async with self._db.reading() as uow:
            view = await self._handlers.member_tier(uow, request.member_id)
        return member_tier_reply(view)

    async def GetMemberTierBadge(
        self, request: tiering_pb2.GetMemberTierRequest, context: grpc.aio.ServicerContext
    ) -> tiering_pb2.MemberTierBadge:
        async with self._db.reading() as uow:
            badge = await self._handlers.member_tier_badge(uow, request.member_id)
        return tiering_pb2.MemberTierBadge(
            member_id=badge.member_id,
            tier_code=badge.tier.code,
            tier_name=badge.tier.name,
            programme_version=badge.programme_version,
        )

    async def GetTierHistory(
        self, request: tiering_pb2.GetTierHistoryRequest, context: grpc.aio.ServicerContext
    ) -> tiering_pb2.TierHistory:
        async with self._db.reading() as uow:
            rows = await self._handlers.tier_history(uow, request.member_id, request.limit)
        return tiering_pb2.TierHistory(
            entries=[
                tiering_pb2.TierHistoryEntry(
                    from_tier=r.from_tier,
                    to_tier=r.to_tier,
                    reason=r.reason,
                    figures_json=r.figures_json,
                    programme_version=r.programme_version,
                    changed_at=timestamp(r.changed_at),
                )
                for r in rows
            ]
        )

    async def RecordGrowthAction(
        self, request: tiering_pb2.RecordGrowthActionRequest, context: grpc.aio.ServicerContext
    ) -> tiering_pb2.RecordGrowthActionResponse:
        async with self._db.unit_of_work() as uow:
            award = await self._handlers.record_growth_action(
                uow,
                request.member_id,
                request.action,
                request.reference_id,
                to_datetime(request.occurred_at),
            )
        return tiering_pb2.RecordGrowthActionResponse(
            awarded=award.awarded, capped=award.capped, replayed=award.replayed
        )

    async def GetProgramme(
        self, request: tiering_pb2.GetProgrammeRequest, context: grpc.aio.ServicerContext
    ) -> tiering_pb2.Programme:
        async with self._db.unit_of_work() as uow:
            programme, note = await self._handlers.programme(
                uow, request.programme_id, to_datetime(request.at)
            )
        return programme_reply(programme, note)

    async def PublishProgramme(
        self, request: tiering_pb2.PublishProgrammeRequest, context: grpc.aio.ServicerContext
    ) -> tiering_pb2.Programme:
        # Validated before the transaction opens: a bad draft touches nothing.
        draft = draft_of(request.programme)
        async with self._db.unit_of_work() as uow:
            stored = await self._handlers.publish_programme(uow, draft, request.programme.note)
        return programme_reply(stored, request.programme.note)

    async def SimulateProgramme(
        self, request: tiering_pb2.SimulateProgrammeRequest, context: grpc.aio.ServicerContext
    ) -> tiering_pb2.SimulationReport:
        draft = draft_of(request.programme)
        async with self._db.unit_of_work() as uow:
            result = await self._handlers.simulate(uow, draft)
        return tiering_pb2.SimulationReport(
            members=result.members,
            upgrades=result.upgrades,
            kept_by_retention=result.kept_by_retention,
            at_risk=result.at_risk,
            movements=[
                tiering_pb2.Movement(from_tier=f, to_tier=t, members=n)
                for f, t, n in result.movements
            ],
        )

    async def SetTierOverride(
        self, request: tiering_pb2.SetTierOverrideRequest, context: grpc.aio.ServicerContext
    ) -> tiering_pb2.MemberTier:
        async with self._db.unit_of_work() as uow:
            view = await self._handlers.set_override(
                uow,
                request.member_id,
                request.tier_code,
                to_datetime(request.until),
                request.reason,
            )
        return member_tier_reply(view)

    async def GetTierAnalytics(
        self, request: common_pb2.AnalyticsFilter, context: grpc.aio.ServicerContext
    ) -> tiering_pb2.TierAnalytics:
        r = day_range(request)
        now = self._handlers.now()
        pid = self._handlers.programme_id
        async with self._db.reading() as uow:
            programme = await programme_at(uow.conn, pid, now)
            t = await analytics.tier_figures(uow.conn, r, pid, programme, now)
        reply = tiering_pb2.TierAnalytics(
            distribution=[common_pb2.KeyCount(key=k, count=n) for k, n in t.distribution],
            in_grace=t.in_grace,
            up=t.up,
            down=t.down,
            kept=t.kept,
            flows=[tiering_pb2.TierFlow(**f) for f in t.flows],
            by_day=[tiering_pb2.TierDay(**d) for d in t.by_day],
            projections=[tiering_pb2.TierProjection(**p) for p in t.projections],
        )
        if t.movements_since is not None:
            reply.movements_since.CopyFrom(timestamp(t.movements_since))
        return reply

    async def GetSegmentAnalytics(
        self, request: common_pb2.AnalyticsFilter, context: grpc.aio.ServicerContext
    ) -> tiering_pb2.SegmentAnalytics:
        r = day_range(request)
        async with self._db.reading() as uow:
            s = await analytics.segment_figures(uow.conn, r)
        return tiering_pb2.SegmentAnalytics(
            rfm=[tiering_pb2.RfmCell(**c) for c in s["rfm"]],
            segments=[common_pb2.KeyCount(**k) for k in s["segments"]],
            stages=[common_pb2.KeyCount(**k) for k in s["stages"]],
            transitions=[tiering_pb2.StageTransition(**t) for t in s["transitions"]],
        )

    async def GetDistributionReport(
        self,
        request: tiering_pb2.GetDistributionReportRequest,
        context: grpc.aio.ServicerContext,
    ) -> tiering_pb2.DistributionReport:
        async with self._db.unit_of_work() as uow:
            report = await reports.latest(uow.conn)
        reply = tiering_pb2.DistributionReport(
            run_id=report.run_id,
            members=report.members,
            tier_changes=report.tier_changes,
            segment_changes=report.segment_changes,
            stage_changes=report.stage_changes,
            buckets=[
                tiering_pb2.DistributionBucket(
                    dimension=b.dimension, value=b.value, members=b.members, change=b.change
                )
                for b in report.buckets
            ],
        )
        if report.as_of is not None:
            reply.as_of.CopyFrom(timestamp(report.as_of))
        return reply
