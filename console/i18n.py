"""The console's one text catalogue: every UI string in zh-CN (the default:
operators work in Chinese) and en, looked up by key: page texts, chart titles
and headline labels (console/charts.py names their keys), form errors, and the
codes the API answers with (tiers, RFM segments, lifecycle stages, channels,
send statuses, roles) as words; and money on screen (the API speaks fen,
operators read yuan with two decimals). The metric definitions shown under
the charts are in servicekit/metrics_definitions.py, in both languages too.
tests/unit/test_console_i18n.py renders every page in zh-CN and fails on a
missing key or an English label left on screen."""

from __future__ import annotations

from decimal import Decimal

LOCALES = ("zh-CN", "en")

CATALOGUE: dict[str, tuple[str, str]] = {
    # key: (zh-CN, en)
    "app.title": ("会员运营控制台", "Loyalty operator console"),
    "login.title": ("登录", "Sign in"),
    "login.username": ("用户名", "Username"),
    "login.password": ("密码", "Password"),
    "login.totp": ("动态验证码（如已启用）", "Authenticator code (if enrolled)"),
    "login.submit": ("登录", "Sign in"),
    "login.failed": ("用户名或密码错误", "Wrong username or password"),
    "login.totp_failed": ("动态验证码错误", "Wrong authenticator code"),
    "login.locked": (
        "登录失败次数过多，账号或地址已暂时锁定，请稍后再试",
        "Too many failed sign-ins: this account or address is locked for a while",
    ),
    "login.expired": ("会话已过期，请重新登录", "Your session ended; please sign in again"),
    "logout": ("退出", "Sign out"),
    "password.title": ("设置新密码", "Choose a new password"),
    "password.help": (
        "一次性密码只能用于首次登录，请设置至少12位的新密码",
        "The one-time password works once: choose a new one of at least 12 characters",
    ),
    "password.new": ("新密码", "New password"),
    "password.submit": ("保存", "Save"),
    "forbidden": ("您的角色无权执行此操作", "Your role may not do this"),
    "csrf": ("表单已失效，请刷新页面后重试", "This form expired; reload the page and try again"),
    "error.gateway": ("网关拒绝了请求", "The gateway refused the request"),
    "nav.dashboards": ("数据看板", "Dashboards"),
    "nav.merge_reviews": ("合并审核", "Merge reviews"),
    "nav.quarantine": ("隔离标识", "Quarantined identifiers"),
    "nav.members": ("会员查询", "Member lookup"),
    "nav.coupons": ("优惠券模板", "Coupon templates"),
    "nav.journeys": ("旅程", "Journeys"),
    "nav.events": ("挂起事件", "Parked events"),
    "nav.dead_letters": ("死信事件", "Dead letters"),
    "dash.overview": ("概览", "Overview"),
    "dash.tiers": ("等级", "Tiers"),
    "dash.segments": ("RFM 分群", "RFM segments"),
    "dash.lifecycle": ("生命周期", "Lifecycle"),
    "dash.points": ("积分", "Points"),
    "dash.coupons": ("优惠券", "Coupons"),
    "dash.referral": ("裂变推荐", "Referral"),
    "dash.journeys": ("旅程转化", "Journeys"),
    "filter.from": ("开始日期", "From"),
    "filter.to": ("结束日期", "To"),
    "filter.store": ("门店", "Store"),
    "filter.region": ("区域", "Region"),
    "filter.apply": ("查询", "Apply"),
    "filter.not_applicable": (
        "门店 / 区域筛选不适用于此看板：以下为全品牌数据",
        "The store / region filter does not apply to this dashboard: brand-wide figures",
    ),
    "filter.partial": (
        "门店 / 区域筛选只作用于部分数据，其余为全品牌数据。已筛选：",
        "The store / region filter narrows only some figures; the rest are brand-wide. Filtered:",
    ),
    "dash.no_data": ("该条件下没有数据", "No data for this filter"),
    "dash.unavailable": ("数据暂不可用", "Figures unavailable"),
    "reviews.members": ("涉及会员", "Members"),
    "reviews.evidence": ("证据（已脱敏）", "Evidence (masked)"),
    "reviews.reason": ("原因", "Reason"),
    "reviews.note": ("审核说明", "Note"),
    "reviews.approve": ("批准合并", "Approve merge"),
    "reviews.reject": ("拒绝", "Reject"),
    "reviews.empty": ("没有待审核的合并", "No merge awaits review"),
    "reviews.decided": ("已处理", "Decided"),
    "quarantine.type": ("类型", "Type"),
    "quarantine.value": ("标识（已脱敏）", "Identifier (masked)"),
    "quarantine.linked": ("关联会员数", "Linked members"),
    "quarantine.at": ("隔离时间", "Quarantined at"),
    "quarantine.empty": ("没有隔离的标识", "No quarantined identifier"),
    "members.id": ("会员ID", "Member id"),
    "members.lookup": ("查询", "Look up"),
    "members.number": ("会员号", "Member number"),
    "members.phone": ("手机号", "Phone"),
    "members.registered": ("注册时间", "Registered"),
    "members.unmask": ("查看完整手机号（将被审计）", "Show the full phone (audited)"),
    "members.purpose": ("查看原因", "Purpose"),
    "members.adjust": ("手工调整积分", "Adjust points"),
    "members.points": ("积分（正数增加，负数扣减）", "Points (+ credit, − debit)"),
    "members.adjust_reason": ("调整原因", "Reason"),
    "members.adjusted": ("积分已调整，可用积分", "Points adjusted; available"),
    "members.find": ("按手机号或会员号查询", "Find by phone or member number"),
    "members.find_kind": ("类型", "Kind"),
    "members.find_value": ("手机号 / 会员号", "Phone / member number"),
    "coupons.id": ("模板ID", "Template id"),
    "coupons.name": ("名称", "Name"),
    "coupons.status": ("状态", "Status"),
    "coupons.stock": ("总库存（0 为不限）", "Total stock (0: unlimited)"),
    "coupons.remaining": ("剩余库存", "Remaining"),
    "coupons.threshold": ("门槛（元）", "Threshold (yuan)"),
    "coupons.discount": ("减免（元）", "Discount (yuan)"),
    "coupons.valid_days": ("有效天数", "Valid days"),
    "coupons.create": ("新建满减券模板", "New amount-off template"),
    "coupons.pause": ("暂停", "Pause"),
    "coupons.activate": ("启用", "Activate"),
    "coupons.set_stock": ("修改库存", "Change stock"),
    "journeys.id": ("旅程ID", "Journey id"),
    "journeys.show": ("查看", "Show"),
    "journeys.publish": ("发布旅程（JSON 定义）", "Publish a journey (JSON definition)"),
    "journeys.pause": ("暂停", "Pause"),
    "journeys.resume": ("恢复", "Resume"),
    "journeys.entered": ("进入", "Entered"),
    "journeys.sent": ("已发送", "Sent"),
    "journeys.converted": ("转化", "Converted"),
    "journeys.name": ("名称", "Name"),
    "journeys.version": ("版本", "Version"),
    "journeys.channels": ("渠道", "Channels"),
    "journeys.active": ("进行中", "In progress"),
    "journeys.none": ("还没有旅程", "No journey yet"),
    "journeys.next": ("下一页", "Next page"),
    "events.member": ("会员ID", "Member id"),
    "events.event": ("事件", "Event"),
    "events.reason": ("挂起原因", "Reason"),
    "events.parked_at": ("挂起时间", "Parked at"),
    "events.replay": ("重放", "Replay"),
    "events.empty": ("没有挂起的事件", "No parked event"),
    "events.replayed": ("已重放事件数", "Events replayed"),
    "dlq.stream": ("事件流", "Stream"),
    "dlq.group": ("消费组", "Consumer group"),
    "dlq.id": ("条目ID", "Entry id"),
    "dlq.type": ("事件类型", "Event type"),
    "dlq.error": ("错误", "Error"),
    "dlq.attempts": ("尝试次数", "Attempts"),
    "dlq.at": ("进入死信时间", "Dead-lettered at"),
    "dlq.empty": ("没有死信事件", "No dead letter"),
    "dlq.redriven": ("已重新投递，新条目", "Redriven; new entry"),
    "done": ("操作成功", "Done"),
    "lang.switch": ("English", "中文"),
    "dash.definitions": ("指标口径", "What the numbers mean"),
    "lift.groups": ("实验组 / 对照组（转化/人数）", "treated / holdout"),
    "lift.ci": ("提升（95% 置信区间）", "lift (95% CI)"),
    "lift.pt": ("个百分点", "pt"),
    "journeys.holdout": ("对照组", "holdout"),
    # Form errors (the field's name first, as the gateway's own messages do).
    "error.sign_in_first": ("请先登录", "Sign in first"),
    "error.member_id": ("会员ID：须为 UUID", "member id: a UUID"),
    "error.find": (
        "类型：手机号或会员号，并填写查询值",
        "kind: phone or member_number, and a value",
    ),
    "error.purpose": ("查看原因：必填", "purpose: required"),
    "error.points": ("积分：须为整数", "points: a whole number"),
    "error.password_too_short": (
        "新密码至少需要12个字符",
        "The new password needs at least 12 characters",
    ),
    "error.form_amounts": (
        "金额与数量填写有误（金额最多两位小数）",
        "Amounts and counts are not valid (yuan: at most two decimals)",
    ),
    "error.total_stock": ("库存：须为整数", "total_stock: a whole number"),
    "error.definition_json": ("旅程定义不是合法的 JSON", "definition: not valid JSON"),
    "error.not_found": ("没有这个页面", "No such page"),
    # Chart titles and headline figures (console/charts.py).
    "kpi.overview.members.total": ("会员总数", "Members"),
    "kpi.overview.members.new": ("新增会员", "New members"),
    "kpi.overview.orders.active_members_30d": ("30天活跃会员", "Active (30 days)"),
    "kpi.overview.orders.orders": ("会员订单", "Member orders"),
    "kpi.overview.orders.spend_fen": ("会员消费", "Member spend"),
    "kpi.overview.orders.buyers": ("下单会员", "Buyers"),
    "kpi.overview.orders.repurchase_rate": ("复购率", "Repurchase rate"),
    "kpi.tiers.in_grace": ("保级宽限期会员", "Members in grace"),
    "kpi.tiers.movements.up": ("升级", "Moved up"),
    "kpi.tiers.movements.down": ("降级", "Moved down"),
    "kpi.tiers.movements.kept": ("保持", "Kept"),
    "kpi.points.liability.outstanding_points": ("未使用积分", "Outstanding points"),
    "kpi.points.liability.outstanding_fen": ("未使用积分价值", "Outstanding value"),
    "kpi.points.liability.pending_points": ("待生效积分", "Pending points"),
    "kpi.points.liability.pending_fen": ("待生效积分价值", "Pending value"),
    "kpi.points.liability.expiring_30d_points": ("30天内到期积分", "Expiring in 30 days"),
    "kpi.points.liability.expiring_30d_fen": ("30天内到期价值", "Expiring value"),
    "kpi.referral.invites": ("邀请", "Invites"),
    "kpi.referral.accepted": ("接受邀请", "Accepted"),
    "kpi.referral.first_orders": ("首单", "First orders"),
    "kpi.referral.inviters": ("邀请人", "Inviters"),
    "kpi.referral.fission_ratio": ("裂变系数", "Fission ratio"),
    "kpi.referral.abuse_refusals": ("拦截作弊", "Abuse refusals"),
    "chart.overview.new-by-day": ("每日新增会员", "New members per day"),
    "chart.overview.new-by-channel": ("新增会员渠道", "New members by channel"),
    "chart.overview.new-by-store": ("新增会员门店", "New members by store"),
    "chart.overview.orders-by-day": ("每日会员订单与消费", "Member orders and spend per day"),
    "chart.overview.orders-by-store": ("门店会员订单与消费", "Member orders and spend by store"),
    "chart.tiers.distribution": ("等级分布", "Tier distribution"),
    "chart.tiers.flows": ("上次重算以来的等级流动", "Moves since the last recompute"),
    "chart.tiers.moves-by-day": ("每日升降级", "Up / down per day"),
    "chart.tiers.projections": ("等级预测", "What it takes, per tier"),
    "chart.segments.rfm": ("RFM 热力图（R×F）", "RFM heatmap (R×F)"),
    "chart.segments.segments": ("分群人数", "Members per segment"),
    "chart.lifecycle.stages": ("生命周期阶段", "Lifecycle stages"),
    "chart.lifecycle.transitions": ("阶段流转（按天）", "Stage transitions per day"),
    "chart.points.points-by-day": (
        "每日积分获得 / 使用 / 过期",
        "Points earned / spent / expired per day",
    ),
    "chart.coupons.funnel": (
        "模板漏斗：发放→锁定→核销→过期",
        "Per template: issued → locked → redeemed → expired",
    ),
    "chart.coupons.rate-by-day": ("核销率（按发放日）", "Redemption rate by issue day"),
    "chart.coupons.by-store": ("门店核销", "Redemptions by store"),
    "chart.referral.top-inviters": ("邀请排行", "Top inviters"),
    "chart.referral.refusals": ("作弊拦截原因", "Abuse refusals by reason"),
    "chart.journeys.journey": ("旅程 {journey}：各步骤漏斗", "Journey {journey}: funnel per step"),
}


