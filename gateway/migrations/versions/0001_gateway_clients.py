"""gateway schema: registered clients and their keys

CHECK constraints are reviewed by hand (Alembic never compares them): keep
them identical to gateway/schema.py.

Revision ID: 0001
Revises:
Create Date: 2026-11-25 12:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "clients",
        sa.Column("client_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("store_id", sa.Text(), server_default="", nullable=False),
        sa.Column("scopes", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("rate_per_second", sa.Float(), nullable=True),
        sa.Column("burst", sa.Integer(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "kind IN ('miniprogram_backend', 'pos', 'operator_console', 'ops_tooling')",
            name=op.f("ck_clients_kind"),
        ),
        sa.CheckConstraint("(kind = 'pos') = (store_id <> '')", name=op.f("ck_clients_pos_store")),
        sa.PrimaryKeyConstraint("client_id", name=op.f("pk_clients")),
        schema="gateway",
    )
    op.create_table(
        "client_keys",
        sa.Column("key_id", sa.Text(), nullable=False),
        sa.Column("client_id", sa.Text(), nullable=False),
        sa.Column("secret_cipher", sa.LargeBinary(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["gateway.clients.client_id"],
            name=op.f("fk_client_keys_client_id_clients"),
        ),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_client_keys")),
        schema="gateway",
    )
    op.create_index(
        op.f("ix_client_keys_client_id"),
        "client_keys",
        ["client_id"],
        unique=False,
        schema="gateway",
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_client_keys_client_id"), table_name="client_keys", schema="gateway")
    op.drop_table("client_keys", schema="gateway")
    op.drop_table("clients", schema="gateway")
