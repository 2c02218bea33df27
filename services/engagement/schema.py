"""Tables of the engagement schema (Alembic reads this; queries live in repository.py).

The scheduler's state is here, not in a cron job: an enrollment per member per
journey, one timer per waiting enrollment (indexed by due time, so the sweeper
only ever reads due rows), and a send row per message, keyed by a unique send
key written in the same transaction as the cap reservation.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
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
from sqlalchemy.dialects.postgresql import JSONB

from servicekit.tables import add_event_tables, service_metadata

SCHEMA = "engagement"
metadata = service_metadata(SCHEMA)

outbox, processed_events = add_event_tables(metadata, partitioned=True)


# Every published version, immutable: in-flight members keep theirs.
journeys = Table(
    "journeys",
    metadata,
    Column("journey_id", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("definition", JSONB, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("entry_event", Text, nullable=False),
    Column("published_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("journey_id", "version"),
)

# Which version new members enter, and whether the journey runs at all.
journey_state = Table(
    "journey_state",
    metadata,
    Column("journey_id", Text, primary_key=True),
    Column("live_version", Integer, nullable=False),
    Column("entry_event", Text, nullable=False, index=True),
    Column("status", Text, nullable=False),  # active | paused
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

enrollments = Table(
    "enrollments",
    metadata,
    Column("enrollment_id", Uuid, primary_key=True),
    Column("journey_id", Text, nullable=False),
    Column("version", Integer, nullable=False),
    # NULL once the member is erased (counts stay for measurement).
    Column("member_id", Uuid, index=True),
    # active | completed | exited | converted | holdout | erased | merged
    Column("status", Text, nullable=False),
    Column("grp", Text, nullable=False),  # treatment | holdout
    Column("variant", Text),
    # Steps executed so far: the send key is (enrollment, seq), stable on retry.
    Column("seq", Integer, nullable=False, server_default="0"),
    Column("waiting_step", Text),
    Column("conversion_days", Integer, nullable=False),
    Column("entered_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True)),
    Column("converted_at", DateTime(timezone=True)),
    # The entering event's attributes: the variables its message templates read.
    Column("entry_attributes", JSONB, nullable=False, server_default="{}"),
    Index(
        "uq_enrollments_live",
        "journey_id",
        "member_id",
        unique=True,
        postgresql_where=text("status = 'active'"),
    ),
    Index("ix_enrollments_journey_id", "journey_id", "version"),
    # The dashboards' range scans (servicekit/metrics_definitions.py).
    Index(None, "entered_at"),
)

# One timer per waiting enrollment: the step to run and when.
timers = Table(
    "timers",
    metadata,
    Column("enrollment_id", Uuid, primary_key=True),
    Column("journey_id", Text, nullable=False, index=True),
    Column("step_id", Text, nullable=False),
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("paused", Boolean, nullable=False, server_default="false"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    # The journey's priority: steps due together are claimed most valuable first.
    Column("priority", Integer, nullable=False, server_default="0"),
    # The working queue: only unpaused timers, by due time then priority.
    Index(
        "ix_timers_due",
        "due_at",
        text("priority DESC"),
        postgresql_where=text("NOT paused"),
    ),
)

# Global uniqueness of a send key (one send per enrollment step, in any
# month) and the route from a key to the partition holding its send: sends is
# partitioned by time and PostgreSQL's unique indexes on a partitioned table
# must contain the partition key. The BEFORE INSERT trigger on sends
# (claim_send_keys) writes this row in the same statement and skips a send
# whose key is here already (migration 0013). A detached partition's keys are
# deleted with it (services/engagement/partitions.py).
send_keys = Table(
    "send_keys",
    metadata,
    Column("send_key", Text, primary_key=True),
    # The send's created_at: which partition holds it.
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
)

# Partitioned by month of created_at (migration 0013; partitions made ahead by
# `python -m services.engagement partitions ensure`, detached past
# SENDS_RETENTION_MONTHS: docs/operations.md "Partitioned tables").
sends = Table(
    "sends",
    metadata,
    # Unique across partitions through send_keys.
    Column("send_key", Text, primary_key=True),
    Column("enrollment_id", Uuid, nullable=False),
    Column("journey_id", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("step_id", Text, nullable=False),
    Column("member_id", Uuid, index=True),
    Column("channel", Text, nullable=False),
    Column("template", Text, nullable=False),
    Column("message_class", Text, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("local_day", Date, nullable=False),
    # pending -> sending -> delivered | failed | no_credit | unknown (docs/journeys.md);
    # or capped | suppressed | dropped, decided before any provider call.
    Column("status", Text, nullable=False),
    Column("reason", Text, nullable=False, server_default=""),
    Column("variant", Text),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("provider_ref", Text),
    # The partition key (with send_key, the primary key: PostgreSQL requires it there).
    Column("created_at", DateTime(timezone=True), primary_key=True, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # The provider request's content, rendered from the step's template when written.
    Column("payload", JSONB, nullable=False, server_default="{}"),
    # The provider's own code of a failure (errcode, SMS Code, receipt err_code).
    Column("error_code", Text, nullable=False, server_default=""),
    Column("receipt_at", DateTime(timezone=True)),
    # A mini-program send: the member's credit epoch its credit was taken in.
    Column("credit_epoch", Integer),
    Index("ix_sends_in_flight", "next_attempt_at", postgresql_where=text("status = 'sending'")),
    Index(
        "ix_sends_unknown", "journey_id", "updated_at", postgresql_where=text("status = 'unknown'")
    ),
    Index("ix_sends_dispatch", "next_attempt_at", postgresql_where=text("status = 'pending'")),
    # The holder of a member's daily slot, for preemption by a more valuable send.
    Index(
        "ix_sends_holder",
        "member_id",
        "local_day",
        "message_class",
        postgresql_where=text("status = 'pending'"),
    ),
    Index("ix_sends_journey", "journey_id", "step_id", "status"),
    # The journeys dashboard joins sends to the range's enrollments.
    Index(None, "enrollment_id"),
    postgresql_partition_by="RANGE (created_at)",
)

# The day's budget per member and class, reserved with one conditional upsert.
cap_usage = Table(
    "cap_usage",
    metadata,
    Column("member_id", Uuid, nullable=False),
    Column("local_day", Date, nullable=False),
    Column("message_class", Text, nullable=False),
    Column("used", Integer, nullable=False),
    Column("cap_limit", Integer, nullable=False),
    # Slots granted by the latest reservation (set in the same statement).
    Column("last_grant", Integer, nullable=False),
    PrimaryKeyConstraint("member_id", "local_day", "message_class"),
)

# Marketing consent per channel as known here (port: services/engagement/ports.py).
consents = Table(
    "consents",
    metadata,
    Column("member_id", Uuid, nullable=False),
    Column("channel", Text, nullable=False),
    Column("granted", Boolean, nullable=False),
    Column("source", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("member_id", "channel"),
)

preferences = Table(
    "preferences",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    Column("non_personalised", Boolean, nullable=False, server_default="false"),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Mini-program one-time subscriptions: one credit per member tap, one send per credit.
subscription_credits = Table(
    "subscription_credits",
    metadata,
    Column("member_id", Uuid, nullable=False),
    Column("template", Text, nullable=False),
    Column("credits", Integer, nullable=False),
    # Bumped when WeChat says the credits are gone (43101): a pending send
    # holding a credit of an older epoch holds nothing.
    Column("epoch", Integer, nullable=False, server_default="0"),
    PrimaryKeyConstraint("member_id", "template"),
)

channel_addresses = Table(
    "channel_addresses",
    metadata,
    Column("member_id", Uuid, nullable=False),
    Column("channel", Text, nullable=False),
    Column("address", Text, nullable=False),
    PrimaryKeyConstraint("member_id", "channel"),
)

# What branches test, kept from events (no calls on the hot path).
member_facts = Table(
    "member_facts",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    # The zone quiet hours and caps use: the profile's, else the registration
    # store's, else Asia/Shanghai (member's MemberZoneSet).
    Column("tz", Text, nullable=False, server_default="Asia/Shanghai"),
    Column("profile_tz", Text, nullable=False, server_default=""),
    Column("store_id", Text, nullable=False, server_default=""),
    Column("tier", Text, nullable=False, server_default=""),
    Column("segment", Text, nullable=False, server_default=""),
    Column("stage", Text, nullable=False, server_default=""),
    Column("order_count", Integer, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # For `{nickname}` (member's NicknameSet).
    Column("nickname", Text, nullable=False, server_default=""),
    # The exclusive guide's WeCom userid (guides' GuideBound): the sender of
    # the member's 1-to-1 WeCom messages.
    Column("guide_userid", Text, nullable=False, server_default=""),
    # The store of the latest order (OrderCompleted): with store_id, the member's
    # store for the journeys dashboard (metrics_definitions.MEMBER_STORE), migration 0015.
    Column("order_store_id", Text),
)

member_tags = Table(
    "member_tags",
    metadata,
    Column("member_id", Uuid, nullable=False),
    Column("tag", Text, nullable=False),
    PrimaryKeyConstraint("member_id", "tag"),
)

# Issue-coupon and award-points steps, once each (key = enrollment:seq).
reward_requests = Table(
    "reward_requests",
    metadata,
    Column("request_key", Text, primary_key=True),
    Column("enrollment_id", Uuid, nullable=False),
    Column("member_id", Uuid),
    Column("kind", Text, nullable=False),
    Column("coupon", Text, nullable=False, server_default=""),
    Column("points", Integer, nullable=False, server_default="0"),
    Column("status", Text, nullable=False),  # pending | done | failed
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Delivery to the rewards service: due time (also the lease), tries, why.
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("reason", Text, nullable=False, server_default=""),
    Index(
        "ix_reward_requests_due",
        "next_attempt_at",
        postgresql_where=text("status = 'pending'"),
    ),
)

# Events about members this service does not know yet: kept, replayed on registration.
parked_events = Table(
    "parked_events",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("member_id", Uuid, nullable=False, index=True),
    Column("event", Text, nullable=False),
    Column("attributes", JSONB, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("reason", Text, nullable=False),
    Column("parked_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Expiry reads only what is old enough (ENGAGEMENT_PARKED_TTL_DAYS).
    Index("ix_parked_events_parked_at", "parked_at"),
)

# Last-known location, kept only while the member consents to its use
# (minimal collection: one row, overwritten; deleted on refusal or erasure).
member_locations = Table(
    "member_locations",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    Column("latitude", Float, nullable=False),
    Column("longitude", Float, nullable=False),
    Column("reported_at", DateTime(timezone=True), nullable=False),
    Index("ix_member_locations_lat_lon", "latitude", "longitude"),
)

# What a merge moved, so an unmerge moves exactly that back.
merge_moves = Table(
    "merge_moves",
    metadata,
    Column("merge_id", Text, nullable=False),
    Column("kind", Text, nullable=False),  # enrollment | send | timer
    Column("ref", Text, nullable=False),
    PrimaryKeyConstraint("merge_id", "kind", "ref"),
)

# Birthday month and day (never the year), from member's BirthdaySet, for the
# daily birthday-month entry. `entered_for` is the last birthday month the
# member entered for (year * 12 + month - 1): the daily run reads, through the
# index, only this month's members not yet entered, so it is a difference
# (the 1st of the month, or a birthday set since yesterday), not a rescan.
member_birthdays = Table(
    "member_birthdays",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    Column("month", Integer, nullable=False),
    Column("day", Integer, nullable=False),
    Column("entered_for", Integer, nullable=False, server_default="0"),
    Index("ix_member_birthdays_month_entered", "month", "entered_for"),
)
