"""guides: WeCom work that fails is retried with back-off and never blocks
other work (issue 20 audit): tag pushes get next_attempt_at; guide tasks get
attempts, next_attempt_at, the last error and WeCom's code, and sent_at (a
sent task expires after TASK_LIFE_HOURS); resigned-staff transfers are
recorded pending until WeCom's transfer_result settles them; job_runs says
when the rule-tag batch last ran (one replica per period).

Existing rows: pushes are due now; tasks already sent count as sent when they
were created (set-based, below).

Revision ID: 0008_guides_retries
Revises: 0007_guides_partitions
Create Date: 2026-12-05 04:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_guides_retries"
down_revision: str | None = "0007_guides_partitions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "guides"


def upgrade() -> None:
    op.add_column(
        "tag_pushes",
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_tag_pushes_due",
        "tag_pushes",
        ["next_attempt_at"],
        unique=False,
        schema=SCHEMA,
        postgresql_where=sa.text("done_at IS NULL"),
    )
    for column in (
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), server_default="", nullable=False),
        sa.Column("error_code", sa.Text(), server_default="", nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
    ):
        op.add_column("guide_tasks", column, schema=SCHEMA)
    op.execute(f"UPDATE {SCHEMA}.guide_tasks SET sent_at = created_at WHERE status = 'sent'")
    op.create_index(
        "ix_guide_tasks_status_created_at",
        "guide_tasks",
        ["status", "created_at"],
        unique=False,
        schema=SCHEMA,
    )
    op.create_table(
        "job_runs",
        sa.Column("job", sa.Text(), nullable=False),
        sa.Column("last_run_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("job", name=op.f("pk_job_runs")),
        schema=SCHEMA,
    )
    op.create_table(
        "resigned_transfers",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("handover_staff_id", sa.Text(), nullable=False),
        sa.Column("takeover_staff_id", sa.Text(), nullable=False),
        sa.Column("external_userid", sa.Text(), nullable=False),
        sa.Column("member_id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("wecom_status", sa.Integer(), server_default="0", nullable=False),
        sa.Column("reason", sa.Text(), server_default="", nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_resigned_transfers")),
        schema=SCHEMA,
    )
    op.create_index(
        "uq_resigned_transfers_pending",
        "resigned_transfers",
        ["handover_staff_id", "external_userid"],
        unique=True,
        schema=SCHEMA,
        postgresql_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index(
        "uq_resigned_transfers_pending",
        table_name="resigned_transfers",
        schema=SCHEMA,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_table("resigned_transfers", schema=SCHEMA)
    op.drop_table("job_runs", schema=SCHEMA)
    op.drop_index("ix_guide_tasks_status_created_at", table_name="guide_tasks", schema=SCHEMA)
    for name in ("sent_at", "error_code", "last_error", "next_attempt_at", "attempts"):
        op.drop_column("guide_tasks", name, schema=SCHEMA)
    op.drop_index(
        "ix_tag_pushes_due",
        table_name="tag_pushes",
        schema=SCHEMA,
        postgresql_where=sa.text("done_at IS NULL"),
    )
    op.drop_column("tag_pushes", "next_attempt_at", schema=SCHEMA)
