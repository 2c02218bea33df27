"""Every dashboard metric's definition, written once: the analytics API returns
the texts of the metrics it answers (`definitions`), the console shows them
beside the charts, and docs/metrics.md is generated from this table
(`python -m servicekit.metrics_definitions > docs/metrics.md`; a test checks
the page is current). The SQL computing each metric lives in the owning
service's analytics module; the definitions here are what it must compute.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str
    dashboard: str
    name: str
    name_zh: str
    definition: str


# Days are local days of the brand's time zone (Asia/Shanghai); "the range" is
# the request's from..to, both days included.
METRICS: tuple[Metric, ...] = (
    Metric(
        "members_total",
        "overview",
        "Members",
        "会员总数",
        "Members registered up to the end of the range (merged-away and erased members not"
        " counted); with a store filter, those whose registration store is one of the stores.",
    ),
    Metric(
        "members_new",
        "overview",
        "New members",
        "新增会员",
        "Members registered within the range, per day, by acquisition channel (the"
        " profile's, else the registration source) and by registration store.",
    ),
    Metric(
        "active_members_30d",
        "overview",
        "Active members (30 days)",
        "30天活跃会员",
        "Distinct members with at least one settled order in the 30 days ending on the range's"
        " last day (at the filtered stores).",
    ),
    Metric(
        "orders",
        "overview",
        "Orders and spend",
        "订单与消费",
        "Settled member orders placed within the range and the fen members paid for them"
        " (after coupons and points, before refunds), per day and per store.",
    ),
    Metric(
        "repurchase_rate",
        "overview",
        "Repurchase rate",
        "复购率",
        "Of the members who ordered within the range, the share who ordered at least twice"
        " within it: repeat buyers / buyers (0 when nobody ordered).",
    ),
    Metric(
        "tier_distribution",
        "tiers",
        "Tier distribution",
        "等级分布",
        "Members per effective tier now (earned tier raised by an active override).",
    ),
    Metric(
        "tier_movements",
        "tiers",
        "Movements since the last recompute",
        "上次重算以来的等级变动",
        "Members whose tier changed since the last finished recompute run started: up"
        " (to a higher tier), down (to a lower one); kept = members with a tier and no change.",
    ),
    Metric(
        "tier_changes_per_day",
        "tiers",
        "Upgrades and downgrades per day",
        "每日升降级",
        "Tier history entries within the range that moved a member up or down the ladder.",
    ),
    Metric(
        "members_in_grace",
        "tiers",
        "Members in grace",
        "保级宽限期会员",
        "Members whose tier is kept past its period end by a grace period that has not ended.",
    ),
    Metric(
        "tier_projections",
        "tiers",
        "What it takes",
        "升降级预测",
        "Per tier: members whose current-period metric is still below the tier's retention"
        " bar (at risk of moving down at the period end), and members within 20% of the next"
        " tier's threshold (close to moving up).",
    ),
    Metric(
        "rfm_heatmap",
        "segments",
        "RFM heatmap",
        "RFM热力图",
        "Members per recency score (R, 1-5) and frequency score (F, 1-5) from the last"
        " recompute, with their average paid spend within the range (net of refunds, members"
        " without orders counted as 0).",
    ),
    Metric(
        "lifecycle_stages",
        "lifecycle",
        "Lifecycle stages",
        "生命周期阶段",
        "Members per lifecycle stage (new, active, at risk, lapsed, ...) from the last recompute.",
    ),
    Metric(
        "lifecycle_transitions",
        "lifecycle",
        "Lifecycle transitions",
        "生命周期流转",
        "Members moved from one stage to another by recomputes within the range, per day.",
    ),
    Metric(
        "points_liability",
        "points",
        "Points liability",
        "积分负债",
        "Outstanding = points members hold now (spendable, and reserved by open holds);"
        " pending = earned points not yet"
        " active; expiring = active lots whose remaining points expire within the next 30"
        " days. In points and in fen at the brand's points value (fen per point). Brand-wide:"
        " points are not held per store.",
    ),
    Metric(
        "points_flows",
        "points",
        "Earned, spent, expired",
        "积分发放、使用、过期",
        "Points earned (earn transactions: orders, actions, referral rewards), spent"
        " (redemptions, posted holds) and expired per day within the range; points of an"
        " order count on the order's day, others on the day they were written. With a"
        " store filter, only points earned or spent on orders at those stores (expiries"
        " stay brand-wide).",
    ),
    Metric(
        "coupon_funnel",
        "coupons",
        "Coupon funnel",
        "券漏斗",
        "Per template, coupons issued within the range and where they are now: locked (held"
        " by a till), redeemed, expired (validity ended unused). Revoked coupons count as"
        " issued only.",
    ),
    Metric(
        "coupon_redemption_rate",
        "coupons",
        "Redemption rate",
        "核销率",
        "Redeemed / issued for the coupons issued on each day (or template) of the range.",
    ),
    Metric(
        "coupon_by_store",
        "coupons",
        "Redemptions by store",
        "门店核销",
        "Coupons redeemed within the range per store of the order, with the discount in fen.",
    ),
    Metric(
        "referral_invites",
        "referral",
        "Invites, accepted, first orders",
        "邀请、接受、首单",
        "Invites = members who got an invite code within the range; accepted = referrals"
        " accepted within the range; first orders = those accepted invitees who have ordered"
        " since.",
    ),
    Metric(
        "fission_ratio",
        "referral",
        "Fission ratio",
        "裂变系数",
        "Accepted invitees / distinct inviters, over referrals accepted within the range.",
    ),
    Metric(
        "referral_abuse",
        "referral",
        "Abuse refusals",
        "风控拦截",
        "Invites refused as abuse at acceptance within the range (self referral, a"
        " referral cycle, a device or identifier already behind another invitee, an"
        " existing member), and referral reward parts refused (the inviter's cap, a merge"
        " that made it a self referral, coupon stock...), by reason code.",
    ),
    Metric(
        "journey_funnel",
        "journeys",
        "Journey funnel",
        "旅程漏斗",
        "Per journey and step: enrollments that entered within the range, the messages"
        " their steps wrote by send status (pending, delivered, failed, capped, suppressed,"
        " dropped, no_credit, unknown), and the enrollments that converted (ordered within"
        " their conversion window).",
    ),
    Metric(
        "holdout_lift",
        "journeys",
        "Holdout lift",
        "对照组提升",
        "Conversion rate of the treated group minus that of the holdout group, with a 95%"
        " confidence interval (normal approximation of the difference of two proportions).",
    ),
)

BY_KEY = {m.key: m for m in METRICS}


def definitions(dashboard: str) -> dict[str, str]:
    """The definition texts of one dashboard's metrics, by key."""
    return {m.key: m.definition for m in METRICS if m.dashboard == dashboard}


def markdown() -> str:
    """docs/metrics.md."""
    out = [
        "# Dashboard metrics",
        "",
        "Generated from `servicekit/metrics_definitions.py`"
        " (`python -m servicekit.metrics_definitions > docs/metrics.md`): the analytics API"
        " returns the same texts in each answer's `definitions`, and the console shows them"
        " beside the charts. Days are local days of Asia/Shanghai; a range's `from` and `to`"
        " are both included. Amounts are in fen.",
        "",
    ]
    dashboard = ""
    for m in METRICS:
        if m.dashboard != dashboard:
            dashboard = m.dashboard
            out += [f"## {dashboard}", ""]
        out += [f"**{m.name}** ({m.name_zh}, `{m.key}`): {m.definition}", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")
