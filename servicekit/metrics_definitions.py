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
    # The same definition in Chinese, shown to operators reading the console in zh-CN.
    definition_zh: str


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
        "截至所选区间最后一天已注册的会员数（已被合并或已注销的会员不计）；按门店筛选时，只计注册门店为所选门店的会员。",
    ),
    Metric(
        "members_new",
        "overview",
        "New members",
        "新增会员",
        "Members registered within the range, per day, by acquisition channel (the"
        " profile's, else the registration source) and by registration store.",
        "在所选区间内注册的会员，按天、按获客渠道（取会员资料中的渠道，没有则取注册来源）和按注册门店统计。",
    ),
    Metric(
        "active_members_30d",
        "overview",
        "Active members (30 days)",
        "30天活跃会员",
        "Distinct members with at least one settled order in the 30 days ending on the range's"
        " last day (at the filtered stores).",
        "截至所选区间最后一天的30天内，至少有一笔已结算订单的不同会员数（按门店筛选时只计所选门店的订单）。",
    ),
    Metric(
        "orders",
        "overview",
        "Orders and spend",
        "订单与消费",
        "Settled member orders placed within the range and the fen members paid for them"
        " (after coupons and points, before refunds), per day and per store.",
        "在所选区间内下单且已结算的会员订单数，以及会员为这些订单实付的金额（分；扣除优惠券和积分抵扣后、退款前），按天和按门店统计。",
    ),
    Metric(
        "repurchase_rate",
        "overview",
        "Repurchase rate",
        "复购率",
        "Of the members who ordered within the range, the share who ordered at least twice"
        " within it: repeat buyers / buyers (0 when nobody ordered).",
        "在所选区间内下过单的会员中，区间内至少下单两次的会员占比：复购会员数 / 下单会员数（无人下单时为0）。",
    ),
    Metric(
        "tier_distribution",
        "tiers",
        "Tier distribution",
        "等级分布",
        "Members per effective tier now (earned tier raised by an active override).",
        "当前各有效等级的会员数（有效等级 = 计算所得等级，若有生效中的人工调整则取较高者）。",
    ),
    Metric(
        "tier_movements",
        "tiers",
        "Movements since the last recompute",
        "上次重算以来的等级变动",
        "Members whose tier changed since the last finished recompute run started: up"
        " (to a higher tier), down (to a lower one); kept = members with a tier and no change.",
        "自上一次完成的等级重算开始以来等级发生变化的会员：升级（升到更高等级）、降级（降到更低等级）；保持 = 有等级且未变化的会员。",
    ),
    Metric(
        "tier_changes_per_day",
        "tiers",
        "Upgrades and downgrades per day",
        "每日升降级",
        "Tier history entries within the range that moved a member up or down the ladder.",
        "所选区间内，使会员在等级阶梯上升级或降级的等级历史记录，按天统计。",
    ),
    Metric(
        "members_in_grace",
        "tiers",
        "Members in grace",
        "保级宽限期会员",
        "Members whose tier is kept past its period end by a grace period that has not ended.",
        "等级已过周期结束日、但仍在未结束的保级宽限期内而保留等级的会员。",
    ),
    Metric(
        "tier_projections",
        "tiers",
        "What it takes",
        "升降级预测",
        "Per tier: members whose current-period metric is still below the tier's retention"
        " bar (at risk of moving down at the period end), and members within 20% of the next"
        " tier's threshold (close to moving up).",
        "按等级统计：本周期考核指标仍低于该等级保级线的会员（周期结束时有降级风险），以及距下一等级门槛不足20%的会员（接近升级）。",
    ),
    Metric(
        "rfm_heatmap",
        "segments",
        "RFM heatmap",
        "RFM热力图",
        "Members per recency score (R, 1-5) and frequency score (F, 1-5) from the last"
        " recompute, with their average paid spend within the range (net of refunds, members"
        " without orders counted as 0).",
        "按上一次重算得到的最近消费得分（R，1-5）和消费频次得分（F，1-5）统计的会员数，以及他们在所选区间内的平均实付消费（扣除退款，无订单的会员按0计）。",
    ),
    Metric(
        "lifecycle_stages",
        "lifecycle",
        "Lifecycle stages",
        "生命周期阶段",
        "Members per lifecycle stage (new, active, at risk, lapsed, ...) from the last recompute.",
        "按上一次重算得到的生命周期阶段（新会员、成长期、活跃、沉默、流失等）统计的会员数。",
    ),
    Metric(
        "lifecycle_transitions",
        "lifecycle",
        "Lifecycle transitions",
        "生命周期流转",
        "Members moved from one stage to another by recomputes within the range, per day.",
        "所选区间内，各次重算使会员从一个阶段转入另一阶段的人数，按天统计。",
    ),
    Metric(
        "points_liability",
        "points",
        "Points liability",
        "积分负债",
        "Outstanding = points members hold now (spendable, and reserved by open holds);"
        " pending = earned points not yet"
        " active; expiring = active lots whose remaining points expire within the next 30"
        " days. In points and in fen at the brand's points value (fen per point). With a store"
        " filter, the points of members whose store (member_store) is one of the stores.",
        "未使用 = 会员当前持有的积分（可用的，以及被未完成的冻结占用的）；待生效 = 已获得但尚未生效的积分；即将过期 = 剩余积分将在未来30天内过期的有效积分批次。以积分和按品牌积分价值（每积分折合的分）换算的金额表示。按门店筛选时，只计归属门店（member_store）为所选门店的会员的积分。",
    ),
    Metric(
        "points_flows",
        "points",
        "Earned, spent, expired",
        "积分发放、使用、过期",
        "Points earned (earn transactions: orders, actions, referral rewards), spent"
        " (redemptions, posted holds) and expired per day within the range; points of an"
        " order count on the order's day, others on the day they were written. With a"
        " store filter, an order's points count when the order's store is one of the"
        " stores, the others (actions, referral rewards, expiries) when the member's store"
        " (member_store) is.",
        "所选区间内每天获得的积分（获得类交易：订单、行为、推荐奖励）、使用的积分（兑换、已入账的冻结）和过期的积分；订单产生的积分计入下单当天，其余计入写入当天。按门店筛选时，订单上的积分按订单所属门店计，其余（行为、推荐奖励、过期）按会员的归属门店（member_store）计。",
    ),
    Metric(
        "coupon_funnel",
        "coupons",
        "Coupon funnel",
        "券漏斗",
        "Per template, coupons issued within the range and where they are now: locked (held"
        " by a till), redeemed, expired (validity ended unused). Revoked coupons count as"
        " issued only. With a store filter, the coupons of members whose store"
        " (member_store) is one of the stores.",
        "按券模板统计：所选区间内发放的券及其当前状态：锁定（被收银台占用）、已核销、已过期（有效期结束仍未使用）。已撤回的券只计入发放。按门店筛选时，只计归属门店（member_store）为所选门店的会员的券。",
    ),
    Metric(
        "coupon_redemption_rate",
        "coupons",
        "Redemption rate",
        "核销率",
        "Redeemed / issued for the coupons issued on each day (or template) of the range.",
        "所选区间内每天（或每个模板）发放的券中，已核销数 / 发放数。",
    ),
    Metric(
        "coupon_by_store",
        "coupons",
        "Redemptions by store",
        "门店核销",
        "Coupons redeemed within the range per store of the order, with the discount in fen.",
        "所选区间内按订单所属门店统计的核销券数，以及优惠金额（分）。",
    ),
    Metric(
        "referral_invites",
        "referral",
        "Invites, accepted, first orders",
        "邀请、接受、首单",
        "Invites = members who got an invite code within the range; accepted = referrals"
        " accepted within the range; first orders = those accepted invitees who have ordered"
        " since. With a store filter, every referral figure counts under the inviter's"
        " store (member_store).",
        "邀请 = 所选区间内获得邀请码的会员；接受 = 所选区间内被接受的推荐；首单 = 这些被邀请人中此后已下单的人数。按门店筛选时，所有推荐数据按邀请人的归属门店（member_store）计。",
    ),
    Metric(
        "fission_ratio",
        "referral",
        "Fission ratio",
        "裂变系数",
        "Accepted invitees / distinct inviters, over referrals accepted within the range.",
        "在所选区间内被接受的推荐中，被邀请人数 / 不同邀请人数。",
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
        "所选区间内在接受邀请时被判为作弊而拦截的邀请（自己邀请自己、循环邀请、设备或标识已属于其他被邀请人、已是会员），以及被拒绝发放的推荐奖励（超过邀请人上限、合并后变成自我邀请、券库存不足等），按原因代码统计。",
    ),
    Metric(
        "journey_funnel",
        "journeys",
        "Journey funnel",
        "旅程漏斗",
        "Per journey and step: enrollments that entered within the range, the messages"
        " their steps wrote by send status (pending, sending, delivered, failed, capped, suppressed,"
        " dropped, no_credit, unknown), and the enrollments that converted (ordered within"
        " their conversion window).",
        "按旅程和步骤统计：所选区间内进入旅程的人次，各步骤发出的消息按发送状态（待发送、发送中、已送达、发送失败、频控拦截、已屏蔽、已丢弃、额度不足、状态未知）的数量，以及转化的人次（在转化窗口内下单）。",
    ),
    Metric(
        "holdout_lift",
        "journeys",
        "Holdout lift",
        "对照组提升",
        "Conversion rate of the treated group minus that of the holdout group, with a 95%"
        " confidence interval (normal approximation of the difference of two proportions).",
        "实验组转化率减去对照组转化率，并给出95%置信区间（两比例之差的正态近似）。",
    ),
)

