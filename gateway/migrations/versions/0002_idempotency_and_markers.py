"""gateway schema: Idempotency-Key records in PostgreSQL, and the door's markers

Idempotency records move out of Redis so that a retry after a Redis loss is
answered from the stored response instead of running again (issue 14 item 3);
door_markers remembers that the nonce store was initialised, so an empty one
at start means a loss. CHECK constraints are reviewed by hand: keep them
identical to gateway/schema.py.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "idempotency_records",
        sa.Column("client_id", sa.Text(), nullable=False),
        sa.Column("key_hash", sa.LargeBinary(), nullable=False),
        sa.Column("fingerprint", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("status", sa.SmallInteger(), nullable=True),
        sa.Column("content_type", sa.Text(), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=True),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state IN ('in_progress', 'done')", name=op.f("ck_idempotency_records_state")
        ),
        sa.PrimaryKeyConstraint("client_id", "key_hash", name=op.f("pk_idempotency_records")),
        schema="gateway",
    )
    op.create_index(
        op.f("ix_idempotency_records_expires_at"),
        "idempotency_records",
        ["expires_at"],
        unique=False,
        schema="gateway",
    )
    op.create_table(
        "door_markers",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_door_markers")),
        schema="gateway",
    )


def downgrade() -> None:
    op.drop_table("door_markers", schema="gateway")
    op.drop_index(
        op.f("ix_idempotency_records_expires_at"),
        table_name="idempotency_records",
        schema="gateway",
    )
    op.drop_table("idempotency_records", schema="gateway")
