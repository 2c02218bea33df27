"""Tables of the member schema (Alembic reads this; queries live in repository.py)."""

from __future__ import annotations

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    Sequence,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from servicekit.tables import add_event_tables, service_metadata

SCHEMA = "member"
metadata = service_metadata(SCHEMA)

member_number_seq = Sequence("member_number_seq", metadata=metadata, start=10_000_001)

members = Table(
    "members",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("member_number", Text, nullable=False, unique=True),
    Column("registered_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("registration_source", Text, nullable=False),
    # Display value only; the phone itself is in identities, encrypted.
    Column("phone_masked", Text),
    # Flat union-find: an absorbed member points straight at its survivor
    # (never at another absorbed member), so resolving is one hop.
    Column("merged_into", Uuid, ForeignKey("member.members.id"), index=True),
    # "active" or "erased" (a tombstone: the id stays, nothing personal does).
    Column("status", Text, nullable=False, server_default="active"),
    Column("erased_at", DateTime(timezone=True)),
    # The dashboards' range scans (servicekit/metrics_definitions.py).
    Index(None, "registered_at"),
)

identities = Table(
    "identities",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("member_id", Uuid, ForeignKey(members.c.id), nullable=False, index=True),
    Column("id_type", Text, nullable=False),
    # Issuing app (openid) or platform (delivery ids); "" when global.
    Column("namespace", Text, nullable=False, server_default=""),
    # Keyed hash (HMAC-SHA256) of the normalised value: lookups without plaintext.
    Column("value_hash", LargeBinary, nullable=False),
    # AES-GCM ciphertext of the normalised value (PII encrypted at rest).
    Column("value_cipher", LargeBinary, nullable=False),
    Column("value_masked", Text, nullable=False),
    Column("verified", Boolean, nullable=False, server_default="false"),
    Column("source", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Id of the AES key that sealed value_cipher (key rotation).
    Column("key_id", Text, nullable=False, server_default="k0"),
    UniqueConstraint("id_type", "namespace", "value_hash"),
)

# Idempotency of IdentifyMember: the first answer per client request key.
identify_requests = Table(
    "identify_requests",
    metadata,
    # Unique across partitions by the first_only trigger (migration 0008).
    Column("request_key", Text, primary_key=True),
    # Keyed hash of the request's identifiers: the same key with another body is refused.
    Column("request_hash", LargeBinary, nullable=False),
    Column("member_id", Uuid, nullable=False),
    Column("created", Boolean, nullable=False),
    # merged member ids, review id and ignored identifiers of the first answer.
    Column("outcome", JSONB, nullable=False),
    # The partition key (with request_key, the primary key: PostgreSQL requires
    # it there). Partitions past IDENTIFY_REQUEST_RETENTION_DAYS are dropped
    # (services/member/partitions.py).
    Column(
        "created_at",
        DateTime(timezone=True),
        primary_key=True,
        nullable=False,
        server_default=func.now(),
    ),
    postgresql_partition_by="RANGE (created_at)",
)

# Which members each identifier has been observed together with: the
# evidence for quarantine (one identifier linking many people is junk).
identifier_links = Table(
    "identifier_links",
    metadata,
    Column("id_type", Text, nullable=False),
    Column("namespace", Text, nullable=False),
    Column("value_hash", LargeBinary, nullable=False),
    Column("member_id", Uuid, ForeignKey(members.c.id), nullable=False, index=True),
    Column("first_seen_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("id_type", "namespace", "value_hash", "member_id"),
)

quarantined_identifiers = Table(
    "quarantined_identifiers",
    metadata,
    Column("id_type", Text, nullable=False),
    Column("namespace", Text, nullable=False),
    Column("value_hash", LargeBinary, nullable=False),
    Column("value_masked", Text, nullable=False),
    Column("linked_members", Integer, nullable=False),
    Column("quarantined_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("id_type", "namespace", "value_hash"),
)

merges = Table(
    "merges",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("survivor_id", Uuid, ForeignKey(members.c.id), nullable=False, index=True),
    Column("absorbed_id", Uuid, ForeignKey(members.c.id), nullable=False, index=True),
    # Which rule merged: "identify:<type>" (the merge key), "operator", "review".
    Column("rule", Text, nullable=False),
    # Masked identifiers that were the evidence, and who acted.
    Column("evidence", JSONB, nullable=False),
    Column("actor", Text, nullable=False),
    Column("review_id", Uuid),
    Column("status", Text, nullable=False, server_default="active"),
    Column("merged_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # What the merge moved, so an unmerge moves exactly that back.
    Column("moved_identity_ids", ARRAY(BigInteger), nullable=False),
    # Members that pointed at the absorbed one and were re-pointed (flattening).
    Column("repointed_member_ids", ARRAY(Uuid), nullable=False),
    Column("unmerged_at", DateTime(timezone=True)),
    Column("unmerged_by", Text),
    Column("unmerge_reason", Text),
    CheckConstraint("status IN ('active', 'unmerged', 'erased')", name="status"),
)

merge_reviews = Table(
    "merge_reviews",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("status", Text, nullable=False, server_default="pending"),
    # Sorted, so one pending review per set of members.
    Column("member_ids", ARRAY(Uuid), nullable=False),
    Column("reason", Text, nullable=False),
    Column("detail", Text, nullable=False),
    Column("evidence", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("decided_at", DateTime(timezone=True)),
    Column("decided_by", Text),
    Column("note", Text),
    Column("merge_ids", ARRAY(Uuid), nullable=False, server_default="{}"),
    CheckConstraint("status IN ('pending', 'approved', 'rejected', 'closed')", name="status"),
    Index(
        "uq_merge_reviews_pending_members",
        "member_ids",
        unique=True,
        postgresql_where=text("status = 'pending'"),
    ),
)

# Pairs an operator said are different people (a rejected review, an unmerge).
do_not_merge = Table(
    "do_not_merge",
    metadata,
    Column("member_a", Uuid, ForeignKey(members.c.id), nullable=False),
    Column("member_b", Uuid, ForeignKey(members.c.id), nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("member_a", "member_b"),
    CheckConstraint("member_a < member_b", name="ordered"),
)

# Profile values as each source reported them; the profile is computed.
profile_observations = Table(
    "profile_observations",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("member_id", Uuid, ForeignKey(members.c.id), nullable=False, index=True),
    Column("field", Text, nullable=False),
    Column("value", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("verified", Boolean, nullable=False),
    Column("observed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# Consent history, append-only: every choice with who, when and where.
consent_records = Table(
    "consent_records",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("member_id", Uuid, ForeignKey(members.c.id), nullable=False, index=True),
    Column("purpose", Text, nullable=False),
    Column("channel", Text, nullable=False),
    Column("granted", Boolean, nullable=False),
    Column("source", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# Every read of unmasked personal data.
pii_access_log = Table(
    "pii_access_log",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("member_id", Uuid, nullable=False, index=True),
    Column("accessor", Text, nullable=False),
    Column("purpose", Text, nullable=False),
    Column("fields", ARRAY(Text), nullable=False),
    Column("accessed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# What is left of an erased person: keyed hashes of their identifiers, so a
# later login is recognised as a re-enrolment instead of silently re-linked.
suppressed_identifiers = Table(
    "suppressed_identifiers",
    metadata,
    Column("suppression_hash", LargeBinary, primary_key=True),
    Column("erased_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# Dynamic member codes issued (a fresh one per issue), each redeemable once
# before it expires; pruned a while after expiry.
member_codes = Table(
    "member_codes",
    metadata,
    # Keyed hash of the code (PiiVault.lookup_hash): the table never holds a code.
    Column("code_hash", LargeBinary, primary_key=True),
    Column("member_id", Uuid, nullable=False, index=True),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
    Column("used_at", DateTime(timezone=True), nullable=True),
    # Where it was scanned, e.g. "pos:SH001".
    Column("used_by", Text, nullable=True),
)

# Identifiers presented at too many stores within the velocity window
# (services/member/velocity.py counts in Redis; a flag is written here once
# per burst, with the IdentifierVelocityFlagged event). Flag, never block.
velocity_flags = Table(
    "velocity_flags",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("id_type", Text, nullable=False),
    Column("namespace", Text, nullable=False),
    # Keyed hash (PiiVault.lookup_hash) and masked value: never the identifier.
    Column("value_hash", LargeBinary, nullable=False, index=True),
    Column("value_masked", Text, nullable=False),
    Column("member_id", Uuid, nullable=False),
    Column("store_count", Integer, nullable=False),
    Column("store_ids", ARRAY(Text), nullable=False),
    Column("window_seconds", Integer, nullable=False),
    # The service's clock, never the database's.
    Column("flagged_at", DateTime(timezone=True), nullable=False),
    Index(None, "flagged_at", "id"),
)

outbox, processed_events = add_event_tables(metadata, partitioned=True)
