"""Coupons: templates and their terms, issuance (single and bulk), the wallet,
checkout preview, lock and redeem, restore on refund, expiry jobs."""
