"""The one table of who may call what: HTTP route (method + template) and
POS RPC (full method name) -> the scope it needs.

Fail-closed: a route or RPC missing from this table is refused for everyone
(tests/e2e/test_gateway_scopes.py walks app.routes and the PosService
descriptor and fails on any gap). Add the entry with the route.
"""

from __future__ import annotations

from .model import (
    ADMIN_ANALYTICS,
    ADMIN_EVENTS,
    ADMIN_GUIDES,
    ADMIN_JOURNEYS,
    ADMIN_MEMBERS,
    ADMIN_REWARDS,
    ADMIN_TIERS,
    GUIDES_WORKSTATION,
    MEMBER_IDENTIFY,
    MEMBER_SELF,
    PII_READ,
    POS_CHECKOUT,
)

# Probes and the API's own description need no credentials.
PUBLIC_ROUTES: frozenset[tuple[str, str]] = frozenset(
    {
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/readyz/detail"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/docs/oauth2-redirect"),
        ("GET", "/redoc"),
        # Authenticated by the key id and secret in its body (gateway/auth/tokens.py).
        ("POST", "/v1/auth/token"),
        # WeCom's callbacks: authenticated by WeCom's own signature over the
        # encrypted body (services/guides/wecom_crypto.py), not by a client key.
        ("GET", "/v1/wecom/callback"),
        ("POST", "/v1/wecom/callback"),
        # Aliyun's SMS delivery reports: authenticated by the callback token
        # configured with the URL (SMS_RECEIPT_TOKEN, gateway/api/engagement.py).
        ("POST", "/v1/callbacks/sms/aliyun"),
    }
)

_M = "/v1/members/{member_id}"
_A = "/v1/admin"