BY_KEY = {m.key: m for m in METRICS}

# The store a member's figures count under when a dashboard is filtered by store
# or region: written once here, computed by each service owning per-member
# figures from what it keeps of the member's events (tiering: member_profiles,
# MEMBER_STORE_SQL in services/tiering/repository.py; engagement: member_facts,
# MEMBER_STORE_SQL in services/engagement/analytics.py; rewards: member_stores,
# MEMBER_STORE_SQL in services/rewards/analytics/repository.py).
MEMBER_STORE = Metric(
    "member_store",
    "filter",
    "A member's store",
    "会员归属门店",
    "The store a member's figures count under with a store or region filter: the"
    " member's registration store (the profile's effective value, as member's"
    " MemberZoneSet states it), else the store of the member's latest order; a"
    " member with neither counts brand-wide only. A region is the stores whose city"
    " it is (rewards' stores table).",
    "按门店或区域筛选时会员数据归属的门店：会员的注册门店（会员资料中的有效值），"
    "没有时取会员最近一笔订单的门店；两者都没有的会员只计入全品牌。"
    "区域即所在城市为该区域的门店。",
)

# The dashboards whose figures are per member, filtered by MEMBER_STORE.
MEMBER_STORE_DASHBOARDS = (
    "tiers",
    "segments",
    "lifecycle",
    "points",
    "coupons",
    "referral",
    "journeys",
)


