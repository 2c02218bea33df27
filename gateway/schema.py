"""Tables of the gateway's own schema: registered clients and their keys,
Idempotency-Key records, and the door's durable markers (Alembic reads this;
queries live in gateway/auth/repository.py and gateway/idempotency.py).

Nonces are not here: they live in Redis with a TTL, guarded by the nonce-store
epoch (docs/api.md, "Authentication").
"""

from __future__ import annotations

from sqlalchemy import (
    ARRAY,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    func,
)

from servicekit.tables import service_metadata

SCHEMA = "gateway"

CLIENT_KINDS = ("miniprogram_backend", "pos", "operator_console", "ops_tooling")

metadata = service_metadata(SCHEMA)

clients = Table(
    "clients",
    metadata,
    Column("client_id", Text, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("name", Text, nullable=False),
    # A POS client acts for this store only; empty for every other kind.
    Column("store_id", Text, nullable=False, server_default=""),
    Column("scopes", ARRAY(Text), nullable=False),
    # Per-client rate limit; NULL takes the kind's default from settings.
    Column("rate_per_second", Float, nullable=True),
    Column("burst", Integer, nullable=True),
    # miniprogram_backend: the WeChat app ids it speaks for (at least one);
    # empty for every other kind.
    Column("app_ids", ARRAY(Text), nullable=False, server_default="{}"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    CheckConstraint(
        "kind IN ('miniprogram_backend', 'pos', 'operator_console', 'ops_tooling')", name="kind"
    ),
    CheckConstraint("(kind = 'pos') = (store_id <> '')", name="pos_store"),
    # At least one for a miniprogram_backend is checked at registration (a
    # client registered before app binding holds none, and speaks for no app).
    CheckConstraint(
        "kind = 'miniprogram_backend' OR cardinality(app_ids) = 0", name="app_ids_miniprogram"
    ),
)

client_keys = Table(
    "client_keys",
    metadata,
    Column("key_id", Text, primary_key=True),
    Column("client_id", Text, ForeignKey("clients.client_id"), nullable=False, index=True),
    # AES-GCM under the gateway's key (HMAC verification needs the secret itself).
    Column("secret_cipher", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

# Idempotency-Key records: in PostgreSQL, not Redis, so a record survives a
# Redis loss and a retry after it is answered from here, not run again.
idempotency_records = Table(
    "idempotency_records",
    metadata,
    Column("client_id", Text, nullable=False),
    # sha256 of the key as sent.
    Column("key_hash", LargeBinary, nullable=False),
    # sha256 of method, target and body: the same key with another request is refused.
    Column("fingerprint", LargeBinary, nullable=False),
    Column("state", Text, nullable=False),
    Column("status", SmallInteger, nullable=True),
    Column("content_type", Text, nullable=True),
    Column("body", LargeBinary, nullable=True),
    # An in-progress claim older than this is abandoned (its request died).
    Column("locked_until", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
    PrimaryKeyConstraint("client_id", "key_hash"),
    CheckConstraint("state IN ('in_progress', 'done')", name="state"),
)

# One row per durable fact of the door; today "nonce_store:<redis namespace>":
# that nonce store was initialised once, so an empty one later lost its data.
door_markers = Table(
    "door_markers",
    metadata,
    Column("name", Text, primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
