"""Tables of the tiering schema (Alembic reads this; queries live in repository.py)."""

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
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from servicekit.tables import add_event_tables, service_metadata

SCHEMA = "tiering"
metadata = service_metadata(SCHEMA)

# One row per programme version. A new version takes over from its
# effective_from; older versions stay untouched so past evaluations can be
# explained with the rules that applied then.
tier_programmes = Table(
    "tier_programmes",
    metadata,
    Column("programme_id", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("effective_from", DateTime(timezone=True), nullable=False),
    Column("qualifying_metric", Text, nullable=False),
    Column("window_months", Integer, nullable=False),
    # Ordered tiers: [{code, name, threshold, benefits: {...}}]; validated by domain.parse_ladder.
    Column("ladder", JSONB, nullable=False),
    # Period, downgrade rule, grace, growth awards, RFM/lifecycle settings;
    # validated by domain.parse_rules. '{}' (rows from before rules existed) = defaults.
    Column("rules", JSONB, nullable=False, server_default="{}"),
    Column("note", Text, nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("programme_id", "version"),
    CheckConstraint(
        "qualifying_metric IN ('growth_value', 'paid_spend', 'order_count')",
        name="qualifying_metric",
    ),
    CheckConstraint("version >= 1", name="version_positive"),
    CheckConstraint("window_months BETWEEN 1 AND 36", name="window_months"),
    CheckConstraint("jsonb_typeof(ladder) = 'array'", name="ladder_is_array"),
    CheckConstraint("jsonb_typeof(rules) = 'object'", name="rules_is_object"),
)

# Kept by the OrderCompleted consumer; lifetime totals per member.
member_spend = Table(
    "member_spend",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    Column("total_paid_fen", BigInteger, nullable=False, server_default="0"),
    Column("order_count", BigInteger, nullable=False, server_default="0"),
    Column("last_order_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("total_paid_fen >= 0", name="total_paid_fen_non_negative"),
    CheckConstraint("order_count >= 0", name="order_count_non_negative"),
)


# Completed orders as tiering counts them: the facts every metric is summed from.
# refunded_fen grows with OrderRefunded; growth is what the order still carries.
# merged_from: the member the row belonged to before a merge moved it (unmerge
# moves it back).
# Global uniqueness of an order id and the route from it to the partition
# holding the order: orders is partitioned by time and PostgreSQL's unique
# indexes on a partitioned table must contain the partition key. The BEFORE
# INSERT trigger on orders (claim_order_keys) writes this row in the same
# statement and skips an order whose id is here already (migration 0011). A
# detached partition's keys are deleted with it (services/tiering/partitions.py).
order_keys = Table(
    "order_keys",
    metadata,
    Column("order_id", Text, primary_key=True),
    # The order's ordered_at: which partition holds it.
    Column("ordered_at", DateTime(timezone=True), nullable=False, index=True),
)

# Partitioned by month of ordered_at (migration 0011; partitions made ahead by
# `python -m services.tiering partitions ensure`, detached only past
# TIERING_ORDERS_RETENTION_MONTHS and every stored programme's windows).
orders = Table(
    "orders",
    metadata,
    # Unique across partitions through order_keys.
    Column("order_id", Text, primary_key=True),
    # NULL once the member is erased: the order still counts in totals, for no one.
    Column("member_id", Uuid),
    # The partition key (with order_id, the primary key: PostgreSQL requires it there).
    Column("ordered_at", DateTime(timezone=True), primary_key=True, nullable=False),
    Column("paid_fen", BigInteger, nullable=False),
    Column("refunded_fen", BigInteger, nullable=False, server_default="0"),
    Column("growth", BigInteger, nullable=False, server_default="0"),
    Column("merged_from", Uuid),
    CheckConstraint("paid_fen >= 0", name="paid_fen_non_negative"),
    CheckConstraint("refunded_fen BETWEEN 0 AND paid_fen", name="refunded_within_paid"),
    # Covering: the batch's per-range GROUP BY is an index-only scan (migration 0005).
    Index(
        "ix_orders_member_time_amounts",
        "member_id",
        "ordered_at",
        postgresql_include=["paid_fen", "refunded_fen"],
    ),
    postgresql_partition_by="RANGE (ordered_at)",
)

# Growth value (成长值) ledger, separate from spendable points: one row per award
# or reversal; (kind, ref) makes every source idempotent. A refund reversal is
# dated at the order it undoes (occurred_at), so the metric drops retroactively.
growth_ledger = Table(
    "growth_ledger",
    metadata,
    Column("entry_id", BigInteger, Identity(always=False), primary_key=True),
    # NULL once the member is erased (see orders).
    Column("member_id", Uuid),
    Column("kind", Text, nullable=False),
    Column("ref", Text, nullable=False),
    Column("points", BigInteger, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    # Local (programme time zone) day of the action, for daily/monthly caps.
    Column("local_day", Date, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("merged_from", Uuid),
    CheckConstraint(
        "kind IN ('order', 'refund', 'check_in', 'review', 'referral')", name="kind_known"
    ),
    UniqueConstraint("kind", "ref", name="uq_growth_ledger_kind_ref"),
    Index("ix_growth_ledger_member_time", "member_id", "occurred_at"),
)

# Each member's tier state (evaluation.TierState) under the programme in force.
member_tiers = Table(
    "member_tiers",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    Column("programme_id", Text, nullable=False),
    Column("programme_version", Integer, nullable=False),
    # Effective tier (earned, raised by an active override).
    Column("tier_code", Text, nullable=False),
    Column("base_tier", Text, nullable=False),
    Column("earned_tier", Text, nullable=False),
    Column("period_start", DateTime(timezone=True), nullable=False),
    Column("period_end", DateTime(timezone=True), nullable=False),
    Column("peak", BigInteger, nullable=False),
    Column("grace_until", DateTime(timezone=True)),
    Column("override_tier", Text),
    Column("override_until", DateTime(timezone=True)),
    Column("override_reason", Text),
    Column("evaluated_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint(
        "(override_tier IS NULL) = (override_until IS NULL)", name="override_has_expiry"
    ),
    Index("ix_member_tiers_period_end", "period_end"),
)

# Every tier change (and retention/grace decision) with the figures behind it.
tier_history = Table(
    "tier_history",
    metadata,
    Column("entry_id", BigInteger, Identity(always=False), primary_key=True),
    # NULL once the member is erased (see orders); figures are emptied then.
    Column("member_id", Uuid),
    Column("from_tier", Text, nullable=False),
    Column("to_tier", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("figures", JSONB, nullable=False),
    Column("programme_id", Text, nullable=False),
    Column("programme_version", Integer, nullable=False),
    Column("changed_at", DateTime(timezone=True), nullable=False),
    Column("merged_from", Uuid),
    Index("ix_tier_history_member", "member_id", "entry_id"),
    # The tiers dashboard's range and "since the last recompute" scans (migration 0009).
    Index("ix_tier_history_changed_at", "changed_at"),
)

# RFM scores, segment and lifecycle stage, written by the batch recompute.
# Pages kept 30% free (migration 0004) so the batch's updates, which touch no
# indexed column, stay on the page (HOT): no new primary-key entry per row.
member_profiles = Table(
    "member_profiles",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    Column("registered_at", DateTime(timezone=True)),
    Column("r_score", SmallInteger),
    Column("f_score", SmallInteger),
    Column("m_score", SmallInteger),
    Column("segment", Text),
    Column("segment_group", Text),
    Column("stage", Text),
    Column("relative_tier", Text),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # From member's BirthdaySet (month and day only), for the birthday coupon.
    Column("birth_month", SmallInteger),
    Column("birth_day", SmallInteger),
    # The member's store for the dashboards' filter (metrics_definitions.MEMBER_STORE:
    # registration store, else the latest order's), migration 0012: from member's
    # MemberZoneSet, and from OrderCompleted with the order's time (only moves forward).
    Column("registration_store_id", Text),
    Column("order_store_id", Text),
    Column("order_store_at", DateTime(timezone=True)),
    postgresql_with={"fillfactor": 70},
)

# Tier benefits to issue through rewards (benefits.py): one row per upgrade gift
# (member, tier, period) and per birthday coupon (member, year); the key is
# rewards' issue key, so a retried issue replays instead of giving twice.
benefit_grants = Table(
    "benefit_grants",
    metadata,
    Column("grant_key", Text, primary_key=True),
    Column("member_id", Uuid, nullable=False),
    Column("kind", Text, nullable=False),
    Column("template_id", Text, nullable=False),
    Column("tier_code", Text, nullable=False),
    Column("status", Text, nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("coupon_id", Text),
    Column("failure", Text),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("kind IN ('upgrade_gift', 'birthday')", name="kind_known"),
    CheckConstraint("status IN ('pending', 'issued', 'failed')", name="status_known"),
    Index(
        "ix_benefit_grants_pending",
        "next_attempt_at",
        postgresql_where=text("status = 'pending'"),
    ),
)

# Lifecycle stage moves each recompute made (batch.py's profile statement, one
# row per chunk and move): the lifecycle dashboard's transitions over time.
stage_transitions = Table(
    "stage_transitions",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    # The recompute's as_of (the application's clock).
    Column("as_of", DateTime(timezone=True), nullable=False),
    Column("from_stage", Text, nullable=False),
    Column("to_stage", Text, nullable=False),
    Column("members", BigInteger, nullable=False),
    # The moved members' store (MEMBER_STORE) when the recompute ran; NULL: none
    # known (rows from before migration 0012 too).
    Column("store_id", Text),
    Index(None, "as_of"),
)

# One row per batch recompute, with the distribution it left behind.
recompute_runs = Table(
    "recompute_runs",
    metadata,
    Column("run_id", BigInteger, Identity(always=False), primary_key=True),
    Column("as_of", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("members", BigInteger, nullable=False, server_default="0"),
    Column("tier_changes", BigInteger, nullable=False, server_default="0"),
    Column("segment_changes", BigInteger, nullable=False, server_default="0"),
    Column("stage_changes", BigInteger, nullable=False, server_default="0"),
    Column("distribution", JSONB, nullable=False, server_default="{}"),
)

# The running batch recompute's per-member aggregates (batch.py), shared by its
# worker connections; UNLOGGED (no WAL), emptied at the start and end of a run.
recompute_work = Table(
    "recompute_work",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    Column("metric", BigInteger, nullable=False, server_default="0"),
    Column("last_at", DateTime(timezone=True)),
    Column("orders", BigInteger, nullable=False, server_default="0"),
    Column("spend", BigInteger),
    prefixes=["UNLOGGED"],
)

# Merges applied, with what each side held before, so an unmerge can restore it.
member_merges = Table(
    "member_merges",
    metadata,
    Column("merge_id", Text, primary_key=True),
    Column("survivor_id", Uuid, nullable=False),
    Column("absorbed_id", Uuid, nullable=False),
    Column("survivor_before", JSONB),
    Column("absorbed_before", JSONB),
    Column("merged_at", DateTime(timezone=True), nullable=False),
    Column("unmerged_at", DateTime(timezone=True)),
)

# Members erased (MemberErased): their rows are gone or anonymised, and later
# events naming them change nothing. Only the id is kept, to say "erased".
erased_members = Table(
    "erased_members",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    Column("erased_at", DateTime(timezone=True), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

outbox, processed_events = add_event_tables(metadata, partitioned=True)
