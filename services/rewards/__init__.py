"""Rewards service: stores, orders settled at checkout, the points ledger, coupons."""
