"""What each dashboard shows: its headline numbers and charts, each read from
one block of the analytics API's answer (docs/api.md, "Analytics"). The chart
element carries the numbers it draws (data-chart, exactly the API's values,
fen stays fen) and the block they came from (data-source), so a test can hold
them against the API's answer for the same filter; console/static/console.js
draws them with ECharts and shows fen as yuan."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

DASHBOARDS = (
    "overview",
    "tiers",
    "segments",
    "lifecycle",
    "points",
    "coupons",
    "referral",
    "journeys",
)


@dataclass(frozen=True)
class Kpi:
    path: str  # dotted path into the answer
    label: tuple[str, str]  # zh-CN, en
    unit: str = ""  # "fen" (shown as yuan), "rate" (shown as %), "" (a count)
    definition: str = ""  # the definitions key


@dataclass(frozen=True)
class Chart:
    chart_id: str
    title: tuple[str, str]
    kind: str  # line | bar | pie | sankey | heatmap | pivot (stacked bar of pairs per day)
    source: str  # dotted path of the list it draws
    x: str = "key"  # the field naming each item (category axis, pie slice, ...)
    values: tuple[str, ...] = ("count",)  # dotted fields of each item drawn as series
    definition: str = ""


@dataclass
class DashboardView:
    name: str
    kpis: list[dict[str, Any]] = field(default_factory=list)
    charts: list[dict[str, Any]] = field(default_factory=list)
    definitions: dict[str, str] = field(default_factory=dict)
    tables: list[dict[str, Any]] = field(default_factory=list)


def pick(data: Any, path: str) -> Any:
    """data["a"]["b"] for "a.b"; "a.0.b" indexes lists; None when absent."""
    for part in path.split("."):
        if isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        elif isinstance(data, dict):
            data = data.get(part)
        else:
            return None
    return data


def chart_data(chart: Chart, answer: Any) -> dict[str, Any]:
    """The numbers the chart draws, in the API's own units."""
    items = pick(answer, chart.source) or []
    if chart.kind == "sankey":
        src, dst = chart.x.split("->")
        (value,) = chart.values
        return {"links": [[i[src], i[dst], pick(i, value)] for i in items]}
    if chart.kind == "heatmap":
        xf, yf = chart.x.split(",")
        return {
            "points": [[i[xf], i[yf], *(pick(i, v) for v in chart.values)] for i in items],
            "values": list(chart.values),
        }
    if chart.kind == "pivot":
        # Stacked per day: one series per (from, to) pair, summed over its items.
        src, dst, value = chart.values
        days = sorted({str(i[chart.x]) for i in items})
        series: dict[str, list[int]] = {}
        for i in items:
            row = series.setdefault(f"{i[src]}→{i[dst]}", [0] * len(days))
            row[days.index(str(i[chart.x]))] += int(i[value])
        return {"x": days, "series": series}
    return {
        "x": [str(i[chart.x]) for i in items],
        "series": {v: [pick(i, v) for i in items] for v in chart.values},
    }


_SENT = tuple(
    f"sent.{s}"
    for s in (
        "pending",
        "delivered",
        "failed",
        "capped",
        "suppressed",
        "dropped",
        "no_credit",
        "unknown",
    )
)

