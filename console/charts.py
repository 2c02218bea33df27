"""What each dashboard shows: its headline numbers and charts, each read from
one block of the analytics API's answer (docs/api.md, "Analytics"). The chart
element carries the numbers it draws (data-chart, exactly the API's values,
fen stays fen) and the block they came from (data-source), so a test can hold
them against the API's answer for the same filter; console/static/console.js
draws them with ECharts and shows fen as yuan. Every title and label is a key
of the one catalogue (console/i18n.py); codes a chart draws as categories
(tiers, segments, stages, channels) stay codes in data-chart and are shown as
words of the session's language (data-codes names which words)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from servicekit.metrics_definitions import definition_in, metric_of

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
    label: str  # catalogue key (console/i18n.py)
    unit: str = ""  # "fen" (shown as yuan), "rate" (shown as %), "" (a count)
    definition: str = ""  # the definitions key


@dataclass(frozen=True)
class Chart:
    chart_id: str
    title: str  # catalogue key (console/i18n.py)
    kind: str  # line | bar | pie | sankey | heatmap | pivot (stacked bar of pairs per day)
    source: str  # dotted path of the list it draws
    x: str = "key"  # the field naming each item (category axis, pie slice, ...)
    values: tuple[str, ...] = ("count",)  # dotted fields of each item drawn as series
    definition: str = ""
    # The kind of code its categories are (i18n.CODES: tier, segment, stage,
    # channel, refusal); "" when they are shown as they come (days, store ids).
    codes: str = ""


@dataclass
class DashboardView:
    name: str
    kpis: list[dict[str, Any]] = field(default_factory=list)
    charts: list[dict[str, Any]] = field(default_factory=list)
    # metric key -> (its name, its definition), both in the session's language.
    definitions: dict[str, tuple[str, str]] = field(default_factory=dict)
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
        "sending",
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
        Kpi("members.total", "kpi.overview.members.total", definition="members_total"),
        Kpi("members.new", "kpi.overview.members.new", definition="members_new"),
        Kpi(
            "orders.active_members_30d",
            "kpi.overview.orders.active_members_30d",
            definition="active_members_30d",
        ),
        Kpi("orders.orders", "kpi.overview.orders.orders", definition="orders"),
        Kpi("orders.spend_fen", "kpi.overview.orders.spend_fen", "fen", definition="orders"),
        Kpi("orders.buyers", "kpi.overview.orders.buyers", definition="orders"),
        Kpi(
            "orders.repurchase_rate",
            "kpi.overview.orders.repurchase_rate",
            "rate",
            definition="repurchase_rate",
        ),
    ),
    "tiers": (
        Kpi("in_grace", "kpi.tiers.in_grace", definition="members_in_grace"),
        Kpi("movements.up", "kpi.tiers.movements.up", definition="tier_movements"),
        Kpi("movements.down", "kpi.tiers.movements.down", definition="tier_movements"),
        Kpi("movements.kept", "kpi.tiers.movements.kept", definition="tier_movements"),
    ),
    "segments": (),
    "lifecycle": (),
    "points": (
        Kpi(
            "liability.outstanding_points",
            "kpi.points.liability.outstanding_points",
            definition="points_liability",
        ),
        Kpi(
            "liability.outstanding_fen",
            "kpi.points.liability.outstanding_fen",
            "fen",
            definition="points_liability",
        ),
        Kpi(
            "liability.pending_points",
            "kpi.points.liability.pending_points",
            definition="points_liability",
        ),
        Kpi(
            "liability.pending_fen",
            "kpi.points.liability.pending_fen",
            "fen",
            definition="points_liability",
        ),
        Kpi(
            "liability.expiring_30d_points",
            "kpi.points.liability.expiring_30d_points",
            definition="points_liability",
        ),
        Kpi(
            "liability.expiring_30d_fen",
            "kpi.points.liability.expiring_30d_fen",
            "fen",
            definition="points_liability",
        ),
    ),
    "coupons": (),
    "referral": (
        Kpi("invites", "kpi.referral.invites", definition="referral_invites"),
        Kpi("accepted", "kpi.referral.accepted", definition="referral_invites"),
        Kpi("first_orders", "kpi.referral.first_orders", definition="referral_invites"),
        Kpi("inviters", "kpi.referral.inviters", definition="referral_invites"),
        Kpi("fission_ratio", "kpi.referral.fission_ratio", definition="fission_ratio"),
        Kpi("abuse_refusals", "kpi.referral.abuse_refusals", definition="referral_abuse"),
    ),
    "journeys": (),
}

CHARTS: dict[str, tuple[Chart, ...]] = {
    "overview": (
        Chart(
            "new-by-day",
            "chart.overview.new-by-day",
            "line",
            "members.new_by_day",
            definition="members_new",
        ),
        Chart(
            "new-by-channel",
            "chart.overview.new-by-channel",
            "pie",
            "members.new_by_channel",
            definition="members_new",
            codes="channel",
        ),
        Chart(
            "new-by-store",
            "chart.overview.new-by-store",
            "bar",
            "members.new_by_store",
            definition="members_new",
        ),
        Chart(
            "orders-by-day",
            "chart.overview.orders-by-day",
            "line",
            "orders.by_day",
            "day",
            ("orders", "spend_fen"),
            "orders",
        ),
        Chart(
            "orders-by-store",
            "chart.overview.orders-by-store",
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
            "chart.tiers.distribution",
            "pie",
            "distribution",
            definition="tier_distribution",
            codes="tier",
        ),
        Chart(
            "flows",
            "chart.tiers.flows",
            "sankey",
            "movements.flows",
            "from_tier->to_tier",
            ("members",),
            "tier_movements",
            codes="tier",
        ),
        Chart(
            "moves-by-day",
            "chart.tiers.moves-by-day",
            "bar",
            "by_day",
            "day",
            ("up", "down"),
            "tier_changes_per_day",
        ),
        Chart(
            "projections",
            "chart.tiers.projections",
            "bar",
            "projections",
            "tier",
            ("members", "at_risk", "near_next"),
            "tier_projections",
            codes="tier",
        ),
    ),
    "segments": (
        Chart(
            "rfm",
            "chart.segments.rfm",
            "heatmap",
            "rfm",
            "r,f",
            ("members", "avg_spend_fen"),
            "rfm_heatmap",
        ),
        Chart(
            "segments",
            "chart.segments.segments",
            "bar",
            "segments",
            definition="rfm_heatmap",
            codes="segment",
        ),
    ),
    "lifecycle": (
        Chart(
            "stages",
            "chart.lifecycle.stages",
            "pie",
            "stages",
            definition="lifecycle_stages",
            codes="stage",
        ),
        Chart(
            "transitions",
            "chart.lifecycle.transitions",
            "pivot",
            "transitions",
            "day",
            ("from_stage", "to_stage", "members"),
            "lifecycle_transitions",
            codes="stage",
        ),
    ),
    "points": (
        Chart(
            "points-by-day",
            "chart.points.points-by-day",
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
            "chart.coupons.funnel",
            "bar",
            "templates",
            "template_id",
            ("issued", "locked", "redeemed", "expired"),
            "coupon_funnel",
        ),
        Chart(
            "rate-by-day",
            "chart.coupons.rate-by-day",
            "line",
            "by_day",
            "day",
            ("redemption_rate",),
            "coupon_redemption_rate",
        ),
        Chart(
            "by-store",
            "chart.coupons.by-store",
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
            "chart.referral.top-inviters",
            "bar",
            "top_inviters",
            "member_id",
            ("accepted", "first_orders"),
            "referral_invites",
        ),
        Chart(
            "refusals",
            "chart.referral.refusals",
            "pie",
            "refusals_by_reason",
            definition="referral_abuse",
            codes="refusal",
        ),
    ),
    "journeys": (),
}


def dashboard_view(name: str, answer: dict[str, Any], locale: str = "zh-CN") -> DashboardView:
    """What the dashboard page shows; definitions in the session's language
    (servicekit/metrics_definitions.py holds both; the API answers English)."""
    answered = dict(answer.get("definitions") or {})
    view = DashboardView(name=name)
    for key, text in answered.items():
        metric = metric_of(key)
        if metric is None:  # a metric this console does not know yet: the API's text
            view.definitions[key] = (key, text)
        else:
            view.definitions[key] = (
                metric.name if locale == "en" else metric.name_zh,
                definition_in(key, locale),
            )

    def definition(key: str) -> str:
        return view.definitions[key][1] if key in view.definitions else ""

    for kpi in KPIS[name]:
        view.kpis.append(
            {
                "path": kpi.path,
                "label": kpi.label,
                "unit": kpi.unit,
                "value": pick(answer, kpi.path),
                "definition": definition(kpi.definition),
            }
        )
    charts = list(CHARTS[name])
    title_args: dict[str, dict[str, str]] = {}
    if name == "journeys":
        # One funnel per journey: its steps, entered → sent by status → converted.
        for index, journey in enumerate(answer.get("journeys") or []):
            chart_id = f"journey-{index}"
            title_args[chart_id] = {"journey": str(journey["journey_id"])}
            charts.append(
                Chart(
                    chart_id,
                    "chart.journeys.journey",
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
                "title_args": title_args.get(chart.chart_id, {}),
                "kind": chart.kind,
                "source": chart.source,
                "codes": chart.codes,
                "data": json.dumps(chart_data(chart, answer), ensure_ascii=False),
                "definition": definition(chart.definition),
            }
        )
    return view
