"""Tables of the engagement schema (Alembic reads this).

Only the event tables for now: journeys, schedules, frequency caps and sends
arrive with the engagement issue.
"""

from __future__ import annotations

from servicekit.tables import add_event_tables, service_metadata

SCHEMA = "engagement"
metadata = service_metadata(SCHEMA)

outbox, processed_events = add_event_tables(metadata)
