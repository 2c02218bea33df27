"""rewards: issued coupons (coupons) are partitioned by month of expires_at
(PostgreSQL declarative RANGE partitioning); their global uniqueness (id, code,
issue_key) moves to coupon_keys, a narrow unpartitioned table that carries the
partition key (expires_at) so a lookup by code or issue key reads one
partition. The issue statements write the key and the coupon in one statement
(repository.ISSUE_SQL, BULK_ISSUE_SQL), and coupons.id references the key, so
no coupon exists without one (docs/operations.md "Partitioned tables").

Why expires_at, not issued_at: every hot read is of unexpired coupons (the
wallet's usable list, checkout, lock, redeem, the expiry reminders) and is
bounded by `expires_at > now`, which prunes every past month; and a month of
expiry is retention of long-dead coupons, so detaching it equals archiving
coupons no read wants (services/rewards/partitions.py). The key never changes
(a status change updates the row in place, in its partition); should an
operator change expires_at, the row moves partition and a trigger keeps the
key's copy in step.

Existing rows are moved in this migration's transaction: the table is renamed,
the partitioned table created with a partition per month of expiry the rows
have (and this month and three ahead, and a default), rows and their keys
copied set-based, then the constraints, indexes and foreign keys built once,
and the old table dropped. Lock: ACCESS EXCLUSIVE on coupons for the whole
copy (issues, checkouts with coupons and wallet reads wait); SHARE ROW
EXCLUSIVE on orders while the order foreign key is validated.

Revision ID: 0017_rewards_coupon_partitions
Revises: 0016_rewards_dedupe_partitions
Create Date: 2026-12-05 04:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

from servicekit.partition_migrations import partitions_for_rows_sql

revision: str = "0017_rewards_coupon_partitions"
down_revision: str | None = "0016_rewards_dedupe_partitions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    "id, code, template_id, template_version, member_id, reason, issued_by, issue_key,"
    " request_hash, status, issued_at, valid_from, expires_at, lock_store_id,"
    " lock_pos_transaction_id, locked_until, order_id, redeemed_at, discount_fen, issued_to,"
    " merge_id, expiry_notified_at, seq, revoked_at, revoked_by, revoke_reason"
)

# Non-unique indexes both shapes carry: (name, columns).
INDEXES = (
    ("ix_coupons_member_id_status_expires_at", "member_id, status, expires_at"),
    ("ix_coupons_status_expires_at", "status, expires_at"),
    ("ix_coupons_template_id_status", "template_id, status"),
    ("ix_coupons_order_id", "order_id"),
    ("ix_coupons_issued_at", "issued_at"),
    ("ix_coupons_redeemed_at", "redeemed_at"),
)

CHECKS = (
    " CONSTRAINT ck_coupons_status_known"
    " CHECK (status IN ('available', 'locked', 'used', 'expired', 'revoked')),"
    " CONSTRAINT ck_coupons_locked_has_deadline"
    " CHECK ((status = 'locked') = (locked_until IS NOT NULL)),"
    " CONSTRAINT ck_coupons_used_has_order"
    " CHECK (status <> 'used' OR (order_id IS NOT NULL AND discount_fen >= 0)),"
    " CONSTRAINT ck_coupons_validity_window CHECK (expires_at > valid_from),"
    " CONSTRAINT ck_coupons_request_hash_sha256 CHECK (octet_length(request_hash) = 32)"
)


def _table_sql(seq: str, tail: str) -> str:
    return (
        "CREATE TABLE rewards.coupons ("
        " id uuid NOT NULL, code text NOT NULL, template_id text NOT NULL,"
        " template_version integer NOT NULL, member_id uuid NOT NULL, reason text NOT NULL,"
        " issued_by text NOT NULL DEFAULT '', issue_key text NOT NULL,"
        " request_hash bytea NOT NULL, status text NOT NULL DEFAULT 'available',"
        " issued_at timestamptz NOT NULL, valid_from timestamptz NOT NULL,"
        " expires_at timestamptz NOT NULL, lock_store_id text, lock_pos_transaction_id text,"
        " locked_until timestamptz, order_id uuid, redeemed_at timestamptz,"
        " discount_fen bigint, issued_to uuid NOT NULL, merge_id text,"
        f" expiry_notified_at timestamptz, seq {seq},"
        " revoked_at timestamptz, revoked_by text, revoke_reason text,"
        f"{CHECKS}){tail}"
    )


# An operator's change of a coupon's expiry moves the row to its new month; the
# key's copy follows, or a lookup by code would probe the old month. BEFORE
# UPDATE: it fires on the row's old partition even when the update moves it
# (a move is a DELETE and an INSERT, which AFTER UPDATE triggers do not see).
KEY_EXPIRY = """
CREATE FUNCTION rewards.coupon_key_expiry() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE rewards.coupon_keys SET expires_at = NEW.expires_at WHERE id = NEW.id;
    RETURN NEW;
