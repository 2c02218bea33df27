"""rewards: points lots are partitioned by month of expires_at, lot movements
by month of their own created_at (a new column: the time of the transaction
that wrote them; the posting statement writes now(), the journal row's time,
any other writer gets it from points_transaction_keys by trigger)
(PostgreSQL declarative RANGE partitioning, like the journal in 0013;
docs/operations.md "Partitioned tables").

A lot's expires_at never changes (spends, expiries, refunds and holds change
remaining, status and clawback only), so a lot never moves between
partitions, and a spend reads a member's lots with `expires_at >= floor`
(the lots' expiry floor, rewards.points_lot_expiry_floor): the partitions of
lots that expired long ago are pruned from it.

Lot ids stay unique across partitions in points_lot_keys (id, expires_at), a
narrow unpartitioned table a BEFORE INSERT trigger on points_lots writes in
the same statement (no statement added to the earn path); the movements'
foreign key points at it.

Existing rows are moved in this migration's transaction: both tables are
renamed, the partitioned ones created with a partition for every month that
has rows and for this month and ahead (lots: 27 months, as far as the default
expiry policy reaches; movements: three) and a default, rows copied set-based (movements take their transaction's
created_at from points_transaction_keys), the old tables dropped, then the
keys, primary keys, indexes, foreign keys and triggers built once. Lock:
ACCESS EXCLUSIVE on points_lots and points_lot_movements for the whole copy
(every spend, earn and refund waits).

Revision ID: 0020_rewards_lot_partitions
Revises: 0019_rewards_member_stores
Create Date: 2026-12-05 04:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

from servicekit.partition_migrations import partitions_for_rows_sql

revision: str = "0020_rewards_lot_partitions"
down_revision: str | None = "0019_rewards_member_stores"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AHEAD_MONTHS = 3
# Lots expire up to two years ahead (end_of_year:1): their partitions are made
# that far ahead (services/rewards/partitions.py LOTS_AHEAD_MONTHS), so new
# lots do not land in the default partition.
LOTS_AHEAD_MONTHS = 27

LOT_COLUMNS = (
    "id, member_id, transaction_id, origin_lot_id, root_lot_id, order_id, points, remaining,"
    " status, earned_at, activates_at, expires_at, expiry_notified_at, clawback, created_at"
)

LOT_CHECKS = (
    ("clawback_nonnegative", "clawback >= 0"),
    ("points_positive", "points > 0"),
    ("remaining_within_points", "remaining >= 0 AND remaining <= points"),
    ("status_known", "status IN ('pending', 'active', 'expired', 'moved')"),
    ("closed_lots_are_empty", "status NOT IN ('expired', 'moved') OR remaining = 0"),
)

LOT_INDEXES = (("member_id", "status", "expires_at"), ("order_id",), ("root_lot_id",))
MOVEMENT_INDEXES = (("transaction_id",), ("lot_id",))

CLAIM_LOT_KEY = """
CREATE FUNCTION rewards.claim_lot_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO rewards.points_lot_keys (id, expires_at) VALUES (NEW.id, NEW.expires_at)
    ON CONFLICT (id) DO NOTHING;
    -- The id is taken. An UPDATE of a lot's expires_at moves it to its new
    -- month as a DELETE then an INSERT (this trigger, on the destination):
    -- the lot's old row is gone by now and its key stays. A second lot with
    -- a used id, whichever partition the first is in, fails here.
    IF NOT FOUND AND EXISTS (SELECT 1 FROM rewards.points_lots WHERE id = NEW.id) THEN
        RAISE unique_violation USING
            MESSAGE = format('duplicate key value violates unique constraint "pk_points_lot_keys": lot %s', NEW.id),
            CONSTRAINT = 'pk_points_lot_keys';
    END IF;
    -- A lot written already expired below the floor (a backdated earn) lowers
    -- it, so the spend's read still finds it to expire it.
    UPDATE rewards.points_lot_expiry_floor SET expires_from = NEW.expires_at
    WHERE expires_from > NEW.expires_at;
    RETURN NEW;
