"""The points ledger: a double-entry journal of lots, holds, earns, spends,
refunds and adjustments; earning rules; expiry jobs; the audit."""