# member:self routes carry {member_id}: a caller holding only member:self
# (the mini-program backend) must assert that member (gateway/auth/members.py).
ROUTE_SCOPES: dict[tuple[str, str], str] = {
    # ---- mini-program: the asserted member's own data
    ("GET", _M): MEMBER_SELF,
    ("GET", f"{_M}/profile"): MEMBER_SELF,
    ("PATCH", f"{_M}/profile"): MEMBER_SELF,
    ("PUT", f"{_M}/consents"): MEMBER_SELF,
    ("GET", f"{_M}/consents/history"): MEMBER_SELF,
    ("POST", f"{_M}/member-code"): MEMBER_SELF,
    ("GET", f"{_M}/points"): MEMBER_SELF,
    ("GET", f"{_M}/points/summary"): MEMBER_SELF,
    ("GET", f"{_M}/points/history"): MEMBER_SELF,
    ("GET", f"{_M}/points/expiring"): MEMBER_SELF,
    ("GET", f"{_M}/spend"): MEMBER_SELF,
    ("GET", f"{_M}/tier"): MEMBER_SELF,
    ("GET", f"{_M}/tier/history"): MEMBER_SELF,
    # The member centre page in one call: the tier and the points summary above.
    ("GET", f"{_M}/centre"): MEMBER_SELF,
    ("POST", f"{_M}/growth-actions"): MEMBER_SELF,
    ("POST", f"{_M}/events"): MEMBER_SELF,
    ("POST", f"{_M}/unsubscribe"): MEMBER_SELF,
    ("GET", f"{_M}/invite-code"): MEMBER_SELF,
    ("POST", f"{_M}/referral"): MEMBER_SELF,
    ("GET", f"{_M}/referrals"): MEMBER_SELF,
    ("POST", f"{_M}/mall/exchanges"): MEMBER_SELF,
    ("GET", f"{_M}/mall/exchanges"): MEMBER_SELF,
    ("GET", f"{_M}/coupons"): MEMBER_SELF,
    ("POST", f"{_M}/coupons"): MEMBER_SELF,
    # ---- mini-program: login / enrol (no member to assert yet)
    ("POST", "/v1/members/identify"): MEMBER_IDENTIFY,
    ("POST", "/v1/members/bind-phone"): MEMBER_IDENTIFY,
    # ---- mini-program: the mall's catalogue (no member to assert; same client)
    ("GET", "/v1/mall/items"): MEMBER_IDENTIFY,
    # ---- operators
    ("GET", f"{_A}/members/{{member_id}}/pii"): PII_READ,
    ("GET", f"{_A}/merge-reviews"): ADMIN_MEMBERS,
    ("POST", f"{_A}/merge-reviews/{{review_id}}/approve"): ADMIN_MEMBERS,
    ("POST", f"{_A}/merge-reviews/{{review_id}}/reject"): ADMIN_MEMBERS,
    ("POST", f"{_A}/members/merge"): ADMIN_MEMBERS,
    ("POST", f"{_A}/merges/{{merge_id}}/unmerge"): ADMIN_MEMBERS,
    ("POST", f"{_A}/members/{{member_id}}/erase"): ADMIN_MEMBERS,
    ("GET", f"{_A}/quarantined-identifiers"): ADMIN_MEMBERS,
    ("POST", f"{_A}/members/lookup"): ADMIN_MEMBERS,
    ("GET", f"{_A}/members/{{member_id}}/merges"): ADMIN_MEMBERS,
    ("GET", f"{_A}/velocity-flags"): ADMIN_MEMBERS,
    ("POST", f"{_A}/members/{{member_id}}/points/adjustments"): ADMIN_REWARDS,
    ("GET", f"{_A}/points/liability"): ADMIN_REWARDS,
    ("POST", f"{_A}/points/earns"): ADMIN_REWARDS,
    ("GET", f"{_A}/mall/exchanges"): ADMIN_REWARDS,
    ("POST", f"{_A}/mall/exchanges/{{exchange_id}}/ship"): ADMIN_REWARDS,
    ("GET", f"{_A}/mall/items"): ADMIN_REWARDS,
    ("POST", f"{_A}/mall/items"): ADMIN_REWARDS,
    ("PUT", f"{_A}/mall/items/{{item_id}}"): ADMIN_REWARDS,
    ("PUT", f"{_A}/mall/items/{{item_id}}/status"): ADMIN_REWARDS,
    ("GET", f"{_A}/referrals/fission"): ADMIN_REWARDS,
    ("GET", f"{_A}/coupon-templates"): ADMIN_REWARDS,
    ("POST", f"{_A}/coupon-templates"): ADMIN_REWARDS,
    ("GET", f"{_A}/coupon-templates/{{template_id}}"): ADMIN_REWARDS,
    ("POST", f"{_A}/coupon-templates/{{template_id}}/versions"): ADMIN_REWARDS,
    ("PUT", f"{_A}/coupon-templates/{{template_id}}/status"): ADMIN_REWARDS,
    ("GET", f"{_A}/coupon-templates/{{template_id}}/report"): ADMIN_REWARDS,
    ("POST", f"{_A}/coupons:issue"): ADMIN_REWARDS,
    ("POST", f"{_A}/coupon-templates/{{template_id}}/issue"): ADMIN_REWARDS,
    ("GET", f"{_A}/tier-programmes/{{programme_id}}"): ADMIN_TIERS,
    ("POST", f"{_A}/tier-programmes/{{programme_id}}/versions"): ADMIN_TIERS,
    ("POST", f"{_A}/tier-programmes/{{programme_id}}/simulations"): ADMIN_TIERS,
    ("PUT", f"{_A}/members/{{member_id}}/tier-override"): ADMIN_TIERS,
    ("DELETE", f"{_A}/members/{{member_id}}/tier-override"): ADMIN_TIERS,
    ("GET", f"{_A}/reports/tier-distribution"): ADMIN_TIERS,
    ("GET", f"{_A}/parked-events"): ADMIN_JOURNEYS,
    ("POST", f"{_A}/parked-events/{{member_id}}/replay"): ADMIN_JOURNEYS,
    ("POST", f"{_A}/parked-events/expire"): ADMIN_JOURNEYS,
    ("GET", f"{_A}/dead-letters"): ADMIN_EVENTS,
    ("POST", f"{_A}/dead-letters/redrive"): ADMIN_EVENTS,
    ("GET", f"{_A}/journeys"): ADMIN_JOURNEYS,
    ("POST", f"{_A}/journeys"): ADMIN_JOURNEYS,
    ("POST", f"{_A}/journeys/{{journey_id}}/pause"): ADMIN_JOURNEYS,
    ("POST", f"{_A}/journeys/{{journey_id}}/resume"): ADMIN_JOURNEYS,
    ("GET", f"{_A}/journeys/{{journey_id}}/metrics"): ADMIN_JOURNEYS,
    ("GET", f"{_A}/journeys/{{journey_id}}/sends"): ADMIN_JOURNEYS,
    ("GET", f"{_A}/journeys/{{journey_id}}/sends/unknown"): ADMIN_JOURNEYS,
    ("POST", f"{_A}/journeys/{{journey_id}}/launch-near-store"): ADMIN_JOURNEYS,
    # ---- rewards routes of issue 13 (money): points-plus-cash mall payments
    ("POST", f"{_M}/mall/exchanges/{{exchange_id}}/payment"): MEMBER_SELF,
    ("POST", f"{_A}/mall/exchanges/{{exchange_id}}/reverse"): ADMIN_REWARDS,
    # ... non-order actions, two-phase holds, the invitee's own referral
    ("POST", f"{_M}/points/actions"): MEMBER_SELF,
    ("POST", f"{_M}/points/holds"): MEMBER_SELF,
    ("POST", f"{_M}/points/holds/{{hold_id}}/post"): MEMBER_SELF,
    ("POST", f"{_M}/points/holds/{{hold_id}}/void"): MEMBER_SELF,
    ("GET", f"{_M}/referral"): MEMBER_SELF,
    # ... coupon revocation and template limits
    ("POST", f"{_A}/coupons/{{code}}/revoke"): ADMIN_REWARDS,
    ("PUT", f"{_A}/coupon-templates/{{template_id}}/limits"): ADMIN_REWARDS,
    # ... stores as operator-managed data
    ("GET", f"{_A}/stores"): ADMIN_REWARDS,
    ("PUT", f"{_A}/stores/{{store_id}}"): ADMIN_REWARDS,
    ("PUT", f"{_A}/stores/{{store_id}}/status"): ADMIN_REWARDS,
    # ---- guides (gateway/api/guides.py)
    ("GET", f"{_A}/staff"): ADMIN_GUIDES,
    ("POST", f"{_A}/staff:sync"): ADMIN_GUIDES,
    ("GET", f"{_A}/staff/{{staff_id}}"): ADMIN_GUIDES,
    ("PUT", f"{_A}/staff/{{staff_id}}"): ADMIN_GUIDES,
    ("POST", f"{_A}/staff/{{staff_id}}/resign"): ADMIN_GUIDES,
    ("POST", f"{_A}/staff/{{staff_id}}/guide-link"): ADMIN_GUIDES,
    ("GET", f"{_A}/members/{{member_id}}/guide"): ADMIN_GUIDES,
    ("PUT", f"{_A}/members/{{member_id}}/guide"): ADMIN_GUIDES,
    ("GET", f"{_A}/orders/{{order_id}}/attribution"): ADMIN_GUIDES,
    ("GET", f"{_A}/reports/guides-daily"): ADMIN_GUIDES,
    ("GET", f"{_A}/reports/private-domain-funnel"): ADMIN_GUIDES,
    ("GET", f"{_A}/members/{{member_id}}/tags"): ADMIN_GUIDES,
    ("PUT", f"{_A}/members/{{member_id}}/tags/{{tag}}"): ADMIN_GUIDES,
    ("DELETE", f"{_A}/members/{{member_id}}/tags/{{tag}}"): ADMIN_GUIDES,
    ("POST", f"{_A}/tags:recompute"): ADMIN_GUIDES,
    ("POST", f"{_A}/tags:repush"): ADMIN_GUIDES,
    ("PUT", f"{_A}/coupon-budgets/{{scope}}/{{owner_id}}/{{month}}"): ADMIN_GUIDES,
    ("PUT", f"{_A}/communities/{{chat_id}}"): ADMIN_GUIDES,
    ("GET", f"{_A}/communities"): ADMIN_GUIDES,
    ("POST", f"{_A}/communities:sync"): ADMIN_GUIDES,
    ("GET", f"{_A}/stores/{{store_id}}/community-gaps"): ADMIN_GUIDES,
    ("GET", f"{_A}/communities/{{chat_id}}/report"): ADMIN_GUIDES,
    # ---- the guide's workstation (the WeCom sidebar's backend)
    ("POST", "/v1/workstation/session"): GUIDES_WORKSTATION,
    ("GET", "/v1/workstation/tasks"): GUIDES_WORKSTATION,
    ("GET", "/v1/workstation/members/{member_id}"): GUIDES_WORKSTATION,
    ("PUT", "/v1/workstation/members/{member_id}/tags/{tag}"): GUIDES_WORKSTATION,
    ("DELETE", "/v1/workstation/members/{member_id}/tags/{tag}"): GUIDES_WORKSTATION,
    ("POST", "/v1/workstation/members/{member_id}/notes"): GUIDES_WORKSTATION,
    ("POST", "/v1/workstation/members/{member_id}/coupons"): GUIDES_WORKSTATION,
    # ---- operator dashboards (gateway/api/analytics.py), read-only
    ("GET", f"{_A}/analytics/overview"): ADMIN_ANALYTICS,
    ("GET", f"{_A}/analytics/tiers"): ADMIN_ANALYTICS,
    ("GET", f"{_A}/analytics/segments"): ADMIN_ANALYTICS,
    ("GET", f"{_A}/analytics/lifecycle"): ADMIN_ANALYTICS,
    ("GET", f"{_A}/analytics/points"): ADMIN_ANALYTICS,
    ("GET", f"{_A}/analytics/coupons"): ADMIN_ANALYTICS,
    ("GET", f"{_A}/analytics/referral"): ADMIN_ANALYTICS,
    ("GET", f"{_A}/analytics/journeys"): ADMIN_ANALYTICS,
}

