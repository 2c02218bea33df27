"""Rewards service: five bounded contexts in one gRPC service, each a subpackage
of the same shape (servicer -> handlers -> domain -> repository, jobs where it has
scheduled commands): orders/, points/, coupons/, referral/, mall/; and analytics/,
the operator dashboards' aggregates over them (servicer -> repository)."""
