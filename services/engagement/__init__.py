"""Engagement service: lifecycle journeys on a durable Postgres scheduler, with
frequency caps ("1+1+N"), quiet hours, consent at send time and channel
providers. See docs/journeys.md."""
