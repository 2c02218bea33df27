"""The start-up schema check: a service serves only once its PostgreSQL schema
is at the head revision its own code's migrations end in.

Migrations are a release step (a Job before the rollout, docs/deploy.md); a pod
that starts before that Job finished, or against a database someone restored
from an older backup, must not serve requests its tables cannot hold. The
health watcher (servicekit/server.py) asks `SchemaGate.ready()` and reports
NOT_SERVING, with one clear log line per change of state, until the schema is
at head.

A schema *ahead* of the code (a revision the code does not know) is served,
with a warning: that is the normal middle of a rolling upgrade, when the new
release's migrations ran and old pods still serve until they are replaced;
migrations are written expand-then-contract so the previous release keeps
working on them (docs/deploy.md, Upgrade).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum

import asyncpg
from alembic.script import ScriptDirectory

from .migrations import alembic_config

log = logging.getLogger(__name__)


class SchemaState(Enum):
    AT_HEAD = "at_head"
    AHEAD = "ahead"  # a revision this code does not know: a newer release migrated
    BEHIND = "behind"  # a known revision short of head: migrate
    MISSING = "missing"  # no version table or no row: never migrated


def classify(
    db_revisions: Collection[str], heads: Collection[str], known: Collection[str]
) -> SchemaState:
    """Where the database's revisions stand against the code's migration graph."""
    if not db_revisions:
        return SchemaState.MISSING
    if set(db_revisions) == set(heads):
        return SchemaState.AT_HEAD
    if any(rev not in known for rev in db_revisions):
        return SchemaState.AHEAD
    return SchemaState.BEHIND


@dataclass(frozen=True)
class CodeRevisions:
    heads: frozenset[str]
    known: frozenset[str]


def code_revisions(service: str) -> CodeRevisions:
    """The heads and every revision of a service's migration scripts (no database)."""
    script = ScriptDirectory.from_config(alembic_config(service, ""))
    return CodeRevisions(
        heads=frozenset(script.get_heads()),
        known=frozenset(rev.revision for rev in script.walk_revisions()),
    )


async def database_revisions(conn: asyncpg.Connection | asyncpg.Pool, schema: str) -> list[str]:
    """The revisions in the schema's alembic_version table; [] when it does not exist."""
    exists = await conn.fetchval("SELECT to_regclass($1)", f'"{schema}".alembic_version')
    if exists is None:
        return []
    rows = await conn.fetch(f'SELECT version_num FROM "{schema}".alembic_version')
    return [row["version_num"] for row in rows]


class SchemaGate:
    """Asked by the health watcher on every poll until the schema is usable;
    from then on it answers at once (a schema does not move backwards under a
    running release: a roll back of the code never downgrades the database)."""

    def __init__(self, service: str, schema: str, migrate_command: str) -> None:
        self.service = service
        self.schema = schema
        self.migrate_command = migrate_command
        self._code = code_revisions(service)
        self._ready = False
        self._last: tuple[SchemaState, tuple[str, ...]] | None = None

    async def ready(self, pool: asyncpg.Pool) -> bool:
        if self._ready:
            return True
        revisions = sorted(await database_revisions(pool, self.schema))
        state = classify(revisions, self._code.heads, self._code.known)
        self._report(state, revisions)
        self._ready = state in (SchemaState.AT_HEAD, SchemaState.AHEAD)
        return self._ready

    def _report(self, state: SchemaState, revisions: list[str]) -> None:
        if self._last == (state, tuple(revisions)):
            return
        self._last = (state, tuple(revisions))
        head = ",".join(sorted(self._code.heads))
        found = ",".join(revisions) or "none"
        if state is SchemaState.AT_HEAD:
            log.info("%s: schema %r at head revision %s", self.service, self.schema, head)
        elif state is SchemaState.AHEAD:
            log.warning(
                "%s: schema %r is at revision %s, newer than this code's head %s "
                "(a newer release migrated); serving",
                self.service,
                self.schema,
                found,
                head,
            )
        else:
            log.error(
                "%s: schema %r is at revision %s, this code needs head %s: NOT_SERVING "
                "until `%s` runs (the release's migration Job)",
                self.service,
                self.schema,
                found,
                head,
                self.migrate_command,
            )