KPIS: dict[str, tuple[Kpi, ...]] = {
    "overview": (
        Kpi("members.total", ("会员总数", "Members"), definition="members_total"),
        Kpi("members.new", ("新增会员", "New members"), definition="members_new"),
        Kpi(
            "orders.active_members_30d",
            ("30天活跃会员", "Active (30 days)"),
            definition="active_members_30d",
        ),
        Kpi("orders.orders", ("会员订单", "Member orders"), definition="orders"),
        Kpi("orders.spend_fen", ("会员消费", "Member spend"), "fen", definition="orders"),
        Kpi("orders.buyers", ("下单会员", "Buyers"), definition="orders"),
        Kpi(
            "orders.repurchase_rate",
            ("复购率", "Repurchase rate"),
            "rate",
            definition="repurchase_rate",
        ),
    ),
    "tiers": (
        Kpi("in_grace", ("保级宽限期会员", "Members in grace"), definition="members_in_grace"),
        Kpi("movements.up", ("升级", "Moved up"), definition="tier_movements"),
        Kpi("movements.down", ("降级", "Moved down"), definition="tier_movements"),
        Kpi("movements.kept", ("保持", "Kept"), definition="tier_movements"),
    ),
    "segments": (),
    "lifecycle": (),
    "points": (
        Kpi(
            "liability.outstanding_points",
            ("未使用积分", "Outstanding points"),
            definition="points_liability",
        ),
        Kpi(
            "liability.outstanding_fen",
            ("未使用积分价值", "Outstanding value"),
            "fen",
            definition="points_liability",
        ),
        Kpi(
            "liability.pending_points",
            ("待生效积分", "Pending points"),
            definition="points_liability",
        ),
        Kpi(
            "liability.pending_fen",
            ("待生效积分价值", "Pending value"),
            "fen",
            definition="points_liability",
        ),
        Kpi(
            "liability.expiring_30d_points",
            ("30天内到期积分", "Expiring in 30 days"),
            definition="points_liability",
        ),
        Kpi(
            "liability.expiring_30d_fen",
            ("30天内到期价值", "Expiring value"),
            "fen",
            definition="points_liability",
        ),
    ),
    "coupons": (),
    "referral": (
        Kpi("invites", ("邀请", "Invites"), definition="referral_invites"),
        Kpi("accepted", ("接受邀请", "Accepted"), definition="referral_invites"),
        Kpi("first_orders", ("首单", "First orders"), definition="referral_invites"),
        Kpi("inviters", ("邀请人", "Inviters"), definition="referral_invites"),
        Kpi("fission_ratio", ("裂变系数", "Fission ratio"), definition="fission_ratio"),
        Kpi("abuse_refusals", ("拦截作弊", "Abuse refusals"), definition="referral_abuse"),
    ),
    "journeys": (),
}

