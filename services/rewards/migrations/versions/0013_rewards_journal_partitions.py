"""rewards: the points journal (points_transactions) is partitioned by month
of created_at (PostgreSQL declarative RANGE partitioning); its global
uniqueness (id, idempotency_key) moves to points_transaction_keys, a narrow
unpartitioned table a BEFORE INSERT trigger writes in the same statement, and
the foreign keys that pointed at the journal point at that table
(docs/operations.md "Partitioned tables").

Existing rows are moved in this migration's transaction: the table is renamed,
the partitioned table is created with a partition per month the data covers
(and three ahead, and a default), rows and their keys are copied set-based,
then the keys' and the journal's constraints, indexes and triggers are built,
and the old table dropped. Lock: ACCESS EXCLUSIVE on
points_transactions for the whole copy (writes and reads of the journal wait),
SHARE ROW EXCLUSIVE on the tables whose foreign keys are re-pointed.

Revision ID: 0013_rewards_journal_partitions
Revises: 0012_rewards_durable_events
Create Date: 2026-12-04 21:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013_rewards_journal_partitions"
down_revision: str | None = "0012_rewards_durable_events"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Tables whose transaction columns referenced the journal, and the column.
REFERRERS = (
    ("points_entries", "transaction_id"),
    ("points_lots", "transaction_id"),
    ("points_lot_movements", "transaction_id"),
    ("refunds", "transaction_id"),
    ("points_holds", "transaction_id"),
    ("points_holds", "resolution_transaction_id"),
)

COLUMNS = (
    "id, member_id, kind, order_id, idempotency_key, amount, rule, created_at, seq,"
    " counterpart_member_id, reference, operator_id, reason"
)

CLAIM_KEY = """
CREATE FUNCTION rewards.claim_transaction_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A second journal row with an id or idempotency key already written fails
    -- here with unique_violation, whichever partition the first one is in.
    INSERT INTO rewards.points_transaction_keys (id, idempotency_key, created_at)
    VALUES (NEW.id, NEW.idempotency_key, NEW.created_at);
    RETURN NEW;
END
$$
"""

# One partition per month the rows cover, up to three months ahead of the
# database's clock (created_at is written by it), plus the default partition.
MONTHLY_PARTITIONS = """
DO $$
DECLARE
    first_month date := date_trunc('month', least(
        (SELECT min(created_at) FROM rewards.points_transactions_unpartitioned), now())
        AT TIME ZONE 'UTC')::date;
    last_month date := (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '3 months')::date;
    m date := first_month;
BEGIN
    WHILE m <= last_month LOOP
        EXECUTE format(
            'CREATE TABLE rewards.%I PARTITION OF rewards.points_transactions'
            ' FOR VALUES FROM (%L) TO (%L)',
            'points_transactions_p' || to_char(m, 'YYYYMM'),
            m::timestamp AT TIME ZONE 'UTC',
            (m + interval '1 month')::timestamp AT TIME ZONE 'UTC');
        m := (m + interval '1 month')::date;
    END LOOP;
