"""Tables of the console's own schema: operator accounts and the audit of
every change made to them by `python -m console users ...` (Alembic reads this;
queries live in console/users.py). Sessions and log-in counters are in Redis
(console/sessions.py, console/throttle.py): they expire, accounts must not."""

from __future__ import annotations

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Identity,
    Index,
    Table,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB

from servicekit.tables import service_metadata

SCHEMA = "console"

metadata = service_metadata(SCHEMA)

operators = Table(
    "operators",
    metadata,
    Column("username", Text, primary_key=True),
    # Argon2id, PHC string form ($argon2id$v=19$m=...,t=...,p=...$salt$hash).
    Column("password_hash", Text, nullable=False),
    Column("roles", ARRAY(Text), nullable=False),
    # Base32 TOTP secret when the operator enrolled a second factor.
    Column("totp_secret", Text, nullable=True),
    # A one-time password from `users create` must be replaced at first log-in.
    Column("must_change_password", Boolean, nullable=False, server_default="true"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("disabled_at", DateTime(timezone=True), nullable=True),
)

# One row per change to an operator account made by a command (create,
# disable, enable, reset-password, roles): who ran it (`--by`, else the OS
# user), when, what. Never updated or deleted by the console.
operator_audit = Table(
    "operator_audit",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("actor", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("username", Text, nullable=False),
    # What changed: {"roles": {"from": [...], "to": [...]}}, ...
    Column("detail", JSONB, nullable=False, server_default="{}"),
    Index("ix_operator_audit_username_at", "username", "at"),
)
