"""Tables of the gateway's own schema: registered clients and their keys
(Alembic reads this; queries live in gateway/auth/repository.py).

Idempotency records and nonces are not here: they live in Redis with a TTL
(docs/api.md, "Authentication").
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
