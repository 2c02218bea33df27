"""Tables of the member schema (Alembic reads this; queries live in repository.py)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    LargeBinary,
    Sequence,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    func,
)

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
    UniqueConstraint("id_type", "namespace", "value_hash"),
)

outbox, processed_events = add_event_tables(metadata)
