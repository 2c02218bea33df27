"""engagement: sends (one row per message a journey step writes) are
RANGE-partitioned by month of created_at; the send key's global uniqueness
(one send per enrollment step, whoever replays the step, in any month) moves to
send_keys, a narrow unpartitioned table (send_key, created_at) the BEFORE
INSERT trigger claim_send_keys writes in the same statement: a key already
there skips the row, like the ON CONFLICT DO NOTHING the scheduler writes
with. send_keys also routes the writes by send key (outcomes, receipts, credit
epochs) to the one partition holding the send (docs/operations.md
"Partitioned tables"; servicekit/partition_migrations.py MonthlyConversion).

Existing rows are moved in this migration's transaction, set-based: the table
renamed, the partitioned one created with a partition per month the rows
cover (and three ahead, and a default), rows and their keys copied, then the
primary key (send_key, created_at), the indexes (the partial dispatch, in
flight, unknown and cap holder indexes per partition) and the trigger built
once. Lock: ACCESS EXCLUSIVE on sends throughout (dispatch and the sweepers
wait for the copy).

Revision ID: 0013_engagement_sends_partitions
Revises: 0012_engagement_partitions
Create Date: 2026-12-05 04:00:00.000000
"""

from collections.abc import Sequence

from servicekit.partition_migrations import MonthlyConversion

revision: str = "0013_engagement_sends_partitions"
down_revision: str | None = "0012_engagement_partitions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SENDS = MonthlyConversion(
    "engagement",
    "sends",
    "created_at",
    key=("send_key",),
    indexes=(
        ("ix_sends_member_id", "member_id"),
        ("ix_sends_enrollment_id", "enrollment_id"),
        ("ix_sends_journey", "journey_id, step_id, status"),
    ),
    indexes_sql=(
        ("ix_sends_dispatch", "(next_attempt_at) WHERE status = 'pending'"),
        ("ix_sends_in_flight", "(next_attempt_at) WHERE status = 'sending'"),
        ("ix_sends_unknown", "(journey_id, updated_at) WHERE status = 'unknown'"),
        ("ix_sends_holder", "(member_id, local_day, message_class) WHERE status = 'pending'"),
    ),
    key_table="send_keys",
)


def upgrade() -> None:
    SENDS.upgrade()


def downgrade() -> None:
    SENDS.downgrade()