# The API's field names as chart legends (charts carry the API's names and numbers).
SERIES: dict[str, tuple[str, str]] = {
    "count": ("人数", "Members"),
    "members": ("人数", "Members"),
    "orders": ("订单数", "Orders"),
    "spend_fen": ("消费（元）", "Spend (yuan)"),
    "up": ("升级", "Up"),
    "down": ("降级", "Down"),
    "at_risk": ("有降级风险", "At risk"),
    "near_next": ("接近升级", "Near next tier"),
    "avg_spend_fen": ("平均消费（元）", "Average spend (yuan)"),
    "earned": ("获得", "Earned"),
    "spent": ("使用", "Spent"),
    "expired": ("过期", "Expired"),
    "issued": ("发放", "Issued"),
    "locked": ("锁定", "Locked"),
    "redeemed": ("核销", "Redeemed"),
    "redemption_rate": ("核销率", "Redemption rate"),
    "discount_fen": ("优惠金额（元）", "Discount (yuan)"),
    "accepted": ("接受邀请", "Accepted"),
    "first_orders": ("首单", "First orders"),
    "entered": ("进入", "Entered"),
    "converted": ("转化", "Converted"),
    "sent.pending": ("待发送", "Sent: pending"),
    "sent.sending": ("发送中", "Sent: sending"),
    "sent.delivered": ("已送达", "Sent: delivered"),
    "sent.failed": ("发送失败", "Sent: failed"),
    "sent.capped": ("频控拦截", "Sent: capped"),
    "sent.suppressed": ("已屏蔽", "Sent: suppressed"),
    "sent.dropped": ("已丢弃", "Sent: dropped"),
    "sent.no_credit": ("额度不足", "Sent: no credit"),
    "sent.unknown": ("状态未知", "Sent: unknown"),
}


