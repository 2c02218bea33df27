"""Stores and orders: POS checkout (CompleteOrder) and refunds, settled with the
points and coupons they use; the stores a till belongs to."""