END
$$
"""


def upgrade() -> None:
    for table, column in REFERRERS:
        op.execute(
            f"ALTER TABLE rewards.{table} DROP CONSTRAINT fk_{table}_{column}_points_transactions"
        )
    op.execute("LOCK TABLE rewards.points_transactions IN ACCESS EXCLUSIVE MODE")
    op.execute(
        "ALTER TABLE rewards.points_transactions RENAME TO points_transactions_unpartitioned"
    )
    for name in (
        "pk_points_transactions",
        "uq_points_transactions_idempotency_key",
        "uq_points_transactions_seq",
        "fk_points_transactions_order_id_orders",
    ):
        op.execute(f"ALTER TABLE rewards.points_transactions_unpartitioned DROP CONSTRAINT {name}")
    for name in (
        "ix_points_transactions_counterpart_member_id",
        "ix_points_transactions_member_id",
        "ix_points_transactions_member_id_seq",
        "ix_points_transactions_order_id",
    ):
        op.execute(f"DROP INDEX rewards.{name}")
    for name in ("adjust_has_operator_and_reason", "amount_positive", "kind_known"):
        op.execute(
            "ALTER TABLE rewards.points_transactions_unpartitioned"
            f" DROP CONSTRAINT ck_points_transactions_{name}"
        )
    # Constraints and indexes come after the copy: built once, sorted, instead
    # of row by row (and the trigger too: the copy writes the keys set-based).
    op.execute(
        "CREATE TABLE rewards.points_transaction_keys ("
        " id uuid NOT NULL, idempotency_key text NOT NULL, created_at timestamptz NOT NULL)"
    )
    # The key table is part of the journal: append-only like it.
    op.execute(
        "CREATE TRIGGER points_transaction_keys_append_only BEFORE UPDATE OR DELETE"
        " ON rewards.points_transaction_keys FOR EACH STATEMENT"
        " EXECUTE FUNCTION rewards.forbid_journal_change()"
    )
    # The sequence continues the identity's numbers (history cursors stay valid).
    op.execute("CREATE SEQUENCE rewards.points_transactions_seq AS bigint START WITH 1")
    op.execute(
        "SELECT setval('rewards.points_transactions_seq',"
        " coalesce((SELECT max(seq) FROM rewards.points_transactions_unpartitioned), 0) + 1,"
        " false)"
    )
    op.execute(
        "CREATE TABLE rewards.points_transactions ("
        " id uuid NOT NULL, member_id uuid NOT NULL, kind text NOT NULL, order_id uuid,"
        " idempotency_key text NOT NULL, amount bigint NOT NULL, rule jsonb NOT NULL,"
        " created_at timestamptz NOT NULL DEFAULT now(),"
        " seq bigint NOT NULL DEFAULT nextval('rewards.points_transactions_seq'),"
        " counterpart_member_id uuid, reference text, operator_id text, reason text,"
        " CONSTRAINT ck_points_transactions_kind_known CHECK (kind IN ('earn', 'redeem',"
        " 'expire', 'refund', 'hold', 'hold_post', 'hold_void', 'adjust', 'activate', 'merge',"
        " 'unmerge')),"
        " CONSTRAINT ck_points_transactions_amount_positive CHECK (amount > 0),"
        " CONSTRAINT ck_points_transactions_adjust_has_operator_and_reason"
        " CHECK (kind <> 'adjust' OR (operator_id IS NOT NULL AND reason IS NOT NULL))"
        ") PARTITION BY RANGE (created_at)"
    )
    op.execute(
        "ALTER SEQUENCE rewards.points_transactions_seq OWNED BY rewards.points_transactions.seq"
    )
    op.execute(
        "CREATE TABLE rewards.points_transactions_default"
        " PARTITION OF rewards.points_transactions DEFAULT"
    )
    op.execute(MONTHLY_PARTITIONS)
    op.execute(
        f"INSERT INTO rewards.points_transactions ({COLUMNS})"
        f" SELECT {COLUMNS} FROM rewards.points_transactions_unpartitioned"
    )
    op.execute(
        "INSERT INTO rewards.points_transaction_keys (id, idempotency_key, created_at)"
        " SELECT id, idempotency_key, created_at FROM rewards.points_transactions_unpartitioned"
    )
    op.execute(
        "ALTER TABLE rewards.points_transaction_keys"
        " ADD CONSTRAINT pk_points_transaction_keys PRIMARY KEY (id),"
        " ADD CONSTRAINT uq_points_transaction_keys_idempotency_key UNIQUE (idempotency_key)"
    )
    op.execute(
        "ALTER TABLE rewards.points_transactions"
        " ADD CONSTRAINT pk_points_transactions PRIMARY KEY (id, created_at),"
        " ADD CONSTRAINT fk_points_transactions_order_id_orders FOREIGN KEY (order_id)"
        " REFERENCES rewards.orders (id)"
    )
    for columns in ("member_id", "order_id", "counterpart_member_id", "member_id, seq"):
        name = "ix_points_transactions_" + columns.replace(", ", "_")
        op.execute(f"CREATE INDEX {name} ON rewards.points_transactions ({columns})")
    op.execute(CLAIM_KEY)
    op.execute(
        "CREATE TRIGGER points_transactions_key BEFORE INSERT ON rewards.points_transactions"
        " FOR EACH ROW EXECUTE FUNCTION rewards.claim_transaction_key()"
    )
    # Row-level, so every partition inherits it (a statement trigger on the
    # parent would not stop an UPDATE or DELETE aimed at a partition).
    op.execute(
        "CREATE TRIGGER points_transactions_append_only BEFORE UPDATE OR DELETE"
        " ON rewards.points_transactions FOR EACH ROW"
        " EXECUTE FUNCTION rewards.forbid_journal_change()"
    )
    op.execute("DROP TABLE rewards.points_transactions_unpartitioned")
    for table, column in REFERRERS:
        op.execute(
            f"ALTER TABLE rewards.{table} ADD CONSTRAINT"
            f" fk_{table}_{column}_points_transaction_keys FOREIGN KEY ({column})"
            " REFERENCES rewards.points_transaction_keys (id)"
        )


def downgrade() -> None:
    for table, column in REFERRERS:
        op.execute(
            f"ALTER TABLE rewards.{table}"
            f" DROP CONSTRAINT fk_{table}_{column}_points_transaction_keys"
        )
    op.execute("ALTER TABLE rewards.points_transactions RENAME TO points_transactions_partitioned")
    # Index names are schema-wide: free the primary key's for the plain table.
    op.execute(
        "ALTER TABLE rewards.points_transactions_partitioned DROP CONSTRAINT pk_points_transactions"
    )
    for columns in ("member_id", "order_id", "counterpart_member_id", "member_id, seq"):
        op.execute("DROP INDEX rewards.ix_points_transactions_" + columns.replace(", ", "_"))
    op.execute(
        "CREATE TABLE rewards.points_transactions ("
        " id uuid NOT NULL CONSTRAINT pk_points_transactions PRIMARY KEY,"
        " member_id uuid NOT NULL, kind text NOT NULL, order_id uuid"
        " CONSTRAINT fk_points_transactions_order_id_orders REFERENCES rewards.orders (id),"
        " idempotency_key text NOT NULL"
        " CONSTRAINT uq_points_transactions_idempotency_key UNIQUE,"
        " amount bigint NOT NULL, rule jsonb NOT NULL,"
        " created_at timestamptz NOT NULL DEFAULT now(),"
        " seq bigint GENERATED BY DEFAULT AS IDENTITY"
        " CONSTRAINT uq_points_transactions_seq UNIQUE,"
        " counterpart_member_id uuid, reference text, operator_id text, reason text,"
        " CONSTRAINT ck_points_transactions_kind_known CHECK (kind IN ('earn', 'redeem',"
        " 'expire', 'refund', 'hold', 'hold_post', 'hold_void', 'adjust', 'activate', 'merge',"
        " 'unmerge')),"
        " CONSTRAINT ck_points_transactions_amount_positive CHECK (amount > 0),"
        " CONSTRAINT ck_points_transactions_adjust_has_operator_and_reason"
        " CHECK (kind <> 'adjust' OR (operator_id IS NOT NULL AND reason IS NOT NULL)))"
    )
    op.execute(
        f"INSERT INTO rewards.points_transactions ({COLUMNS})"
        f" SELECT {COLUMNS} FROM rewards.points_transactions_partitioned ORDER BY seq"
    )
    op.execute(
        "SELECT setval(pg_get_serial_sequence('rewards.points_transactions', 'seq'),"
        " coalesce((SELECT max(seq) FROM rewards.points_transactions), 0) + 1, false)"
    )
    op.execute("DROP TABLE rewards.points_transactions_partitioned")
    op.execute("DROP FUNCTION rewards.claim_transaction_key()")
    op.execute("DROP TABLE rewards.points_transaction_keys")
    for columns in ("member_id", "order_id", "counterpart_member_id", "member_id, seq"):
        name = "ix_points_transactions_" + columns.replace(", ", "_")
        op.execute(f"CREATE INDEX {name} ON rewards.points_transactions ({columns})")
    op.execute(
        "CREATE TRIGGER points_transactions_append_only BEFORE UPDATE OR DELETE"
        " ON rewards.points_transactions FOR EACH STATEMENT"
        " EXECUTE FUNCTION rewards.forbid_journal_change()"
    )
    for table, column in REFERRERS:
        op.execute(
            f"ALTER TABLE rewards.{table} ADD CONSTRAINT"
            f" fk_{table}_{column}_points_transactions FOREIGN KEY ({column})"
            " REFERENCES rewards.points_transactions (id)"
        )