POS_SERVICE_PREFIX = "/loyalty.pos.v1.PosService/"

# Every PosService RPC acts for the calling store only (its request's store_id).
RPC_SCOPES: dict[str, str] = {
    f"{POS_SERVICE_PREFIX}IdentifyMember": POS_CHECKOUT,
    f"{POS_SERVICE_PREFIX}PreviewCheckout": POS_CHECKOUT,
    f"{POS_SERVICE_PREFIX}LockCoupon": POS_CHECKOUT,
    f"{POS_SERVICE_PREFIX}ReleaseCoupon": POS_CHECKOUT,
    f"{POS_SERVICE_PREFIX}CompleteOrder": POS_CHECKOUT,
    f"{POS_SERVICE_PREFIX}RefundOrder": POS_CHECKOUT,
    f"{POS_SERVICE_PREFIX}UploadOfflineOrders": POS_CHECKOUT,
}


def route_scope(method: str, template: str) -> str | None:
    """The scope a route needs; None when the route is not in the table (refused)."""
    return ROUTE_SCOPES.get((method.upper(), template))


def is_public(method: str, template: str) -> bool:
    return (method.upper() if method != "HEAD" else "GET", template) in PUBLIC_ROUTES


def rpc_scope(full_method: str) -> str | None:
    return RPC_SCOPES.get(full_method)
