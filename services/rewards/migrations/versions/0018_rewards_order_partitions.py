"""rewards: orders are partitioned by month of created_at (PostgreSQL
declarative RANGE partitioning, like the journal in 0013); their global
uniqueness (id, and (store_id, pos_transaction_id): CompleteOrder's
idempotency key) moves to order_keys, a narrow unpartitioned table, and every
foreign key that pointed at orders(id) points at order_keys(id)
(docs/operations.md "Partitioned tables").

order_keys is kept in step by the claim itself (orders/repository.py
CLAIM_ORDER_SQL: one statement writes the key, ON CONFLICT DO NOTHING, then
the order) and, for any other INSERT, by a BEFORE INSERT trigger on orders
that writes the key when the statement has not (a used key then fails with
unique_violation, as the plain table's unique constraint did, whichever
partition holds the first order). An order's key columns never change
(trigger), and order_keys is append-only.

The referring foreign keys (the journal's, refunds', coupons' and any other)
are found in pg_constraint by referenced table, not by name: coupons may have
been partitioned by an earlier migration, its constraint renamed.

Existing rows are moved in this migration's transaction: the table is renamed,
the partitioned table is created with a partition per month the rows cover
(and three ahead, and a default), rows and their keys are copied set-based,
the old table dropped, then the constraints, indexes and triggers are built
once and the foreign keys re-pointed. Lock: ACCESS EXCLUSIVE on orders for the
whole copy (the POS checkout waits), SHARE ROW EXCLUSIVE on the referring
tables while their foreign keys are validated.

Revision ID: 0018_rewards_order_partitions
Revises: 0017_rewards_coupon_partitions
Create Date: 2026-12-05 03:40:00.000000
"""

from collections.abc import Sequence

from alembic import op

from servicekit.partition_migrations import monthly_partitions_sql

revision: str = "0018_rewards_order_partitions"
down_revision: str | None = "0017_rewards_coupon_partitions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every foreign key (not a partition's inherited copy) pointing at `target`'s
# id: (referring table, its column, constraint name). One column each.
REFERRERS_SQL = """
SELECT c.conrelid::regclass::text AS referrer, a.attname AS column_name, c.conname
FROM pg_constraint c
JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
WHERE c.contype = 'f' AND c.confrelid = '{target}'::regclass AND c.conparentid = 0
ORDER BY 1, 2
"""

KEY_CHECK = """
CREATE FUNCTION rewards.claim_order_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- The claim (CLAIM_ORDER_SQL) wrote this very key in the same statement.
    IF EXISTS (SELECT 1 FROM rewards.order_keys
               WHERE id = NEW.id AND store_id = NEW.store_id
                 AND pos_transaction_id = NEW.pos_transaction_id
                 AND created_at = NEW.created_at) THEN
        RETURN NEW;
    END IF;
    -- Any other INSERT: a used (store, POS transaction) or id fails here with
    -- unique_violation, whichever partition holds the first order.
    INSERT INTO rewards.order_keys (id, store_id, pos_transaction_id, created_at)
    VALUES (NEW.id, NEW.store_id, NEW.pos_transaction_id, NEW.created_at);
    RETURN NEW;
END
$$
"""

FORBID_KEY_CHANGE = """
CREATE FUNCTION rewards.forbid_order_key_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.id, NEW.store_id, NEW.pos_transaction_id, NEW.created_at)
       IS DISTINCT FROM (OLD.id, OLD.store_id, OLD.pos_transaction_id, OLD.created_at) THEN
        RAISE EXCEPTION 'rewards.orders: an order''s key (id, store_id, pos_transaction_id,'
            ' created_at) never changes' USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END
$$
"""


def _referrers(target: str) -> list[tuple[str, str, str]]:
    rows = op.get_bind().exec_driver_sql(REFERRERS_SQL.format(target=target)).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def _short(qualified: str) -> str:
    return qualified.rsplit(".", 1)[-1]


