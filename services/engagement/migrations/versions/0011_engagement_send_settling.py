"""engagement: sends that wait for the provider are settled, never left waiting.

An accepted SMS gets a receipt deadline (next_attempt_at) after which it is
`unknown` (NO_RECEIPT); the ones already waiting get it from when they were
accepted. A mini-program send keeps the credit epoch it took its credit in,
and a member's credits an epoch bumped whenever WeChat says they are gone
(43101), so a held credit WeChat voided is found before the call.

Revision ID: 0011_engagement_send_settling
Revises: 0010_engagement_channels
Create Date: 2026-12-04 21:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_engagement_send_settling"
down_revision: str | None = "0010_engagement_channels"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "subscription_credits",
        sa.Column("epoch", sa.Integer(), server_default="0", nullable=False),
        schema="engagement",
    )
    op.add_column(
        "sends", sa.Column("credit_epoch", sa.Integer(), nullable=True), schema="engagement"
    )
    # Accepted SMS already waiting: 72 h (the default cut-off) from acceptance.
    op.execute(
        "UPDATE engagement.sends SET next_attempt_at = updated_at + interval '72 hours'"
        " WHERE status = 'sending' AND reason = 'ACCEPTED' AND next_attempt_at IS NULL"
    )


def downgrade() -> None:
    op.drop_column("sends", "credit_epoch", schema="engagement")
    op.drop_column("subscription_credits", "epoch", schema="engagement")
