"""Tables of the rewards schema (Alembic reads this; queries live in each context's repository.py).

CHECK constraints are declared here for the record and written by hand in the
migrations (Alembic does not compare them). The points journal is append-only:
migration 0001 adds triggers that reject UPDATE and DELETE on it; migration
0009 adds a deferred constraint trigger that refuses, at commit, a transaction
whose entries do not sum to zero.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from servicekit.tables import add_event_tables, service_metadata

SCHEMA = "rewards"

TRANSACTION_KINDS = (
    "earn",
    "redeem",
    "expire",
    "refund",
    "hold",
    "hold_post",
    "hold_void",
    "adjust",
    "activate",
    "merge",
    "unmerge",
)
# Accounts held per member (entries carry member_id) ...
MEMBER_ACCOUNTS = ("member_wallet", "member_pending", "member_held", "member_debt")
# ... and the brand's side.
ACCOUNTS = (*MEMBER_ACCOUNTS, "issued_liability", "redeemed", "expired", "adjustments")
metadata = service_metadata(SCHEMA)


def created_at() -> Column[object]:
    """When the row was written (each table needs its own Column object)."""
    return Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now())


stores = Table(
    "stores",
    metadata,
    # Brand store code, e.g. "SH001"; POS systems send it with every order.
    Column("store_id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("city", Text, nullable=False),
    Column("address", Text, nullable=False),
    # WGS-84 degrees; 6 decimals is ~0.1 m, plenty for "stores within 3 km".
    Column("latitude", Numeric(9, 6), nullable=False),
    Column("longitude", Numeric(9, 6), nullable=False),
    Column("status", Text, nullable=False, server_default="active"),
    # IANA zone of the store's clock (quiet hours, business day; migration 0011).
    Column("time_zone", Text, nullable=False, server_default="Asia/Shanghai"),
    created_at(),
    CheckConstraint("char_length(store_id) BETWEEN 1 AND 32", name="store_id_length"),
    CheckConstraint("status IN ('active', 'closed')", name="status_known"),
    CheckConstraint("latitude BETWEEN -90 AND 90", name="latitude_range"),
    CheckConstraint("longitude BETWEEN -180 AND 180", name="longitude_range"),
)

# Global uniqueness of orders (id; (store_id, pos_transaction_id), the
# idempotency key of CompleteOrder) and the target of every foreign key to an
# order: orders are partitioned by time, and PostgreSQL's unique indexes on a
# partitioned table must contain the partition key. The claim writes the key
# and the order in one statement (orders/repository.py CLAIM_ORDER_SQL); a
# BEFORE INSERT trigger on orders writes it for any other INSERT (migration
# 0017). Append-only.
order_keys = Table(
    "order_keys",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("store_id", Text, nullable=False),
    Column("pos_transaction_id", Text, nullable=False),
    # The order's created_at: which partition holds it.
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("store_id", "pos_transaction_id"),
)

# One row per POS order. Partitioned by month of created_at (the database's
# clock, migration 0018; partitions made ahead by `python -m services.rewards
# partitions ensure`, docs/operations.md "Partitioned tables").
orders = Table(
    "orders",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("store_id", Text, ForeignKey(stores.c.store_id), nullable=False),
    Column("pos_transaction_id", Text, nullable=False),
    Column("member_id", Uuid, nullable=False),
    Column("channel", Text, nullable=False),
    Column("paid_amount_fen", BigInteger, nullable=False),
    # NULL when the till did not report a list price.
    Column("gross_amount_fen", BigInteger),
    Column("lines", JSONB, nullable=False, server_default="[]"),
    Column("ordered_at", DateTime(timezone=True), nullable=False),
    # SHA-256 of the canonical request: a retry must match it (domain.request_hash).
    Column("request_hash", LargeBinary, nullable=False),
    Column("points_earned", BigInteger, nullable=False),
    # Balance right after this order, replayed verbatim to retries. Set by the
    # same transaction that inserts the row, so never NULL once committed.
    Column("points_balance_after", BigInteger),
    # Points spent on this order (a discount the till applied); 0 when none.
    Column("points_redeemed", BigInteger, nullable=False, server_default="0"),
    # Fen taken off by the order's coupons (rewards computes it; the till's
    # paid amount must agree).
    Column("coupon_discount_fen", BigInteger, nullable=False, server_default="0"),
    # settled, or rejected (a stored refusal, replayed to retries like a result).
    Column("status", Text, nullable=False, server_default="settled"),
    Column("rejection", JSONB),
    # The partition key (with id, the primary key: PostgreSQL requires it there).
    Column(
        "created_at",
        DateTime(timezone=True),
        primary_key=True,
        nullable=False,
        server_default=func.now(),
    ),
    # The idempotency key of CompleteOrder is unique in order_keys.
    Index(None, "member_id", "ordered_at"),
    CheckConstraint(
        "char_length(pos_transaction_id) BETWEEN 1 AND 64", name="pos_transaction_id_length"
    ),
    CheckConstraint("channel IN ('store', 'mini_program', 'delivery')", name="channel_known"),
    CheckConstraint("paid_amount_fen >= 0", name="paid_amount_nonnegative"),
    CheckConstraint(
        "gross_amount_fen IS NULL OR gross_amount_fen >= paid_amount_fen",
        name="gross_not_below_paid",
    ),
    CheckConstraint("jsonb_typeof(lines) = 'array'", name="lines_is_array"),
    CheckConstraint("octet_length(request_hash) = 32", name="request_hash_sha256"),
    CheckConstraint("points_earned >= 0", name="points_earned_nonnegative"),
    CheckConstraint("points_redeemed >= 0", name="points_redeemed_nonnegative"),
    CheckConstraint("coupon_discount_fen >= 0", name="coupon_discount_nonnegative"),
    CheckConstraint("status IN ('settled', 'rejected')", name="status_known"),
    # The dashboards' range scans (servicekit/metrics_definitions.py).
    Index(None, "ordered_at"),
    postgresql_partition_by="RANGE (created_at)",
)

# Global uniqueness of the journal (id, idempotency key) and the target of every
# foreign key to it: the journal is partitioned by time, and PostgreSQL's unique
# indexes on a partitioned table must contain the partition key. A BEFORE INSERT
# trigger on points_transactions writes this row in the same statement
# (migration 0013); append-only like the journal.
points_transaction_keys = Table(
    "points_transaction_keys",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("idempotency_key", Text, nullable=False, unique=True),
    # The journal row's created_at: which partition holds it.
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# Double-entry points journal: one row per movement, its entries sum to zero.
# Partitioned by month of created_at (migration 0013; partitions made ahead by
# `python -m services.rewards partitions ensure`, docs/operations.md).
points_transactions = Table(
    "points_transactions",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("member_id", Uuid, nullable=False, index=True),
    Column("kind", Text, nullable=False),
    Column("order_id", Uuid, ForeignKey(order_keys.c.id), index=True),
    # One transaction per business fact (e.g. "earn:<order id>"), whoever
    # retries: unique in points_transaction_keys.
    Column("idempotency_key", Text, nullable=False),
    # Magnitude of the movement; the entries carry the signs.
    Column("amount", BigInteger, nullable=False),
    # The earning rule (name, rate, rounding) that produced the amount.
    Column("rule", JSONB, nullable=False),
    # The partition key (with id, the primary key: PostgreSQL requires it there).
    Column(
        "created_at",
        DateTime(timezone=True),
        primary_key=True,
        nullable=False,
        server_default=func.now(),
    ),
    # Commit-independent order of a member's history (cursor pagination); one
    # sequence for every partition, so unique without a global index.
    Column(
        "seq",
        BigInteger,
        nullable=False,
        server_default=text("nextval('rewards.points_transactions_seq'::regclass)"),
    ),
    # The other member of a merge/unmerge (its wallet entries are in this transaction).
    Column("counterpart_member_id", Uuid, index=True),
    # What the operation refers to: a refund id, a hold id, a caller's reference.
    Column("reference", Text),
    # Manual adjustments: who did it and why (both required for kind 'adjust').
    Column("operator_id", Text),
    Column("reason", Text),
    Index(None, "member_id", "seq"),
    CheckConstraint(
        f"kind IN ({', '.join(repr(k) for k in TRANSACTION_KINDS)})", name="kind_known"
    ),
    CheckConstraint("amount > 0", name="amount_positive"),
    CheckConstraint(
        "kind <> 'adjust' OR (operator_id IS NOT NULL AND reason IS NOT NULL)",
        name="adjust_has_operator_and_reason",
    ),
    # The dashboards' range scans (servicekit/metrics_definitions.py).
    Index(None, "created_at"),
    postgresql_partition_by="RANGE (created_at)",
)

points_entries = Table(
    "points_entries",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column(
        "transaction_id", Uuid, ForeignKey(points_transaction_keys.c.id), nullable=False, index=True
    ),
    # member_wallet: the member's spendable points (+ credits the member);
    # issued_liability: the brand's side of every point issued.
    Column("account", Text, nullable=False),
    Column("member_id", Uuid, index=True),
    Column("amount", BigInteger, nullable=False),
    CheckConstraint(f"account IN ({', '.join(repr(a) for a in ACCOUNTS)})", name="account_known"),
    CheckConstraint("amount <> 0", name="amount_nonzero"),
    CheckConstraint(
        f"account NOT IN ({', '.join(repr(a) for a in MEMBER_ACCOUNTS)}) OR member_id IS NOT NULL",
        name="wallet_has_member",
    ),
)

# Projection of the journal, updated in the transaction that writes the entries.
points_balances = Table(
    "points_balances",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    Column("available", BigInteger, nullable=False, server_default="0"),
    Column("lifetime_earned", BigInteger, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Earned but not yet spendable (refund window).
    Column("pending", BigInteger, nullable=False, server_default="0"),
    # Reserved by open holds.
    Column("held", BigInteger, nullable=False, server_default="0"),
    # Owed after a refund reversed points already spent; later earns repay it first.
    Column("debt", BigInteger, nullable=False, server_default="0"),
    CheckConstraint("available >= 0", name="available_nonnegative"),
    CheckConstraint("lifetime_earned >= 0", name="lifetime_earned_nonnegative"),
    CheckConstraint("pending >= 0", name="pending_nonnegative"),
    CheckConstraint("held >= 0", name="held_nonnegative"),
    CheckConstraint("debt >= 0", name="debt_nonnegative"),
)

# Global uniqueness of lot ids and the target of the movements' foreign key:
# the lots are partitioned by expires_at, and PostgreSQL's unique indexes on a
# partitioned table must contain the partition key. A BEFORE INSERT trigger on
# points_lots writes this row in the same statement (migration 0020);
# append-only.
points_lot_keys = Table(
    "points_lot_keys",
    metadata,
    Column("id", Uuid, primary_key=True),
    # The lot's expires_at: which partition holds it.
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

# One row: no lot expiring before `expires_from` holds points. The spend's
# read of a member's lots is bounded by it (the lots' partitions before it are
# pruned); the expiry job raises it (to at most a month before its clock), the
# lots' key trigger lowers it for a lot written below it, a hold's void for a
# lapsed lot it revives (migration 0020, points/repository.py).
points_lot_expiry_floor = Table(
    "points_lot_expiry_floor",
    metadata,
    Column("id", Boolean, primary_key=True, server_default=text("true")),
    Column("expires_from", DateTime(timezone=True), nullable=False),
    CheckConstraint("id", name="one_row"),
)

# Each credit is a lot with its own expiry; `remaining` is a projection of the
# lot movements (points + sum(movements) = remaining, checked by the audit).
# Partitioned by month of expires_at (migration 0017), which never changes:
# a lot never moves between partitions.
points_lots = Table(
    "points_lots",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("member_id", Uuid, nullable=False),
    # The transaction that created the lot (earn, adjust, merge, unmerge).
    Column("transaction_id", Uuid, ForeignKey(points_transaction_keys.c.id), nullable=False),
    # The lot this one was moved from (merge/unmerge) and the first lot of the chain.
    Column("origin_lot_id", Uuid),
    Column("root_lot_id", Uuid, nullable=False, index=True),
    Column("order_id", Uuid, index=True),
    Column("points", BigInteger, nullable=False),
    Column("remaining", BigInteger, nullable=False),
    # pending -> active -> (expired | moved); spent lots stay active at 0.
    Column("status", Text, nullable=False),
    Column("earned_at", DateTime(timezone=True), nullable=False),
    Column("activates_at", DateTime(timezone=True)),
    # The partition key (with id, the primary key: PostgreSQL requires it there).
    Column("expires_at", DateTime(timezone=True), primary_key=True, nullable=False),
    # Set once PointsExpiringSoon was emitted for this lot.
    Column("expiry_notified_at", DateTime(timezone=True)),
    # Points a refund claimed from this lot while an open hold had them: a
    # void of that hold reverses them, a post settles the claim.
    Column("clawback", BigInteger, nullable=False, server_default="0"),
    created_at(),
    Index(None, "member_id", "status", "expires_at"),
    CheckConstraint("clawback >= 0", name="clawback_nonnegative"),
    CheckConstraint("points > 0", name="points_positive"),
    CheckConstraint("remaining >= 0 AND remaining <= points", name="remaining_within_points"),
    CheckConstraint("status IN ('pending', 'active', 'expired', 'moved')", name="status_known"),
    CheckConstraint(
        "status NOT IN ('expired', 'moved') OR remaining = 0", name="closed_lots_are_empty"
    ),
    postgresql_partition_by="RANGE (expires_at)",
)

# Which lots each transaction touched, and by how much (append-only).
# Partitioned by month of created_at: the time of the transaction that wrote
# the movement (the same statement's now(); migration 0017).
points_lot_movements = Table(
    "points_lot_movements",
    metadata,
    # One sequence for every partition, so unique without a global index.
    Column(
        "id",
        BigInteger,
        primary_key=True,
        server_default=text("nextval('rewards.points_lot_movements_id_seq'::regclass)"),
    ),
    Column(
        "transaction_id", Uuid, ForeignKey(points_transaction_keys.c.id), nullable=False, index=True
    ),
    Column("lot_id", Uuid, ForeignKey(points_lot_keys.c.id), nullable=False, index=True),
    Column("amount", BigInteger, nullable=False),
    # The transaction's created_at: written by the posting statement (now()),
    # else by trigger from points_transaction_keys. The partition key.
    Column("created_at", DateTime(timezone=True), primary_key=True, nullable=False),
    CheckConstraint("amount <> 0", name="amount_nonzero"),
    postgresql_partition_by="RANGE (created_at)",
)

# Idempotency of every non-order write: the caller's key, the hash of its
# request and the stored outcome (a result or a rejection), replayed to retries.
ledger_requests = Table(
    "ledger_requests",
    metadata,
    Column("idempotency_key", Text, primary_key=True),
    Column("operation", Text, nullable=False),
    Column("request_hash", LargeBinary, nullable=False),
    # NULL while the claiming transaction is still running (never visible committed).
    Column("outcome", Text),
    Column("response", JSONB),
    created_at(),
    CheckConstraint("octet_length(request_hash) = 32", name="request_hash_sha256"),
    CheckConstraint("outcome IS NULL OR outcome IN ('ok', 'rejected')", name="outcome_known"),
)

refunds = Table(
    "refunds",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("order_id", Uuid, ForeignKey(order_keys.c.id), nullable=False, index=True),
    Column("store_id", Text, nullable=False),
    # The POS's id of the refund; with store_id, the idempotency key.
    Column("refund_transaction_id", Text, nullable=False),
    Column("refunded_amount_fen", BigInteger, nullable=False),
    # Points this refund had to take back (proportional), of which:
    Column("points_due", BigInteger, nullable=False),
    # taken out of the order's lot,
    Column("points_reversed", BigInteger, nullable=False),
    # booked as debt (policy "debt"), or reported and forgiven (policy "report").
    Column("points_debt", BigInteger, nullable=False),
    Column("points_shortfall", BigInteger, nullable=False),
    # Points the order redeemed, given back in proportion (original expiry).
    Column("points_restored", BigInteger, nullable=False, server_default="0"),
    Column("transaction_id", Uuid, ForeignKey(points_transaction_keys.c.id)),
    created_at(),
    UniqueConstraint("store_id", "refund_transaction_id"),
    # 0 only for an order nothing was paid on, refunded in full (migration 0009).
    CheckConstraint("refunded_amount_fen >= 0", name="refunded_amount_nonnegative"),
    CheckConstraint(
        "points_due = points_reversed + points_debt + points_shortfall", name="points_add_up"
    ),
    CheckConstraint(
        "points_reversed >= 0 AND points_debt >= 0 AND points_shortfall >= 0"
        " AND points_restored >= 0",
        name="points_nonnegative",
    ),
)

# Balance checkpoints (migration 0015, points/checkpoint.py): the ledger audit
# re-sums the journal from the latest month boundary checkpointed, so journal
# partitions before it can be archived. Append-only like the journal.
points_checkpoints = Table(
    "points_checkpoints",
    metadata,
    # A month boundary (UTC): the checkpoint covers every transaction before it.
    Column("as_of", DateTime(timezone=True), primary_key=True),
    # The checkpoint this one was summed from (None: from the first transaction).
    Column("previous", DateTime(timezone=True)),
    Column("members", BigInteger, nullable=False),
    Column("lots", BigInteger, nullable=False),
    created_at(),
    CheckConstraint(
        "as_of = date_trunc('month', as_of AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
        name="month_boundary",
    ),
    CheckConstraint("previous IS NULL OR previous < as_of", name="after_previous"),
)

# Each member's journal figures at as_of (the audit's signs); all-zero omitted.
points_checkpoint_balances = Table(
    "points_checkpoint_balances",
    metadata,
    Column(
        "as_of", DateTime(timezone=True), ForeignKey(points_checkpoints.c.as_of), primary_key=True
    ),
    Column("member_id", Uuid, primary_key=True),
    Column("available", BigInteger, nullable=False),
    Column("pending", BigInteger, nullable=False),
    Column("held", BigInteger, nullable=False),
    Column("debt", BigInteger, nullable=False),
    Column("lifetime_earned", BigInteger, nullable=False),
)

# Each lot's opening value at as_of: its points if created before, plus its
# movements before; zero omitted.
points_checkpoint_lots = Table(
    "points_checkpoint_lots",
    metadata,
    Column(
        "as_of", DateTime(timezone=True), ForeignKey(points_checkpoints.c.as_of), primary_key=True
    ),
    Column("lot_id", Uuid, primary_key=True),
    Column("opening", BigInteger, nullable=False),
)

# Journal partitions detached into rewards_archive (a refund of an order whose
# journal rows are there is refused: REFUND_JOURNAL_ARCHIVED).
points_journal_archive = Table(
    "points_journal_archive",
    metadata,
    Column("partition", Text, primary_key=True),
    Column("lower", DateTime(timezone=True), nullable=False),
    Column("upper", DateTime(timezone=True), nullable=False, index=True),
    Column("archived_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("lower < upper", name="range"),
)

# Two-phase reservations: held -> posted | voided | expired, exactly once.
points_holds = Table(
    "points_holds",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("member_id", Uuid, nullable=False, index=True),
    Column("points", BigInteger, nullable=False),
    Column("status", Text, nullable=False),
    Column("reference", Text),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("transaction_id", Uuid, ForeignKey(points_transaction_keys.c.id), nullable=False),
    Column("resolution_transaction_id", Uuid, ForeignKey(points_transaction_keys.c.id)),
    created_at(),
    Column("resolved_at", DateTime(timezone=True)),
    Index(None, "status", "expires_at"),
    CheckConstraint("points > 0", name="points_positive"),
    CheckConstraint("status IN ('held', 'posted', 'voided', 'expired')", name="status_known"),
    CheckConstraint(
        "(status = 'held') = (resolution_transaction_id IS NULL)", name="resolved_once"
    ),
)

# Coupons (coupons/repository.py; rules in coupons/domain.py). A template's current
# terms are denormalised here for listing; every version's terms are kept in
# coupon_template_versions and an issued coupon points at its version.
COUPON_KINDS = ("amount_off", "percent_off", "free_item", "fixed_price", "first_order_price")
COUPON_STATUSES = ("available", "locked", "used", "expired", "revoked")

coupon_templates = Table(
    "coupon_templates",
    metadata,
    Column("template_id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("kind", Text, nullable=False),
    # The current version's terms (coupons.Terms.doc()).
    Column("spec", JSONB, nullable=False, server_default="{}"),
    # NULL: unlimited. The live count is the sum of coupon_stock shards.
    Column("total_stock", BigInteger),
    Column("status", Text, nullable=False, server_default="active"),
    created_at(),
    Column("version", Integer, nullable=False, server_default="1"),
    Column("per_member_limit", BigInteger),
    Column("daily_budget", BigInteger),
    Column("stock_shards", Integer, nullable=False, server_default="1"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint(
        f"kind IN ({', '.join(repr(k) for k in COUPON_KINDS)})",
        name="kind_known",
    ),
    CheckConstraint("status IN ('draft', 'active', 'paused', 'ended')", name="status_known"),
    CheckConstraint("jsonb_typeof(spec) = 'object'", name="spec_is_object"),
    CheckConstraint("total_stock IS NULL OR total_stock >= 0", name="total_stock_nonnegative"),
    CheckConstraint("per_member_limit IS NULL OR per_member_limit > 0", name="limit_positive"),
    CheckConstraint("daily_budget IS NULL OR daily_budget > 0", name="budget_positive"),
    CheckConstraint("stock_shards BETWEEN 1 AND 64", name="shards_range"),
)

coupon_template_versions = Table(
    "coupon_template_versions",
    metadata,
    Column("template_id", Text, ForeignKey(coupon_templates.c.template_id), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("terms", JSONB, nullable=False),
    Column("created_by", Text, nullable=False, server_default=""),
    created_at(),
)

# Stock as N counter rows per template: a claim decrements one shard with a
# conditional UPDATE (remaining > 0), so concurrent claims spread over rows and
# the CHECK makes over-issue impossible whatever the code does.
coupon_stock = Table(
    "coupon_stock",
    metadata,
    Column("template_id", Text, ForeignKey(coupon_templates.c.template_id), primary_key=True),
    Column("shard", Integer, primary_key=True),
    Column("remaining", BigInteger, nullable=False),
    CheckConstraint("remaining >= 0", name="remaining_nonnegative"),
)

# Coupons issued per member and template (the per-member limit), and per
# template and business day (the daily budget); incremented only below the limit.
coupon_member_counts = Table(
    "coupon_member_counts",
    metadata,
    Column("template_id", Text, primary_key=True),
    Column("member_id", Uuid, primary_key=True),
    Column("issued", BigInteger, nullable=False),
    CheckConstraint("issued >= 0", name="issued_nonnegative"),
)

coupon_daily_counts = Table(
    "coupon_daily_counts",
    metadata,
    Column("template_id", Text, primary_key=True),
    Column("day", Date, primary_key=True),
    Column("issued", BigInteger, nullable=False),
    CheckConstraint("issued >= 0", name="issued_nonnegative"),
)

# Global uniqueness of issued coupons (id, code, issue key) and the target of
# every foreign key to a coupon: coupons is partitioned by month of expires_at,
# and PostgreSQL's unique indexes on a partitioned table must contain the
# partition key. The issue statements write this row and the coupon in one
# statement (coupons/repository.py ISSUE_SQL, BULK_ISSUE_SQL; migration 0017).
# It carries the coupon's expires_at, so a lookup by code or issue key reads
# the one partition that holds the coupon.
coupon_keys = Table(
    "coupon_keys",
    metadata,
    Column("id", Uuid, primary_key=True),
    # What the member shows and the cashier types (coupons.new_code).
    Column("code", Text, nullable=False, unique=True),
    # The caller's idempotency key (IssueCoupon's ON CONFLICT (issue_key)).
    Column("issue_key", Text, nullable=False, unique=True),
    # The coupon's partition key (kept in step by the coupons_key_expiry trigger).
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

# Partitioned by month of expires_at (migration 0017; partitions made ahead by
# `python -m services.rewards partitions ensure`, docs/operations.md
# "Partitioned tables"); code and issue_key are unique in coupon_keys.
coupons = Table(
    "coupons",
    metadata,
    Column("id", Uuid, ForeignKey(coupon_keys.c.id), primary_key=True),
    Column("code", Text, nullable=False),
    Column("template_id", Text, nullable=False),
    Column("template_version", Integer, nullable=False),
    Column("member_id", Uuid, nullable=False),
    Column("reason", Text, nullable=False),
    Column("issued_by", Text, nullable=False, server_default=""),
    # The caller's idempotency key, and the hash of what it asked for.
    Column("issue_key", Text, nullable=False),
    Column("request_hash", LargeBinary, nullable=False),
    Column("status", Text, nullable=False, server_default="available"),
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("valid_from", DateTime(timezone=True), nullable=False),
    # The partition key (with id, the primary key: PostgreSQL requires it there).
    Column("expires_at", DateTime(timezone=True), primary_key=True, nullable=False),
    # The order holding the lock, and until when (a lapsed lock is free again).
    Column("lock_store_id", Text),
    Column("lock_pos_transaction_id", Text),
    Column("locked_until", DateTime(timezone=True)),
    Column("order_id", Uuid, ForeignKey(order_keys.c.id)),
    Column("redeemed_at", DateTime(timezone=True)),
    Column("discount_fen", BigInteger),
    # Merge: the member it was issued to, and the merge that moved it.
    Column("issued_to", Uuid, nullable=False),
    Column("merge_id", Text),
    Column("expiry_notified_at", DateTime(timezone=True)),
    # The wallet's cursor: one sequence for every partition, so unique without
    # a global index.
    Column(
        "seq",
        BigInteger,
        nullable=False,
        server_default=text("nextval('rewards.coupons_seq'::regclass)"),
    ),
    Index(None, "member_id", "status", "expires_at"),
    Index(None, "status", "expires_at"),
    Index(None, "template_id", "status"),
    Index(None, "order_id"),
    # An operator took the coupon back (status 'revoked', migration 0010).
    Column("revoked_at", DateTime(timezone=True)),
    Column("revoked_by", Text),
    Column("revoke_reason", Text),
    CheckConstraint(
        f"status IN ({', '.join(repr(s) for s in COUPON_STATUSES)})", name="status_known"
    ),
    CheckConstraint("(status = 'locked') = (locked_until IS NOT NULL)", name="locked_has_deadline"),
    CheckConstraint(
        "status <> 'used' OR (order_id IS NOT NULL AND discount_fen >= 0)", name="used_has_order"
    ),
    CheckConstraint("expires_at > valid_from", name="validity_window"),
    CheckConstraint("octet_length(request_hash) = 32", name="request_hash_sha256"),
    # The dashboards' range scans (servicekit/metrics_definitions.py).
    Index(None, "issued_at"),
    # The dashboards' range scans (servicekit/metrics_definitions.py).
    Index(None, "redeemed_at"),
    postgresql_partition_by="RANGE (expires_at)",
)

# Local projection of tiering's TierChanged events: the tier multiplier at
# checkout is read here, never by a call to tiering on the hot path.
member_tiers = Table(
    "member_tiers",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    Column("tier_code", Text, nullable=False),
    # The event's changed_at: an older event never overwrites a newer tier.
    Column("changed_at", DateTime(timezone=True), nullable=False),
    # The tier's points multiplier from the event (10000 = x1); NULL when the
    # event carried none: the configured multiplier of tier_code applies.
    Column("points_multiplier_bp", Integer),
    CheckConstraint(
        "points_multiplier_bp IS NULL OR points_multiplier_bp > 0", name="multiplier_positive"
    ),
)

# Members erased by OneID (MemberErased). Rewards holds no personal data beyond
# member ids (the journal, orders and lots are financial records and stay), so
# the erasure is recorded and later writes for these members are refused.
erased_members = Table(
    "erased_members",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    # The event's erased_at (first delivery wins).
    Column("erased_at", DateTime(timezone=True), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# Points granted per member, per capped rule, per period (daily caps, action caps).
earn_counters = Table(
    "earn_counters",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    Column("counter", Text, primary_key=True),
    Column("period_start", DateTime(timezone=True), primary_key=True),
    Column("points", BigInteger, nullable=False),
    Column("actions", BigInteger, nullable=False, server_default="0"),
    CheckConstraint("points >= 0", name="points_nonnegative"),
)

outbox, processed_events = add_event_tables(metadata, partitioned=True)

# ---- referral (referral/) ---------------------------------------------------

# One invite code per member, made on first ask and never changed.
invite_codes = Table(
    "invite_codes",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    Column("code", Text, nullable=False, unique=True),
    created_at(),
    # The dashboards' range scans (servicekit/metrics_definitions.py).
    Index(None, "created_at"),
)

# An invitee is linked once (unique invitee_id), whoever asks again.
referrals = Table(
    "referrals",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("inviter_id", Uuid, nullable=False),
    Column("invitee_id", Uuid, nullable=False, unique=True),
    Column("invite_code", Text, nullable=False),
    Column("invitee_registered_at", DateTime(timezone=True), nullable=False),
    Column("accepted_at", DateTime(timezone=True), nullable=False),
    # Set once, by the invitee's first completed order (the first-order step).
    Column("first_order_id", Uuid),
    Column("first_order_at", DateTime(timezone=True)),
    Column("seq", BigInteger, Identity(), nullable=False, unique=True),
    Index(None, "inviter_id", "seq"),
    Index(None, "accepted_at"),
    CheckConstraint("inviter_id <> invitee_id", name="not_self"),
)

# Each member's store for the dashboards' store / region filter
# (servicekit/metrics_definitions.py MEMBER_STORE; MEMBER_STORE_SQL in
# analytics/repository.py): the registration store (member's MemberZoneSet),
# else the store of the latest settled order (rewards' OrderCompleted; only
# moves forward). Migration 0019, back-filled from orders.
member_stores = Table(
    "member_stores",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    Column("registration_store_id", Text),
    Column("order_store_id", Text),
    Column("order_store_at", DateTime(timezone=True)),
)

# One row per referral, step and side: the reward granted, or why it was refused.
referral_rewards = Table(
    "referral_rewards",
    metadata,
    Column("referral_id", Uuid, ForeignKey(referrals.c.id), primary_key=True),
    Column("step", Text, primary_key=True),
    Column("role", Text, primary_key=True),
    Column("member_id", Uuid, nullable=False),
    Column("status", Text, nullable=False),
    Column("coupon_id", Text),
    Column("points", BigInteger, nullable=False, server_default="0"),
    Column("points_transaction_id", Text),
    # {"code": ..., "message": ...} of each part refused (cap, stock...).
    Column("refusals", JSONB, nullable=False, server_default="[]"),
    created_at(),
    CheckConstraint("step IN ('registration', 'first_order')", name="step_known"),
    CheckConstraint("role IN ('inviter', 'invitee')", name="role_known"),
    CheckConstraint("status IN ('granted', 'partial', 'refused')", name="status_known"),
    # The dashboards' range scans (servicekit/metrics_definitions.py).
    Index(None, "created_at"),
)

# Invites refused at acceptance as abuse (self referral, a cycle, a device or
# identifier already behind another invitee, an existing member): one row per
# refused attempt, for the referral dashboard (the refused accept writes
# nothing else; this row is written after its rollback).
referral_refusals = Table(
    "referral_refusals",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("code", Text, nullable=False),
    Column("invite_code", Text, nullable=False),
    Column("inviter_id", Uuid),
    Column("invitee_id", Uuid, nullable=False),
    Column("refused_at", DateTime(timezone=True), nullable=False),
    Index(None, "refused_at"),
)

# SHA-256 of device ids and identifier hashes seen on each side of a referral
# (never the raw values): one device behind many invitees is refused.
referral_fingerprints = Table(
    "referral_fingerprints",
    metadata,
    Column("fingerprint", LargeBinary, primary_key=True),
    Column("member_id", Uuid, primary_key=True),
    Column("role", Text, primary_key=True),
    created_at(),
    CheckConstraint("role IN ('inviter', 'invitee')", name="role_known"),
)

# Rewarded referrals per inviter per period (conditional increments: the cap
# holds under concurrent accepts).
referral_counters = Table(
    "referral_counters",
    metadata,
    Column("inviter_id", Uuid, primary_key=True),
    Column("period_start", DateTime(timezone=True), primary_key=True),
    Column("rewarded", Integer, nullable=False),
    CheckConstraint("rewarded >= 0", name="rewarded_nonnegative"),
)

# OneID merges as rewards saw them (MemberMerged / MemberUnmerged): referral
# and mall reads resolve a member through the merges still in force, so an
# absorbed member's invite code, referrals and mall limits follow the person,
# and an unmerge restores them by closing the row (nothing else is rewritten).
member_merges = Table(
    "member_merges",
    metadata,
    Column("merge_id", Text, primary_key=True),
    Column("absorbed_id", Uuid, nullable=False),
    Column("survivor_id", Uuid, nullable=False),
    Column("merged_at", DateTime(timezone=True), nullable=False),
    Column("unmerged_at", DateTime(timezone=True)),
    CheckConstraint("absorbed_id <> survivor_id", name="not_self"),
    Index(None, "absorbed_id", "merged_at"),
    Index(None, "survivor_id", "merged_at"),
)

# ---- points mall (mall/) ----------------------------------------------------

mall_items = Table(
    "mall_items",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("name", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("coupon_template_id", Text),
    Column("sku", Text),
    Column("points_price", BigInteger, nullable=False),
    # Paid elsewhere (the mini-program's payment); recorded on each exchange.
    Column("cash_fen", BigInteger, nullable=False, server_default="0"),
    Column("stock_total", BigInteger, nullable=False),
    # Taken by a conditional UPDATE ... WHERE stock_remaining > 0: never oversold.
    Column("stock_remaining", BigInteger, nullable=False),
    # 0: no per-member limit.
    Column("per_member_limit", Integer, nullable=False, server_default="0"),
    Column("starts_at", DateTime(timezone=True)),
    Column("ends_at", DateTime(timezone=True)),
    Column("status", Text, nullable=False, server_default="draft"),
    created_at(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("seq", BigInteger, Identity(), nullable=False, unique=True),
    CheckConstraint("kind IN ('coupon', 'goods')", name="kind_known"),
    CheckConstraint("status IN ('draft', 'active', 'paused', 'ended')", name="status_known"),
    CheckConstraint("points_price > 0 AND cash_fen >= 0", name="price_positive"),
    CheckConstraint("stock_remaining BETWEEN 0 AND stock_total", name="stock_in_range"),
)

# Exchanges per member per item (conditional increments enforce the limit).
mall_member_counts = Table(
    "mall_member_counts",
    metadata,
    Column("item_id", Uuid, ForeignKey(mall_items.c.id), primary_key=True),
    Column("member_id", Uuid, primary_key=True),
    Column("exchanged", Integer, nullable=False),
    CheckConstraint("exchanged >= 0", name="exchanged_nonnegative"),
)

# One exchange per (member, exchange_key): a retry replays it.
mall_exchanges = Table(
    "mall_exchanges",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("member_id", Uuid, nullable=False),
    Column("exchange_key", Text, nullable=False),
    Column("request_hash", LargeBinary, nullable=False),
    Column("item_id", Uuid, ForeignKey(mall_items.c.id), nullable=False),
    Column("points", BigInteger, nullable=False),
    Column("cash_fen", BigInteger, nullable=False),
    Column("points_transaction_id", Uuid, nullable=False),
    Column("coupon_id", Text),
    Column("sku", Text),
    # Coupons are issued in the exchange; goods wait for the fulfilment team.
    Column("fulfilment", Text, nullable=False),
    created_at(),
    Column("seq", BigInteger, Identity(), nullable=False, unique=True),
    # Set together when goods ship (ShipMallExchange); no address is kept
    # here: the mini-program's fulfilment system holds it.
    Column("carrier", Text),
    Column("tracking_number", Text),
    Column("shipped_at", DateTime(timezone=True)),
    # Points plus cash (migration 0010): the points held until the payment is
    # confirmed (payment_reference, unique) or the deadline releases them.
    Column("hold_id", Uuid),
    Column("payment_due_at", DateTime(timezone=True)),
    Column("payment_reference", Text),
    Column("paid_at", DateTime(timezone=True)),
    Column("released_at", DateTime(timezone=True)),
    # Whose per-member count the exchange took (given back on release/reversal).
    Column("counted_member_id", Uuid),
    # An operator's reversal: points and stock back, once.
    Column("reversed_at", DateTime(timezone=True)),
    Column("reversed_by", Text),
    Column("reversal_reason", Text),
    Column("reversal_transaction_id", Uuid),
    UniqueConstraint("member_id", "exchange_key"),
    Index(None, "member_id", "seq"),
    # The operators' queue: pending goods, oldest first.
    Index(None, "fulfilment", "seq"),
    Index(None, "payment_reference", unique=True),
    Index(None, "fulfilment", "payment_due_at"),
    CheckConstraint(
        "fulfilment IN ('issued', 'pending', 'shipped', 'awaiting_payment', 'released',"
        " 'reversed')",
        name="fulfilment_known",
    ),
    CheckConstraint(
        "fulfilment = 'reversed' OR (fulfilment = 'shipped') = (shipped_at IS NOT NULL"
        " AND carrier IS NOT NULL AND tracking_number IS NOT NULL)",
        name="shipped_has_shipment",
    ),
)