END
$$
"""


# A movement's time is its transaction's. The posting statement writes it
# (now(): the statement that writes the journal row); a writer that leaves it
# out has its row routed to the default partition (a NULL key), where this
# trigger, called only then (WHEN), writes the row again with its
# transaction's time from the key table (into its month) and drops this one.
MOVEMENT_TIME = """
CREATE FUNCTION rewards.lot_movement_time() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO rewards.points_lot_movements (id, transaction_id, lot_id, amount, created_at)
    SELECT NEW.id, NEW.transaction_id, NEW.lot_id, NEW.amount, k.created_at
    FROM rewards.points_transaction_keys k WHERE k.id = NEW.transaction_id;
    IF NOT FOUND THEN
        RETURN NEW;  -- no such transaction: the foreign key refuses it
    END IF;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.execute("LOCK TABLE rewards.points_lots IN ACCESS EXCLUSIVE MODE")
    op.execute("LOCK TABLE rewards.points_lot_movements IN ACCESS EXCLUSIVE MODE")
    op.execute(
        "ALTER TABLE rewards.points_lot_movements"
        " DROP CONSTRAINT fk_points_lot_movements_lot_id_points_lots"
    )
    op.execute("ALTER TABLE rewards.points_lots RENAME TO points_lots_unpartitioned")
    op.execute(
        "ALTER TABLE rewards.points_lot_movements RENAME TO points_lot_movements_unpartitioned"
    )

    # The floor below which no lot holds points (points/repository.py): the
    # expiry job raises it, the key trigger lowers it. Starts at the lowest
    # expiry of a lot still holding points (or the earliest lot, or now).
    op.execute(
        "CREATE TABLE rewards.points_lot_expiry_floor ("
        " id boolean NOT NULL DEFAULT true, expires_from timestamptz NOT NULL,"
        " CONSTRAINT pk_points_lot_expiry_floor PRIMARY KEY (id),"
        " CONSTRAINT ck_points_lot_expiry_floor_one_row CHECK (id))"
    )
    op.execute(
        "INSERT INTO rewards.points_lot_expiry_floor (expires_from)"
        " SELECT coalesce((SELECT min(expires_at) FROM rewards.points_lots_unpartitioned"
        "  WHERE status IN ('active', 'pending') AND remaining > 0), now())"
    )

    # ---- lots ----------------------------------------------------------------
    op.execute(
        "CREATE TABLE rewards.points_lot_keys ( id uuid NOT NULL, expires_at timestamptz NOT NULL)"
    )
    op.execute(
        "CREATE TABLE rewards.points_lots ("
        " id uuid NOT NULL, member_id uuid NOT NULL, transaction_id uuid NOT NULL,"
        " origin_lot_id uuid, root_lot_id uuid NOT NULL, order_id uuid,"
        " points bigint NOT NULL, remaining bigint NOT NULL, status text NOT NULL,"
        " earned_at timestamptz NOT NULL, activates_at timestamptz,"
        " expires_at timestamptz NOT NULL, expiry_notified_at timestamptz,"
        " clawback bigint NOT NULL DEFAULT 0,"
        " created_at timestamptz NOT NULL DEFAULT now(),"
        + ", ".join(f" CONSTRAINT ck_points_lots_{name} CHECK ({sql})" for name, sql in LOT_CHECKS)
        + ") PARTITION BY RANGE (expires_at)"
    )
    op.execute("CREATE TABLE rewards.points_lots_default PARTITION OF rewards.points_lots DEFAULT")
    op.execute(
        partitions_for_rows_sql(
            "rewards",
            "points_lots",
            "expires_at",
            "points_lots_unpartitioned",
            ahead=LOTS_AHEAD_MONTHS,
        )
    )
    op.execute(
        f"INSERT INTO rewards.points_lots ({LOT_COLUMNS})"
        f" SELECT {LOT_COLUMNS} FROM rewards.points_lots_unpartitioned"
    )
    op.execute(
        "INSERT INTO rewards.points_lot_keys (id, expires_at)"
        " SELECT id, expires_at FROM rewards.points_lots_unpartitioned"
    )

    # ---- movements -----------------------------------------------------------
    # The identity's sequence has the name the new one takes: dropped first
    # (the new one continues its numbers).
    op.execute(
        "ALTER TABLE rewards.points_lot_movements_unpartitioned ALTER COLUMN id DROP IDENTITY"
    )
    op.execute("CREATE SEQUENCE rewards.points_lot_movements_id_seq AS bigint START WITH 1")
    op.execute(
        "SELECT setval('rewards.points_lot_movements_id_seq',"
        " coalesce((SELECT max(id) FROM rewards.points_lot_movements_unpartitioned), 0) + 1,"
        " false)"
    )
    op.execute(
        "CREATE TABLE rewards.points_lot_movements ("
        " id bigint NOT NULL DEFAULT nextval('rewards.points_lot_movements_id_seq'),"
        " transaction_id uuid NOT NULL, lot_id uuid NOT NULL, amount bigint NOT NULL,"
        " created_at timestamptz NOT NULL,"
        " CONSTRAINT ck_points_lot_movements_amount_nonzero CHECK (amount <> 0)"
        ") PARTITION BY RANGE (created_at)"
    )
    op.execute(
        "ALTER SEQUENCE rewards.points_lot_movements_id_seq"
        " OWNED BY rewards.points_lot_movements.id"
    )
    op.execute(
        "CREATE TABLE rewards.points_lot_movements_default"
        " PARTITION OF rewards.points_lot_movements DEFAULT"
    )
    op.execute(
        partitions_for_rows_sql(
            "rewards",
            "points_lot_movements",
            "created_at",
            "points_lot_movements_unpartitioned",
            ahead=AHEAD_MONTHS,
            rows="SELECT k.created_at FROM rewards.points_lot_movements_unpartitioned m"
            " JOIN rewards.points_transaction_keys k ON k.id = m.transaction_id",
        )
    )
    # A movement is written by its transaction's statement: its time is the
    # transaction's (the key table's created_at, one probe each, set-based).
    op.execute(
        "INSERT INTO rewards.points_lot_movements (id, transaction_id, lot_id, amount, created_at)"
        " SELECT m.id, m.transaction_id, m.lot_id, m.amount, k.created_at"
        " FROM rewards.points_lot_movements_unpartitioned m"
        " JOIN rewards.points_transaction_keys k ON k.id = m.transaction_id"
    )
    # Their primary keys and indexes go with them (the names are schema-wide).
    op.execute("DROP TABLE rewards.points_lot_movements_unpartitioned")
    op.execute("DROP TABLE rewards.points_lots_unpartitioned")

    # ---- constraints, indexes and triggers, built once -------------------------
    op.execute(
        "ALTER TABLE rewards.points_lot_keys ADD CONSTRAINT pk_points_lot_keys PRIMARY KEY (id)"
    )
    op.execute(
        "CREATE TRIGGER points_lot_keys_append_only BEFORE UPDATE OR DELETE"
        " ON rewards.points_lot_keys FOR EACH STATEMENT"
        " EXECUTE FUNCTION rewards.forbid_journal_change()"
    )
    op.execute(
        "ALTER TABLE rewards.points_lots"
        " ADD CONSTRAINT pk_points_lots PRIMARY KEY (id, expires_at),"
        " ADD CONSTRAINT fk_points_lots_transaction_id_points_transaction_keys"
        " FOREIGN KEY (transaction_id) REFERENCES rewards.points_transaction_keys (id)"
    )
    for columns in LOT_INDEXES:
        op.execute(
            f"CREATE INDEX ix_points_lots_{'_'.join(columns)}"
            f" ON rewards.points_lots ({', '.join(columns)})"
        )
    op.execute(CLAIM_LOT_KEY)
    op.execute(
        "CREATE TRIGGER points_lots_key BEFORE INSERT ON rewards.points_lots"
        " FOR EACH ROW EXECUTE FUNCTION rewards.claim_lot_key()"
    )
    op.execute(
        "ALTER TABLE rewards.points_lot_movements"
        " ADD CONSTRAINT pk_points_lot_movements PRIMARY KEY (id, created_at),"
        " ADD CONSTRAINT fk_points_lot_movements_transaction_id_points_transaction_keys"
        " FOREIGN KEY (transaction_id) REFERENCES rewards.points_transaction_keys (id),"
        " ADD CONSTRAINT fk_points_lot_movements_lot_id_points_lot_keys"
        " FOREIGN KEY (lot_id) REFERENCES rewards.points_lot_keys (id)"
    )
    for columns in MOVEMENT_INDEXES:
        op.execute(
            f"CREATE INDEX ix_points_lot_movements_{'_'.join(columns)}"
            f" ON rewards.points_lot_movements ({', '.join(columns)})"
        )
    op.execute(MOVEMENT_TIME)
    op.execute(
        "CREATE TRIGGER points_lot_movements_time BEFORE INSERT"
        " ON rewards.points_lot_movements_default"
        " FOR EACH ROW WHEN (NEW.created_at IS NULL)"
        " EXECUTE FUNCTION rewards.lot_movement_time()"
    )
    # Row-level, so every partition inherits it (a statement trigger on the
    # parent would not stop an UPDATE or DELETE aimed at a partition).
    op.execute(
        "CREATE TRIGGER points_lot_movements_append_only BEFORE UPDATE OR DELETE"
        " ON rewards.points_lot_movements FOR EACH ROW"
        " EXECUTE FUNCTION rewards.forbid_journal_change()"
    )


