"""Tables of the guides schema (Alembic reads this; queries live in repository.py):
staff, the WeCom callback inbox and replay guard, customer contacts and who
follows them, exclusive guide bindings with history, attributed orders and
refunds, member tags and their WeCom push queue, the funnel, and the audit."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    Identity,
    Index,
    Integer,
    PrimaryKeyConstraint,
    Table,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from servicekit.tables import add_event_tables, service_metadata

SCHEMA = "guides"
metadata = service_metadata(SCHEMA)

outbox, processed_events = add_event_tables(metadata, partitioned=True)

staff = Table(
    "staff",
    metadata,
    Column("staff_id", Text, primary_key=True),  # WeCom user id
    Column("name", Text, nullable=False),
    Column("store_id", Text, nullable=False),
    Column("role", Text, nullable=False),  # guide | store_manager | operations
    Column("status", Text, nullable=False, server_default="active"),  # active | resigned
    Column("staff_code", Text, nullable=False, unique=True),
    Column("updated_by", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index(None, "store_id"),
)

# Every accepted callback, decrypted, once per event (dedup_key); processed
# after WeCom got its answer.
callback_inbox = Table(
    "callback_inbox",
    metadata,
    Column("dedup_key", Text, primary_key=True),
    Column("event", Text, nullable=False),
    Column("change_type", Text, nullable=False),
    Column("message", Text, nullable=False),
    Column("status", Text, nullable=False, server_default="pending"),  # pending|done|failed|ignored
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=False, server_default=""),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index(
        "ix_callback_inbox_pending", "next_attempt_at", postgresql_where=text("status = 'pending'")
    ),
)

# Signatures of accepted callbacks, so a replayed request does nothing; kept a
# little longer than the age limit (older ones are refused as too old anyway).
callback_signatures = Table(
    "callback_signatures",
    metadata,
    Column("msg_signature", Text, primary_key=True),
    Column("seen_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index(None, "seen_at"),
)

contacts = Table(
    "contacts",
    metadata,
    Column("external_userid", Text, primary_key=True),
    Column("member_id", Uuid, nullable=False, index=True),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# Which staff member has the customer as a WeCom contact (for transfers and tag pushes).
contact_links = Table(
    "contact_links",
    metadata,
    Column("external_userid", Text, nullable=False),
    Column("staff_id", Text, nullable=False, index=True),
    Column("added_at", DateTime(timezone=True), nullable=False),
    Column("removed_at", DateTime(timezone=True)),
    PrimaryKeyConstraint("external_userid", "staff_id"),
)

bindings = Table(
    "bindings",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    Column("staff_id", Text, nullable=False, index=True),
    Column("store_id", Text, nullable=False),
    Column("bound_at", DateTime(timezone=True), nullable=False),
)

binding_history = Table(
    "binding_history",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("member_id", Uuid, nullable=False, index=True),
    Column("from_staff_id", Text, nullable=False),
    Column("to_staff_id", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("changed_at", DateTime(timezone=True), nullable=False),
)

orders = Table(
    "orders",
    metadata,
    Column("order_id", Uuid, primary_key=True),
    Column("member_id", Uuid, nullable=False),
    Column("store_id", Text, nullable=False),
    Column("channel", Text, nullable=False),
    Column("paid_amount_fen", BigInteger, nullable=False),
    Column("refunded_amount_fen", BigInteger, nullable=False, server_default="0"),
    Column("ordered_at", DateTime(timezone=True), nullable=False),
    Column("categories", JSONB, nullable=False),  # [[category, quantity], ...]
    # Attribution: empty staff_id / rule when nobody gets the order.
    Column("staff_id", Text, nullable=False),
    Column("attributed_store_id", Text, nullable=False),
    Column("rule", Text, nullable=False),
    Column("day", Date, nullable=False),
    Index(None, "member_id", "ordered_at"),
    Index("ix_orders_attributed_day", "day", "staff_id", postgresql_where=text("staff_id <> ''")),
)

refunds = Table(
    "refunds",
    metadata,
    Column("refund_id", Uuid, primary_key=True),
    Column("order_id", Uuid, nullable=False),
    Column("amount_fen", BigInteger, nullable=False),
    Column("refunded_at", DateTime(timezone=True), nullable=False),
)

member_tags = Table(
    "member_tags",
    metadata,
    Column("member_id", Uuid, nullable=False),
    Column("tag", Text, nullable=False),
    Column("source", Text, nullable=False),  # manual | rule | journey
    Column("set_by", Text, nullable=False),
    Column("set_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("member_id", "tag", "source"),
)

# Tag changes still to mark on the member's WeCom contacts.
tag_pushes = Table(
    "tag_pushes",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("member_id", Uuid, nullable=False),
    Column("added", ARRAY(Text), nullable=False),
    Column("removed", ARRAY(Text), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("done_at", DateTime(timezone=True)),
    # A failed push waits (exponential back-off) until then; after
    # CALLBACK_MAX_ATTEMPTS it is abandoned until `repush-tags` requeues it.
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("ix_tag_pushes_pending", "id", postgresql_where=text("done_at IS NULL")),
    Index("ix_tag_pushes_due", "next_attempt_at", postgresql_where=text("done_at IS NULL")),
)

# One row per member: when they reached each stage of the private-domain funnel.
funnel = Table(
    "funnel",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    Column("registered_at", DateTime(timezone=True)),
    Column("channel", Text, nullable=False, server_default=""),
    Column("wecom_added_at", DateTime(timezone=True)),
    Column("first_staff_id", Text, nullable=False, server_default=""),
    Column("first_store_id", Text, nullable=False, server_default=""),
    Column("first_order_id", Uuid),
    Column("first_order_at", DateTime(timezone=True)),
    Column("repurchased_at", DateTime(timezone=True)),
)

audit = Table(
    "audit",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("actor", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("detail", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Index(None, "subject"),
)

# Notes a guide keeps on a member (the workstation).
notes = Table(
    "notes",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("member_id", Uuid, nullable=False, index=True),
    Column("staff_id", Text, nullable=False),
    Column("text", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# Coupon budgets per guide and per store and month; `used` never exceeds
# `coupons` (the CHECK backs the conditional UPDATE that reserves).
budgets = Table(
    "budgets",
    metadata,
    Column("scope", Text, nullable=False),  # staff | store
    Column("owner_id", Text, nullable=False),
    Column("month", Text, nullable=False),  # YYYY-MM, brand time
    Column("coupons", Integer, nullable=False),
    Column("used", Integer, nullable=False, server_default="0"),
    PrimaryKeyConstraint("scope", "owner_id", "month"),
    CheckConstraint("used >= 0 AND used <= coupons", name="within"),
)

# One row per grant key: reserved (budget taken), issued, or released (given back).
grants = Table(
    "grants",
    metadata,
    Column("grant_key", Text, primary_key=True),  # staff id + ":" + the caller's key
    Column("staff_id", Text, nullable=False),
    Column("store_id", Text, nullable=False),
    Column("member_id", Uuid, nullable=False),
    Column("template_id", Text, nullable=False),
    Column("month", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("coupon_id", Text, nullable=False, server_default=""),
    Column("coupon_code", Text, nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# Community group chats (WeCom customer groups) operators defined, by store and audience.
communities = Table(
    "communities",
    metadata,
    Column("chat_id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("store_id", Text, nullable=False, index=True),
    Column("audience", Text, nullable=False),  # vip | growth | general
    Column("tiers", ARRAY(Text), nullable=False),  # empty: every member of the store
    Column("updated_by", Text, nullable=False),
)

# Who is in each group chat, as the last sync saw it; left_at set when gone.
community_members = Table(
    "community_members",
    metadata,
    Column("chat_id", Text, nullable=False),
    Column("external_userid", Text, nullable=False),
    Column("joined_at", DateTime(timezone=True), nullable=False),
    Column("left_at", DateTime(timezone=True)),
    PrimaryKeyConstraint("chat_id", "external_userid"),
)

# The member's tier, from tiering's TierChanged (a community's audience rule).
member_tiers = Table(
    "member_tiers",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    Column("tier", Text, nullable=False),
)

# Guide tasks from journeys: one WeCom message task per guide, journey step
# and day, gathering that day's members; tracked per customer to completion.
guide_tasks = Table(
    "guide_tasks",
    metadata,
    Column("task_id", Uuid, primary_key=True),
    Column("staff_id", Text, nullable=False),
    Column("journey_id", Text, nullable=False),
    Column("step_id", Text, nullable=False),
    Column("day", Date, nullable=False),
    Column("title", Text, nullable=False),
    Column("script", Text, nullable=False),
    Column("status", Text, nullable=False),  # open | sent | done | failed | expired
    Column("msgid", Text, nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Sending: tries so far, when the next may run, WeCom's last error and code.
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("last_error", Text, nullable=False, server_default=""),
    Column("error_code", Text, nullable=False, server_default=""),
    Column("sent_at", DateTime(timezone=True)),  # expires TASK_LIFE_HOURS after
    Index("ix_guide_tasks_status_created_at", "status", "created_at"),
    Index(
        "uq_guide_tasks_open",
        "staff_id",
        "journey_id",
        "step_id",
        "day",
        unique=True,
        postgresql_where=text("status = 'open'"),
    ),
    Index(None, "staff_id", "status"),
)

task_targets = Table(
    "task_targets",
    metadata,
    Column("task_id", Uuid, nullable=False),
    Column("member_id", Uuid, nullable=False),
    Column("external_userid", Text, nullable=False),
    # pending | sent | not_contact | failed
    Column("status", Text, nullable=False, server_default="pending"),
    PrimaryKeyConstraint("task_id", "member_id"),
)

# When each scheduled job last ran (any replica or CronJob): the rule-tag
# batch's timer skips a period another runner already covered (tag_batch.py).
job_runs = Table(
    "job_runs",
    metadata,
    Column("job", Text, primary_key=True),
    Column("last_run_at", DateTime(timezone=True), nullable=False),
)

# A resigned staff member's customer handed to a takeover: WeCom's errcode 0
# only starts a 24-hour takeover, so the binding moves when transfer_result
# says 1 (done); 3 (customer refused) and 4 (takeover at its limit), or a
# transfer_fail callback, settle it refused (the old binding stays).
resigned_transfers = Table(
    "resigned_transfers",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("handover_staff_id", Text, nullable=False),
    Column("takeover_staff_id", Text, nullable=False),
    Column("external_userid", Text, nullable=False),
    Column("member_id", Uuid, nullable=False),
    Column("status", Text, nullable=False, server_default="pending"),  # pending | done | refused
    Column("wecom_status", Integer, nullable=False, server_default="0"),
    Column("reason", Text, nullable=False, server_default=""),
    Column("actor", Text, nullable=False),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    Column("settled_at", DateTime(timezone=True)),
    Index(
        "uq_resigned_transfers_pending",
        "handover_staff_id",
        "external_userid",
        unique=True,
        postgresql_where=text("status = 'pending'"),
    ),
)

# What a OneID merge moved from the absorbed member to the survivor, so the
# unmerge moves exactly that back (not what the survivor gained since):
# contact (external_userid), order (order id), note (note id), tag
# ("source:tag", detail: set_by, set_at, whether the merge added it to the
# survivor), binding ("absorbed": its binding; "survivor": the survivor's
# binding the merge replaced, detail.staff_id "" when it had none).
merge_moves = Table(
    "merge_moves",
    metadata,
    Column("merge_id", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("ref", Text, nullable=False),
    Column("detail", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    PrimaryKeyConstraint("merge_id", "kind", "ref"),
)