END
$$
"""


def upgrade() -> None:
    op.execute("LOCK TABLE rewards.coupons IN ACCESS EXCLUSIVE MODE")
    op.execute("ALTER TABLE rewards.coupons RENAME TO coupons_unpartitioned")
    # Constraint and index names are schema-wide: free them for the new table.
    for name in (
        "pk_coupons",
        "uq_coupons_code",
        "uq_coupons_issue_key",
        "uq_coupons_seq",
        "fk_coupons_order_id_orders",
    ):
        op.execute(f"ALTER TABLE rewards.coupons_unpartitioned DROP CONSTRAINT {name}")
    for name, _ in INDEXES:
        op.execute(f"DROP INDEX rewards.{name}")
    op.execute(
        "CREATE TABLE rewards.coupon_keys (id uuid NOT NULL, code text NOT NULL,"
        " issue_key text NOT NULL, expires_at timestamptz NOT NULL)"
    )
    # One sequence for every partition (the wallet's cursor), continuing the
    # identity's numbers so cursors handed out stay valid.
    op.execute("CREATE SEQUENCE rewards.coupons_seq AS bigint START WITH 1")
    op.execute(
        "SELECT setval('rewards.coupons_seq',"
        " coalesce((SELECT max(seq) FROM rewards.coupons_unpartitioned), 0) + 1, false)"
    )
    op.execute(
        _table_sql(
            "bigint NOT NULL DEFAULT nextval('rewards.coupons_seq')",
            " PARTITION BY RANGE (expires_at)",
        )
    )
    op.execute("ALTER SEQUENCE rewards.coupons_seq OWNED BY rewards.coupons.seq")
    op.execute("CREATE TABLE rewards.coupons_default PARTITION OF rewards.coupons DEFAULT")
    op.execute(partitions_for_rows_sql("rewards", "coupons", "expires_at", "coupons_unpartitioned"))
    op.execute(
        f"INSERT INTO rewards.coupons ({COLUMNS})"
        f" SELECT {COLUMNS} FROM rewards.coupons_unpartitioned"
    )
    op.execute(
        "INSERT INTO rewards.coupon_keys (id, code, issue_key, expires_at)"
        " SELECT id, code, issue_key, expires_at FROM rewards.coupons_unpartitioned"
    )
    op.execute("DROP TABLE rewards.coupons_unpartitioned")
    # Built once over the copied rows (sorted), not row by row.
    op.execute(
        "ALTER TABLE rewards.coupon_keys ADD CONSTRAINT pk_coupon_keys PRIMARY KEY (id),"
        " ADD CONSTRAINT uq_coupon_keys_code UNIQUE (code),"
        " ADD CONSTRAINT uq_coupon_keys_issue_key UNIQUE (issue_key)"
    )
    op.execute(
        "ALTER TABLE rewards.coupons ADD CONSTRAINT pk_coupons PRIMARY KEY (id, expires_at),"
        " ADD CONSTRAINT fk_coupons_order_id_orders FOREIGN KEY (order_id)"
        " REFERENCES rewards.orders (id),"
        " ADD CONSTRAINT fk_coupons_id_coupon_keys FOREIGN KEY (id)"
        " REFERENCES rewards.coupon_keys (id)"
    )
    for name, columns in INDEXES:
        op.execute(f"CREATE INDEX {name} ON rewards.coupons ({columns})")
    op.execute(KEY_EXPIRY)
    op.execute(
        "CREATE TRIGGER coupons_key_expiry BEFORE UPDATE OF expires_at ON rewards.coupons"
        " FOR EACH ROW WHEN (OLD.expires_at IS DISTINCT FROM NEW.expires_at)"
        " EXECUTE FUNCTION rewards.coupon_key_expiry()"
    )


def downgrade() -> None:
    op.execute("LOCK TABLE rewards.coupons IN ACCESS EXCLUSIVE MODE")
    op.execute("ALTER TABLE rewards.coupons RENAME TO coupons_partitioned")
    for name in ("pk_coupons", "fk_coupons_order_id_orders", "fk_coupons_id_coupon_keys"):
        op.execute(f"ALTER TABLE rewards.coupons_partitioned DROP CONSTRAINT {name}")
    for name, _ in INDEXES:
        op.execute(f"DROP INDEX rewards.{name}")
    op.execute(_table_sql("bigint GENERATED BY DEFAULT AS IDENTITY", ""))
    op.execute(
        f"INSERT INTO rewards.coupons ({COLUMNS})"
        f" SELECT {COLUMNS} FROM rewards.coupons_partitioned ORDER BY seq"
    )
    op.execute(
        "SELECT setval(pg_get_serial_sequence('rewards.coupons', 'seq'),"
        " coalesce((SELECT max(seq) FROM rewards.coupons), 0) + 1, false)"
    )
    op.execute("DROP TABLE rewards.coupons_partitioned")
    op.execute("DROP FUNCTION rewards.coupon_key_expiry()")
    op.execute("DROP TABLE rewards.coupon_keys")
    op.execute(
        "ALTER TABLE rewards.coupons ADD CONSTRAINT pk_coupons PRIMARY KEY (id),"
        " ADD CONSTRAINT uq_coupons_code UNIQUE (code),"
        " ADD CONSTRAINT uq_coupons_issue_key UNIQUE (issue_key),"
        " ADD CONSTRAINT uq_coupons_seq UNIQUE (seq),"
        " ADD CONSTRAINT fk_coupons_order_id_orders FOREIGN KEY (order_id)"
        " REFERENCES rewards.orders (id)"
    )
    for name, columns in INDEXES:
        op.execute(f"CREATE INDEX {name} ON rewards.coupons ({columns})")