def downgrade() -> None:
    op.execute("LOCK TABLE rewards.points_lots IN ACCESS EXCLUSIVE MODE")
    op.execute("LOCK TABLE rewards.points_lot_movements IN ACCESS EXCLUSIVE MODE")
    op.execute("ALTER TABLE rewards.points_lots RENAME TO points_lots_partitioned")
    op.execute(
        "ALTER TABLE rewards.points_lot_movements RENAME TO points_lot_movements_partitioned"
    )
    # The plain table's identity sequence takes this name.
    op.execute(
        "ALTER SEQUENCE rewards.points_lot_movements_id_seq"
        " RENAME TO points_lot_movements_id_seq_partitioned"
    )
    op.execute("ALTER TABLE rewards.points_lots_partitioned DROP CONSTRAINT pk_points_lots")
    op.execute(
        "ALTER TABLE rewards.points_lot_movements_partitioned"
        " DROP CONSTRAINT pk_points_lot_movements"
    )
    for columns in LOT_INDEXES:
        op.execute(f"DROP INDEX rewards.ix_points_lots_{'_'.join(columns)}")
    for columns in MOVEMENT_INDEXES:
        op.execute(f"DROP INDEX rewards.ix_points_lot_movements_{'_'.join(columns)}")
    op.execute(
        "CREATE TABLE rewards.points_lots ("
        " id uuid NOT NULL CONSTRAINT pk_points_lots PRIMARY KEY,"
        " member_id uuid NOT NULL, transaction_id uuid NOT NULL"
        " CONSTRAINT fk_points_lots_transaction_id_points_transaction_keys"
        " REFERENCES rewards.points_transaction_keys (id),"
        " origin_lot_id uuid, root_lot_id uuid NOT NULL, order_id uuid,"
        " points bigint NOT NULL, remaining bigint NOT NULL, status text NOT NULL,"
        " earned_at timestamptz NOT NULL, activates_at timestamptz,"
        " expires_at timestamptz NOT NULL, expiry_notified_at timestamptz,"
        " clawback bigint NOT NULL DEFAULT 0,"
        " created_at timestamptz NOT NULL DEFAULT now(),"
        + ", ".join(f" CONSTRAINT ck_points_lots_{name} CHECK ({sql})" for name, sql in LOT_CHECKS)
        + ")"
    )
    op.execute(
        f"INSERT INTO rewards.points_lots ({LOT_COLUMNS})"
        f" SELECT {LOT_COLUMNS} FROM rewards.points_lots_partitioned"
    )
    op.execute(
        "CREATE TABLE rewards.points_lot_movements ("
        " id bigint GENERATED BY DEFAULT AS IDENTITY CONSTRAINT pk_points_lot_movements"
        " PRIMARY KEY,"
        " transaction_id uuid NOT NULL"
        " CONSTRAINT fk_points_lot_movements_transaction_id_points_transaction_keys"
        " REFERENCES rewards.points_transaction_keys (id),"
        " lot_id uuid NOT NULL CONSTRAINT fk_points_lot_movements_lot_id_points_lots"
        " REFERENCES rewards.points_lots (id),"
        " amount bigint NOT NULL,"
        " CONSTRAINT ck_points_lot_movements_amount_nonzero CHECK (amount <> 0))"
    )
    op.execute(
        "INSERT INTO rewards.points_lot_movements (id, transaction_id, lot_id, amount)"
        " SELECT id, transaction_id, lot_id, amount FROM rewards.points_lot_movements_partitioned"
        " ORDER BY id"
    )
    op.execute(
        "SELECT setval(pg_get_serial_sequence('rewards.points_lot_movements', 'id'),"
        " coalesce((SELECT max(id) FROM rewards.points_lot_movements), 0) + 1, false)"
    )
    op.execute("DROP TABLE rewards.points_lot_movements_partitioned")
    op.execute("DROP TABLE rewards.points_lots_partitioned")
    op.execute("DROP FUNCTION rewards.claim_lot_key()")
    op.execute("DROP FUNCTION rewards.lot_movement_time()")
    op.execute("DROP TABLE rewards.points_lot_keys")
    op.execute("DROP TABLE rewards.points_lot_expiry_floor")
    for columns in LOT_INDEXES:
        op.execute(
            f"CREATE INDEX ix_points_lots_{'_'.join(columns)}"
            f" ON rewards.points_lots ({', '.join(columns)})"
        )
    for columns in MOVEMENT_INDEXES:
        op.execute(
            f"CREATE INDEX ix_points_lot_movements_{'_'.join(columns)}"
            f" ON rewards.points_lot_movements ({', '.join(columns)})"
        )
    op.execute(
        "CREATE TRIGGER points_lot_movements_append_only BEFORE UPDATE OR DELETE"
        " ON rewards.points_lot_movements"
        " FOR EACH STATEMENT EXECUTE FUNCTION rewards.forbid_journal_change()"
    )