# Codes the API answers with, shown as words; the page keeps the code in data
# attributes (data-chart, data-code) for tests and scripts. A code not listed
# (a brand's own tier, a new channel) is shown as it comes.
CODES: dict[str, dict[str, tuple[str, str]]] = {
    # services/tiering/seed.py: the demo brand's ladders.
    "tier": {
        "regular": ("普通会员", "Regular"),
        "svip": ("SVIP", "SVIP"),
        "vip": ("VIP", "VIP"),
        "explorer": ("探索者", "Explorer"),
        "advanced": ("进阶者", "Advanced"),
        "expert": ("达人", "Expert"),
        "member": ("会员", "Member"),
        "none": ("无等级", "No tier"),
    },
    # services/tiering/segments.py.
    "segment": {
        "champions": ("重要价值会员", "Champions"),
        "new": ("新客", "New"),
        "loyal": ("忠诚会员", "Loyal"),
        "potential": ("潜力会员", "Potential"),
        "cant_lose": ("重要挽留会员", "Can't lose"),
        "at_risk": ("流失风险会员", "At risk"),
        "hibernating": ("沉睡会员", "Hibernating"),
        "lost": ("已流失", "Lost"),
        "prospect": ("未购会员", "Prospect"),
        "high_value_core": ("高价值核心", "High-value core"),
        "potential_nurture": ("潜力培育", "Potential, to nurture"),
        "dormant": ("沉睡", "Dormant"),
    },
    "stage": {
        "new": ("新会员", "New"),
        "growing": ("成长期", "Growing"),
        "active": ("活跃", "Active"),
        "silent": ("沉默", "Silent"),
        "churned": ("流失", "Churned"),
    },
    # Acquisition channels (servicekit/demo.py) and message channels (engagement).
    "channel": {
        "mini-program": ("小程序", "Mini program"),
        "mini_program": ("小程序", "Mini program"),
        "pos": ("门店收银", "Store till"),
        "wecom": ("企业微信", "WeCom"),
        "delivery": ("外卖平台", "Delivery"),
        "sms": ("短信", "SMS"),
        "app_push": ("App 推送", "App push"),
        "unknown": ("未知", "Unknown"),
    },
    "send_status": {
        "pending": ("待发送", "Pending"),
        "sending": ("发送中", "Sending"),
        "delivered": ("已送达", "Delivered"),
        "failed": ("发送失败", "Failed"),
        "capped": ("频控拦截", "Capped"),
        "suppressed": ("已屏蔽", "Suppressed"),
        "dropped": ("已丢弃", "Dropped"),
        "no_credit": ("额度不足", "No credit"),
        "unknown": ("状态未知", "Unknown"),
    },
    # Coupon templates' and journeys' statuses (rewards coupons/domain.Status;
    # engagement's journey status).
    "status": {
        "draft": ("草稿", "Draft"),
        "active": ("进行中", "Active"),
        "paused": ("已暂停", "Paused"),
        "ended": ("已结束", "Ended"),
    },
    # services/rewards/referral: abuse at acceptance, refused reward parts.
    "refusal": {
        "SELF_REFERRAL": ("自己邀请自己", "Self referral"),
        "REFERRAL_CYCLE": ("循环邀请", "Referral cycle"),
        "FINGERPRINT_ALREADY_USED": ("设备或标识已被使用", "Device or identifier already used"),
        "INVITEE_ALREADY_MEMBER": ("被邀请人已是会员", "Invitee already a member"),
        "INVITER_REWARD_CAP_REACHED": ("邀请人奖励已达上限", "Inviter's reward cap reached"),
        "OUT_OF_STOCK": ("券库存不足", "Coupon out of stock"),
    },
    # console/roles.py.
    "role": {
        "viewer": ("查看者", "Viewer"),
        "marketer": ("营销", "Marketer"),
        "member_admin": ("会员管理员", "Member admin"),
        "pii_reader": ("敏感信息查看者", "PII reader"),
    },
}