def upgrade() -> None:
    referrers = _referrers("rewards.orders")
    for referrer, _, name in referrers:
        op.execute(f"ALTER TABLE {referrer} DROP CONSTRAINT {name}")
    op.execute("LOCK TABLE rewards.orders IN ACCESS EXCLUSIVE MODE")
    op.execute("ALTER TABLE rewards.orders RENAME TO orders_unpartitioned")
    op.execute(
        "CREATE TABLE rewards.orders"
        " (LIKE rewards.orders_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        " PARTITION BY RANGE (created_at)"
    )
    op.execute("CREATE TABLE rewards.orders_default PARTITION OF rewards.orders DEFAULT")
    op.execute(monthly_partitions_sql("rewards", "orders", "created_at", "orders_unpartitioned"))
    op.execute(
        "CREATE TABLE rewards.order_keys (id uuid NOT NULL, store_id text NOT NULL,"
        " pos_transaction_id text NOT NULL, created_at timestamptz NOT NULL)"
    )
    # Constraints, indexes and triggers come after the copy: built once.
    op.execute("INSERT INTO rewards.orders SELECT * FROM rewards.orders_unpartitioned")
    op.execute(
        "INSERT INTO rewards.order_keys (id, store_id, pos_transaction_id, created_at)"
        " SELECT id, store_id, pos_transaction_id, created_at FROM rewards.orders_unpartitioned"
    )
    # Its primary key, unique key and indexes go with it (names are schema-wide).
    op.execute("DROP TABLE rewards.orders_unpartitioned")
    op.execute(
        "ALTER TABLE rewards.order_keys ADD CONSTRAINT pk_order_keys PRIMARY KEY (id),"
        " ADD CONSTRAINT uq_order_keys_store_id_pos_transaction_id"
        " UNIQUE (store_id, pos_transaction_id)"
    )
    op.execute(
        "ALTER TABLE rewards.orders ADD CONSTRAINT pk_orders PRIMARY KEY (id, created_at),"
        " ADD CONSTRAINT fk_orders_store_id_stores FOREIGN KEY (store_id)"
        " REFERENCES rewards.stores (store_id)"
    )
    op.execute(
        "CREATE INDEX ix_orders_member_id_ordered_at ON rewards.orders (member_id, ordered_at)"
    )
    op.execute("CREATE INDEX ix_orders_ordered_at ON rewards.orders (ordered_at)")
    op.execute(KEY_CHECK)
    op.execute(
        "CREATE TRIGGER orders_key BEFORE INSERT ON rewards.orders"
        " FOR EACH ROW EXECUTE FUNCTION rewards.claim_order_key()"
    )
    op.execute(FORBID_KEY_CHANGE)
    # Row-level on the parent, so every partition has it; only when a key
    # column is assigned (the settlement's updates of points and status are not).
    op.execute(
        "CREATE TRIGGER orders_key_fixed"
        " BEFORE UPDATE OF id, store_id, pos_transaction_id, created_at ON rewards.orders"
        " FOR EACH ROW EXECUTE FUNCTION rewards.forbid_order_key_change()"
    )
    op.execute(
        "CREATE TRIGGER order_keys_append_only BEFORE UPDATE OR DELETE ON rewards.order_keys"
        " FOR EACH STATEMENT EXECUTE FUNCTION rewards.forbid_journal_change()"
    )
    for referrer, column, _ in referrers:
        op.execute(
            f"ALTER TABLE {referrer} ADD CONSTRAINT fk_{_short(referrer)}_{column}_order_keys"
            f" FOREIGN KEY ({column}) REFERENCES rewards.order_keys (id)"
        )


def downgrade() -> None:
    referrers = _referrers("rewards.order_keys")
    for referrer, _, name in referrers:
        op.execute(f"ALTER TABLE {referrer} DROP CONSTRAINT {name}")
    op.execute("LOCK TABLE rewards.orders IN ACCESS EXCLUSIVE MODE")
    op.execute("ALTER TABLE rewards.orders RENAME TO orders_partitioned")
    op.execute("ALTER TABLE rewards.orders_partitioned DROP CONSTRAINT pk_orders")
    op.execute("DROP INDEX rewards.ix_orders_member_id_ordered_at")
    op.execute("DROP INDEX rewards.ix_orders_ordered_at")
    op.execute(
        "CREATE TABLE rewards.orders"
        " (LIKE rewards.orders_partitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
    )
    op.execute("INSERT INTO rewards.orders SELECT * FROM rewards.orders_partitioned")
    op.execute("DROP TABLE rewards.orders_partitioned")
    op.execute("DROP TABLE rewards.order_keys")
    op.execute("DROP FUNCTION rewards.claim_order_key()")
    op.execute("DROP FUNCTION rewards.forbid_order_key_change()")
    op.execute(
        "ALTER TABLE rewards.orders ADD CONSTRAINT pk_orders PRIMARY KEY (id),"
        " ADD CONSTRAINT uq_orders_store_id_pos_transaction_id"
        " UNIQUE (store_id, pos_transaction_id),"
        " ADD CONSTRAINT fk_orders_store_id_stores FOREIGN KEY (store_id)"
        " REFERENCES rewards.stores (store_id)"
    )
    op.execute(
        "CREATE INDEX ix_orders_member_id_ordered_at ON rewards.orders (member_id, ordered_at)"
    )
    op.execute("CREATE INDEX ix_orders_ordered_at ON rewards.orders (ordered_at)")
    for referrer, column, _ in referrers:
        op.execute(
            f"ALTER TABLE {referrer} ADD CONSTRAINT fk_{_short(referrer)}_{column}_orders"
            f" FOREIGN KEY ({column}) REFERENCES rewards.orders (id)"
        )
