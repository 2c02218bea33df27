"""member: dynamic member codes are issued fresh and recorded (issue 15 item 10)

Each IssueMemberCode draws a new code and records it (by keyed hash) with its
expiry; RedeemMemberCode marks it used. The old table of redeemed window codes
goes: codes of the old format were valid for a minute at most.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 17:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "member_codes",
        sa.Column("code_hash", sa.LargeBinary(), nullable=False),
        sa.Column("member_id", sa.Uuid(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("used_by", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("code_hash", name=op.f("pk_member_codes")),
        schema="member",
    )
    op.create_index(
        op.f("ix_member_codes_expires_at"), "member_codes", ["expires_at"], schema="member"
    )
    op.create_index(
        op.f("ix_member_codes_member_id"), "member_codes", ["member_id"], schema="member"
    )
    op.drop_index(
        op.f("ix_member_code_uses_used_at"), table_name="member_code_uses", schema="member"
    )
    op.drop_table("member_code_uses", schema="member")


def downgrade() -> None:
    op.create_table(
        "member_code_uses",
        sa.Column("code_hash", sa.LargeBinary(), nullable=False),
        sa.Column("member_id", sa.Uuid(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column(
            "used_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.PrimaryKeyConstraint("code_hash", name=op.f("pk_member_code_uses")),
        schema="member",
    )
    op.create_index(
        op.f("ix_member_code_uses_used_at"),
        "member_code_uses",
        ["used_at"],
        unique=False,
        schema="member",
    )
    op.drop_index(op.f("ix_member_codes_member_id"), table_name="member_codes", schema="member")
    op.drop_index(op.f("ix_member_codes_expires_at"), table_name="member_codes", schema="member")
    op.drop_table("member_codes", schema="member")
