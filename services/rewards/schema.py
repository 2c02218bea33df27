"""Tables of the rewards schema (Alembic reads this; queries live in repository.py).

CHECK constraints are declared here for the record and written by hand in the
migrations (Alembic does not compare them). The points journal is append-only:
migration 0001 adds triggers that reject UPDATE and DELETE on it.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
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
)
from sqlalchemy.dialects.postgresql import JSONB

from servicekit.tables import add_event_tables, service_metadata

SCHEMA = "rewards"
metadata = service_metadata(SCHEMA)

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
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("char_length(store_id) BETWEEN 1 AND 32", name="store_id_length"),
    CheckConstraint("status IN ('active', 'closed')", name="status_known"),
    CheckConstraint("latitude BETWEEN -90 AND 90", name="latitude_range"),
    CheckConstraint("longitude BETWEEN -180 AND 180", name="longitude_range"),
)

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
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The idempotency key of CompleteOrder.
    UniqueConstraint("store_id", "pos_transaction_id"),
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
)

# Double-entry points journal: one row per movement, its entries sum to zero.
points_transactions = Table(
    "points_transactions",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("member_id", Uuid, nullable=False, index=True),
    Column("kind", Text, nullable=False),
    Column("order_id", Uuid, ForeignKey(orders.c.id), index=True),
    # One transaction per business fact (e.g. "earn:<order id>"), whoever retries.
    Column("idempotency_key", Text, nullable=False, unique=True),
    # Magnitude of the movement; the entries carry the signs.
    Column("amount", BigInteger, nullable=False),
    # The earning rule (name, rate, rounding) that produced the amount.
    Column("rule", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("kind IN ('earn')", name="kind_known"),
    CheckConstraint("amount > 0", name="amount_positive"),
)

points_entries = Table(
    "points_entries",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column(
        "transaction_id", Uuid, ForeignKey(points_transactions.c.id), nullable=False, index=True
    ),
    # member_wallet: the member's spendable points (+ credits the member);
    # issued_liability: the brand's side of every point issued.
    Column("account", Text, nullable=False),
    Column("member_id", Uuid, index=True),
    Column("amount", BigInteger, nullable=False),
    CheckConstraint("account IN ('member_wallet', 'issued_liability')", name="account_known"),
    CheckConstraint("amount <> 0", name="amount_nonzero"),
    CheckConstraint(
        "account <> 'member_wallet' OR member_id IS NOT NULL", name="wallet_has_member"
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
    CheckConstraint("available >= 0", name="available_nonnegative"),
    CheckConstraint("lifetime_earned >= 0", name="lifetime_earned_nonnegative"),
)

coupon_templates = Table(
    "coupon_templates",
    metadata,
    Column("template_id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("kind", Text, nullable=False),
    # Kind-specific terms in fen and percent: threshold_fen, discount_fen, percent, cap_fen...
    Column("spec", JSONB, nullable=False, server_default="{}"),
    # NULL: unlimited.
    Column("total_stock", BigInteger),
    Column("status", Text, nullable=False, server_default="active"),
    # Days a coupon stays valid after issue; NULL: the spec's fixed window applies.
    Column("valid_days", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint(
        "kind IN ('amount_off', 'percent_off', 'free_item', 'fixed_price', 'first_order_price')",
        name="kind_known",
    ),
    CheckConstraint("status IN ('draft', 'active', 'paused', 'retired')", name="status_known"),
    CheckConstraint("jsonb_typeof(spec) = 'object'", name="spec_is_object"),
    CheckConstraint("total_stock IS NULL OR total_stock >= 0", name="total_stock_nonnegative"),
    CheckConstraint("valid_days IS NULL OR valid_days > 0", name="valid_days_positive"),
)

outbox, processed_events = add_event_tables(metadata)