def series_labels(locale: str) -> dict[str, str]:
    return {k: (v[1] if locale == "en" else v[0]) for k, v in SERIES.items()}


def code_labels(locale: str) -> dict[str, dict[str, str]]:
    """Every kind of code -> code -> its word in this locale (for console.js)."""
    return {
        kind: {code: (v[1] if locale == "en" else v[0]) for code, v in words.items()}
        for kind, words in CODES.items()
    }


def word(locale: str, kind: str, code: str) -> str:
    """A code as a word of this locale; the code itself when not listed."""
    texts = CODES.get(kind, {}).get(code)
    if texts is None:
        return code
    return texts[1] if locale == "en" else texts[0]


def translate(locale: str, key: str, **args: str) -> str:
    """The key's text in this locale ({name} places filled from args); a
    missing key shows as itself (and fails tests/unit/test_console_i18n.py)."""
    texts = CATALOGUE.get(key)
    if texts is None:
        return key
    text = texts[1] if locale == "en" else texts[0]
    return text.format(**args) if args else text


def yuan(fen: int | float | None) -> str:
    """1800 fen -> "¥18.00" (exact: Decimal, never float arithmetic)."""
    if fen is None:
        return "—"
    return f"¥{(Decimal(int(fen)) / 100).quantize(Decimal('0.01')):,}"


def fen_from_yuan(text: str) -> int:
    """ "18.5" -> 1850; refuses more than two decimals."""
    value = Decimal(text.strip())
    fen = value * 100
    if fen != fen.to_integral_value():
        raise ValueError(f"{text!r}: at most two decimals")
    return int(fen)