CHARTS: dict[str, tuple[Chart, ...]] = {
    "overview": (
        Chart(
            "new-by-day",
            ("每日新增会员", "New members per day"),
            "line",
            "members.new_by_day",
            definition="members_new",
        ),
        Chart(
            "new-by-channel",
            ("新增会员渠道", "New members by channel"),
            "pie",
            "members.new_by_channel",
            definition="members_new",
        ),
        Chart(
            "new-by-store",
            ("新增会员门店", "New members by store"),
            "bar",
            "members.new_by_store",
            definition="members_new",
        ),
        Chart(
            "orders-by-day",
            ("每日会员订单与消费", "Member orders and spend per day"),
            "line",
            "orders.by_day",
            "day",
            ("orders", "spend_fen"),
            "orders",
        ),
        Chart(
            "orders-by-store",
            ("门店会员订单与消费", "Member orders and spend by store"),
            "bar",
            "orders.by_store",
            "store_id",
            ("orders", "spend_fen"),
            "orders",
        ),
    ),
    "tiers": (
        Chart(
            "distribution",
            ("等级分布", "Tier distribution"),
            "pie",
            "distribution",
            definition="tier_distribution",
        ),
        Chart(
            "flows",
            ("上次重算以来的等级流动", "Moves since the last recompute"),
            "sankey",
            "movements.flows",
            "from_tier->to_tier",
            ("members",),
            "tier_movements",
        ),
        Chart(
            "moves-by-day",
            ("每日升降级", "Up / down per day"),
            "bar",
            "by_day",
            "day",
            ("up", "down"),
            "tier_changes_per_day",
        ),
        Chart(
            "projections",
            ("等级预测", "What it takes, per tier"),
            "bar",
            "projections",
            "tier",
            ("members", "at_risk", "near_next"),
            "tier_projections",
        ),
    ),
    "segments": (
        Chart(
            "rfm",
            ("RFM 热力图（R×F）", "RFM heatmap (R×F)"),
            "heatmap",
            "rfm",
            "r,f",
            ("members", "avg_spend_fen"),
            "rfm_heatmap",
        ),
        Chart(
            "segments",
            ("分群人数", "Members per segment"),
            "bar",
            "segments",
            definition="rfm_heatmap",
        ),
    ),
    "lifecycle": (
        Chart(
            "stages",
            ("生命周期阶段", "Lifecycle stages"),
            "pie",
            "stages",
            definition="lifecycle_stages",
        ),
        Chart(
            "transitions",
            ("阶段流转（按天）", "Stage transitions per day"),
            "pivot",
            "transitions",
            "day",
            ("from_stage", "to_stage", "members"),
            "lifecycle_transitions",
        ),
    ),
    "points": (
        Chart(
            "points-by-day",
            ("每日积分获得 / 使用 / 过期", "Points earned / spent / expired per day"),
            "bar",
            "by_day",
            "day",
            ("earned", "spent", "expired"),
            "points_flows",
        ),
    ),
    "coupons": (
        Chart(
            "funnel",
            ("模板漏斗：发放→锁定→核销→过期", "Per template: issued → locked → redeemed → expired"),
            "bar",
            "templates",
            "template_id",
            ("issued", "locked", "redeemed", "expired"),
            "coupon_funnel",
        ),
        Chart(
            "rate-by-day",
            ("核销率（按发放日）", "Redemption rate by issue day"),
            "line",
            "by_day",
            "day",
            ("redemption_rate",),
            "coupon_redemption_rate",
        ),
        Chart(
            "by-store",
            ("门店核销", "Redemptions by store"),
            "bar",
            "by_store",
            "store_id",
            ("redeemed", "discount_fen"),
            "coupon_by_store",
        ),
    ),
    "referral": (
        Chart(
            "top-inviters",
            ("邀请排行", "Top inviters"),
            "bar",
            "top_inviters",
            "member_id",
            ("accepted", "first_orders"),
            "referral_invites",
        ),
        Chart(
            "refusals",
            ("作弊拦截原因", "Abuse refusals by reason"),
            "pie",
            "refusals_by_reason",
            definition="referral_abuse",
        ),
    ),
    "journeys": (),
}


def dashboard_view(name: str, answer: dict[str, Any]) -> DashboardView:
    view = DashboardView(name=name, definitions=dict(answer.get("definitions") or {}))
    for kpi in KPIS[name]:
        view.kpis.append(
            {
                "path": kpi.path,
                "label": kpi.label,
                "unit": kpi.unit,
                "value": pick(answer, kpi.path),
                "definition": view.definitions.get(kpi.definition, ""),
            }
        )
    charts = list(CHARTS[name])
    if name == "journeys":
        # One funnel per journey: its steps, entered → sent by status → converted.
        for index, journey in enumerate(answer.get("journeys") or []):
            jid = journey["journey_id"]
            charts.append(
                Chart(
                    f"journey-{index}",
                    (f"旅程 {jid}：各步骤漏斗", f"Journey {jid}: funnel per step"),
                    "bar",
                    f"journeys.{index}.steps",
                    "step_id",
                    ("entered", *_SENT, "converted"),
                    "journey_funnel",
                )
            )
        view.tables.append({"kind": "lift", "rows": answer.get("journeys") or []})
    for chart in charts:
        view.charts.append(
            {
                "id": chart.chart_id,
                "title": chart.title,
                "kind": chart.kind,
                "source": chart.source,
                "data": json.dumps(chart_data(chart, answer), ensure_ascii=False),
                "definition": view.definitions.get(chart.definition, ""),
            }
        )
    return view
