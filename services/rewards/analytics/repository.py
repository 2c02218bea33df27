"""The dashboards' aggregates over rewards' tables, each one SQL statement
answering JSON built by PostgreSQL (no member rows leave the database). What
each number means: servicekit/metrics_definitions.py; the range is a
servicekit.analytics.DayRange. Parameters common to every statement:
$1 range start, $2 range end (exclusive), $3 by_store, $4 store ids,
$5 time zone, $6 first day, $7 last day."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from servicekit.analytics import DayRange

# Per-day series cover every day of the range: generate_series, joined.
_DAYS = "(SELECT g::date AS day FROM generate_series($6::date, $7::date, '1 day') g)"
_STORE = "(NOT $3::boolean OR {col} = ANY($4::text[]))"
# A member's store for the dashboards (servicekit/metrics_definitions.py
# MEMBER_STORE), over a rewards.member_stores row aliased ms: the registration
# store, else the latest settled order's (migration 0019).
MEMBER_STORE_SQL = "coalesce(ms.registration_store_id, ms.order_store_id)"
# Per-member figures: the member's store is one of the filter's.
_MEMBER = (
    "(NOT $3::boolean OR {col} IN (SELECT ms.member_id FROM rewards.member_stores ms"
    f" WHERE {MEMBER_STORE_SQL} = ANY($4::text[])))"
)

_ORDERS = f"""
WITH o AS (
    SELECT member_id, store_id, paid_amount_fen, ordered_at,
           (ordered_at AT TIME ZONE $5)::date AS day
    FROM rewards.orders
    WHERE status = 'settled' AND ordered_at >= $8 AND ordered_at < $2
      AND {_STORE.format(col="store_id")}
),
r AS (SELECT * FROM o WHERE ordered_at >= $1),
per_member AS (SELECT member_id, count(*) AS n FROM r GROUP BY member_id)
SELECT json_build_object(
    'orders', (SELECT count(*) FROM r),
    'spend_fen', (SELECT coalesce(sum(paid_amount_fen), 0) FROM r),
    'buyers', (SELECT count(*) FROM per_member),
    'repeat_buyers', (SELECT count(*) FROM per_member WHERE n >= 2),
    'active_members_30d', (SELECT count(DISTINCT member_id) FROM o WHERE ordered_at >= $9),
    'by_day', (SELECT json_agg(json_build_object('day', d.day, 'orders', coalesce(x.orders, 0),
                                                 'spend_fen', coalesce(x.spend_fen, 0))
                               ORDER BY d.day)
               FROM {_DAYS} d
               LEFT JOIN (SELECT day, count(*) AS orders, sum(paid_amount_fen) AS spend_fen
                          FROM r GROUP BY day) x ON x.day = d.day),
    'by_store', (SELECT coalesce(json_agg(json_build_object('store_id', store_id,
                        'orders', orders, 'spend_fen', spend_fen)
                        ORDER BY spend_fen DESC, store_id), '[]')
                 FROM (SELECT store_id, count(*) AS orders, sum(paid_amount_fen) AS spend_fen
                       FROM r GROUP BY store_id) s)
)
"""


def _window(r: DayRange) -> tuple[Any, ...]:
    return (r.start, r.end, r.by_store, r.store_ids or [], r.time_zone, r.first, r.last)


async def _json(conn: asyncpg.Connection, sql: str, *args: Any) -> dict[str, Any]:
    value = await conn.fetchval(sql, *args)
    return json.loads(value)  # type: ignore[no-any-return]


async def order_analytics(conn: asyncpg.Connection, r: DayRange) -> dict[str, Any]:
    # Active members look back 30 days from the range's end, maybe before its start.
    active_from = r.end - timedelta(days=30)
    out = await _json(conn, _ORDERS, *_window(r), min(r.start, active_from), active_from)
    out["by_day"] = out["by_day"] or []
    return out


# Earned = earn transactions; spent = redemptions and posted holds; expired =
# expiry transactions. A transaction of an order counts on the order's day (an
# offline order's points are written when it is uploaded, its business day is
# the order's) and under the order's store; any other (actions, referral
# rewards, expiries) on its own day and under its member's store, as do the
# balances and lots of the liability.
_POINTS = f"""
WITH t AS (
    SELECT t.kind, t.amount, (o.ordered_at AT TIME ZONE $5)::date AS day
    FROM rewards.orders o JOIN rewards.points_transactions t ON t.order_id = o.id
    WHERE o.ordered_at >= $1 AND o.ordered_at < $2
      AND t.kind IN ('earn', 'redeem', 'hold_post')
      AND {_STORE.format(col="o.store_id")}
    UNION ALL
    SELECT t.kind, t.amount, (t.created_at AT TIME ZONE $5)::date
    FROM rewards.points_transactions t
    WHERE t.created_at >= $1 AND t.created_at < $2 AND t.order_id IS NULL
      AND t.kind IN ('earn', 'redeem', 'hold_post', 'expire')
      AND {_MEMBER.format(col="t.member_id")}
),
per_day AS (
    SELECT d.day,
           coalesce(sum(t.amount) FILTER (WHERE t.kind = 'earn'), 0) AS earned,
           coalesce(sum(t.amount) FILTER (WHERE t.kind IN ('redeem', 'hold_post')), 0) AS spent,
           coalesce(sum(t.amount) FILTER (WHERE t.kind = 'expire'), 0) AS expired
    FROM {_DAYS} d LEFT JOIN t ON t.day = d.day
    GROUP BY d.day
)
SELECT json_build_object(
    'outstanding_points', (SELECT coalesce(sum(available + held), 0)
                           FROM rewards.points_balances b
                           WHERE {_MEMBER.format(col="b.member_id")}),
    'pending_points', (SELECT coalesce(sum(pending), 0) FROM rewards.points_balances b
                       WHERE {_MEMBER.format(col="b.member_id")}),
    'expiring_30d_points', (SELECT coalesce(sum(remaining), 0) FROM rewards.points_lots l
                            WHERE status = 'active' AND remaining > 0
                              AND expires_at > $8 AND expires_at <= $9
                              AND {_MEMBER.format(col="l.member_id")}),
    'by_day', (SELECT json_agg(json_build_object('day', day, 'earned', earned, 'spent', spent,
                                                 'expired', expired) ORDER BY day)
               FROM per_day)
)
"""

EXPIRING_DAYS = 30


async def points_analytics(conn: asyncpg.Connection, r: DayRange, now: datetime) -> dict[str, Any]:
    return await _json(conn, _POINTS, *_window(r), now, now + timedelta(days=EXPIRING_DAYS))


# A coupon's state now: a lapsed lock reads as available, an unused coupon past
# its validity as expired (as the wallet shows it, coupons/repository.py).
_COUPONS = f"""
WITH c AS (
    SELECT c.template_id, c.discount_fen, c.order_id, c.redeemed_at,
           (c.issued_at AT TIME ZONE $5)::date AS day,
           CASE WHEN c.status IN ('available', 'locked') AND c.expires_at <= $8 THEN 'expired'
                WHEN c.status = 'locked' AND c.locked_until <= $8 THEN 'available'
                ELSE c.status END AS state
    FROM rewards.coupons c
    WHERE c.issued_at >= $1 AND c.issued_at < $2 AND {_MEMBER.format(col="c.member_id")}
),
per_template AS (
    SELECT template_id, count(*) AS issued,
           count(*) FILTER (WHERE state = 'locked') AS locked,
           count(*) FILTER (WHERE state = 'used') AS redeemed,
           count(*) FILTER (WHERE state = 'expired') AS expired,
           coalesce(sum(discount_fen) FILTER (WHERE state = 'used'), 0) AS discount_fen
    FROM c GROUP BY template_id
),
per_day AS (
    SELECT d.day, count(c.day) AS issued, count(*) FILTER (WHERE c.state = 'used') AS redeemed
    FROM {_DAYS} d LEFT JOIN c ON c.day = d.day GROUP BY d.day
),
used AS (
    SELECT o.store_id, c.discount_fen
    FROM rewards.coupons c JOIN rewards.orders o ON o.id = c.order_id
    WHERE c.status = 'used' AND c.redeemed_at >= $1 AND c.redeemed_at < $2
      AND {_STORE.format(col="o.store_id")}
)
SELECT json_build_object(
    'templates', (SELECT coalesce(json_agg(json_build_object(
                      'template_id', p.template_id, 'name', coalesce(t.name, p.template_id),
                      'issued', p.issued, 'locked', p.locked, 'redeemed', p.redeemed,
                      'expired', p.expired, 'discount_fen', p.discount_fen)
                      ORDER BY p.issued DESC, p.template_id), '[]')
                  FROM per_template p
                  LEFT JOIN rewards.coupon_templates t ON t.template_id = p.template_id),
    'by_day', (SELECT json_agg(json_build_object('day', day, 'issued', issued,
                                                 'redeemed', redeemed) ORDER BY day)
               FROM per_day),
    'by_store', (SELECT coalesce(json_agg(json_build_object('store_id', store_id,
                        'redeemed', redeemed, 'discount_fen', discount_fen)
                        ORDER BY redeemed DESC, store_id), '[]')
                 FROM (SELECT store_id, count(*) AS redeemed,
                              coalesce(sum(discount_fen), 0) AS discount_fen
                       FROM used GROUP BY store_id) s)
)
"""


async def coupon_analytics(conn: asyncpg.Connection, r: DayRange, now: datetime) -> dict[str, Any]:
    return await _json(conn, _COUPONS, *_window(r), now)


TOP_INVITERS = 10

_REFERRAL = f"""
WITH acc AS (
    SELECT inviter_id, invitee_id, first_order_id
    FROM rewards.referrals WHERE accepted_at >= $1 AND accepted_at < $2
      AND {_MEMBER.format(col="inviter_id")}
),
inv AS (
    SELECT inviter_id, count(*) AS accepted, count(first_order_id) AS first_orders
    FROM acc GROUP BY inviter_id
),
refused AS (
    SELECT code FROM rewards.referral_refusals WHERE refused_at >= $1 AND refused_at < $2
      AND {_MEMBER.format(col="inviter_id")}
    UNION ALL
    SELECT e.value ->> 'code'
    FROM rewards.referral_rewards w JOIN rewards.referrals f ON f.id = w.referral_id,
         jsonb_array_elements(w.refusals) e
    WHERE w.created_at >= $1 AND w.created_at < $2 AND w.status IN ('refused', 'partial')
      AND {_MEMBER.format(col="f.inviter_id")}
)
SELECT json_build_object(
    'invites', (SELECT count(*) FROM rewards.invite_codes i
                WHERE created_at >= $1 AND created_at < $2
                  AND {_MEMBER.format(col="i.member_id")}),
    'accepted', (SELECT count(*) FROM acc),
    'first_orders', (SELECT count(first_order_id) FROM acc),
    'inviters', (SELECT count(*) FROM inv),
    'top_inviters', (SELECT coalesce(json_agg(json_build_object('member_id', inviter_id,
                         'accepted', accepted, 'first_orders', first_orders)
                         ORDER BY accepted DESC, first_orders DESC, inviter_id), '[]')
                     FROM (SELECT * FROM inv ORDER BY accepted DESC, first_orders DESC,
                           inviter_id LIMIT {TOP_INVITERS}) t),
    'abuse_refusals', (SELECT count(*) FROM refused),
    'refusals_by_reason', (SELECT coalesce(json_agg(json_build_object('key', code,
                               'count', n) ORDER BY n DESC, code), '[]')
                           FROM (SELECT code, count(*) AS n FROM refused GROUP BY code) x)
)
"""


async def referral_analytics(conn: asyncpg.Connection, r: DayRange) -> dict[str, Any]:
    # Every referral figure counts under the inviter's store.
    return await _json(conn, _REFERRAL, *_window(r)[:4])
