"""Engagement service (shell).

Journeys (lifecycle and triggered multi-step engagement on a durable
scheduler), frequency caps ("1+1+N"), quiet hours, consent checks and channel
sends ARRIVE WITH THE ENGAGEMENT ISSUE. Until then this package is the server
shell every service shares: gRPC with health and reflection, its own schema
with the outbox and processed-event tables, and the event plumbing.
"""