def definitions(dashboard: str) -> dict[str, str]:
    """The definition texts of one dashboard's metrics, by key (English: the
    API's; with the member store's on the dashboards filtered by it)."""
    texts = {m.key: m.definition for m in METRICS if m.dashboard == dashboard}
    if dashboard in MEMBER_STORE_DASHBOARDS:
        texts[MEMBER_STORE.key] = MEMBER_STORE.definition
    return texts


def definition_in(key: str, locale: str) -> str:
    """One metric's definition in the console's locale (zh-CN unless "en")."""
    metric = metric_of(key)
    if metric is None:
        raise KeyError(key)
    return metric.definition if locale == "en" else metric.definition_zh


def metric_of(key: str) -> Metric | None:
    """A dashboard metric, or the member store's definition, by key."""
    return MEMBER_STORE if key == MEMBER_STORE.key else BY_KEY.get(key)


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
    out += [
        "## The store / region filter",
        "",
        f"**{MEMBER_STORE.name}** ({MEMBER_STORE.name_zh}, `{MEMBER_STORE.key}`):"
        f" {MEMBER_STORE.definition} Filtered by it: " + ", ".join(MEMBER_STORE_DASHBOARDS) + ".",
        "",
        f"> {MEMBER_STORE.definition_zh}",
        "",
    ]
    dashboard = ""
    for m in METRICS:
        if m.dashboard != dashboard:
            dashboard = m.dashboard
            out += [f"## {dashboard}", ""]
        out += [f"**{m.name}** ({m.name_zh}, `{m.key}`): {m.definition}", ""]
        out += [f"> {m.definition_zh}", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")
