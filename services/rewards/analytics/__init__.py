"""Operator dashboards' aggregates of rewards' data (orders, points, coupons, referral)."""
