"""Tiering service: tier programmes and ladders, member spend fed by order events.

Growth value, rolling-window tier evaluation, retention, RFM segments and
lifecycle stages build on these tables in later issues.
"""
