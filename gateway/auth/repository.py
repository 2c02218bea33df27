"""SQL of the gateway's clients and keys (asyncpg; schema-qualified)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from servicekit.db import Connection


@dataclass(frozen=True)
class ClientRow:
    client_id: str
    kind: str
    name: str
    store_id: str
    scopes: list[str]
    rate_per_second: float | None
    burst: int | None
    created_at: datetime
    revoked_at: datetime | None
    active_keys: list[str]
    app_ids: list[str]


@dataclass(frozen=True)
class ActiveKeyRow:
    key_id: str
    secret_cipher: bytes
    client_id: str
    kind: str
    store_id: str
    scopes: list[str]
    rate_per_second: float | None
    burst: int | None
    app_ids: list[str]


async def insert_client(
    conn: Connection,
    client_id: str,
    kind: str,
    name: str,
    store_id: str,
    scopes: list[str],
    rate_per_second: float | None,
    burst: int | None,
    app_ids: list[str] | None = None,
) -> bool:
    """False when the client id is taken."""
    status = await conn.execute(
        "INSERT INTO gateway.clients (client_id, kind, name, store_id, scopes,"
        " rate_per_second, burst, app_ids) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT (client_id) DO NOTHING",
        client_id,
        kind,
        name,
        store_id,
        scopes,
        rate_per_second,
        burst,
        app_ids or [],
    )
    return bool(status.endswith(" 1"))


async def lock_live_client(conn: Connection, client_id: str) -> bool:
    """Lock a client that exists and is not revoked."""
    found = await conn.fetchval(
        "SELECT 1 FROM gateway.clients WHERE client_id = $1 AND revoked_at IS NULL FOR UPDATE",
        client_id,
    )
    return found is not None


async def live_client_kind(conn: Connection, client_id: str) -> str | None:
    """The kind of a client that exists and is not revoked, locked."""
    kind = await conn.fetchval(
        "SELECT kind FROM gateway.clients WHERE client_id = $1 AND revoked_at IS NULL FOR UPDATE",
        client_id,
    )
    return None if kind is None else str(kind)


async def set_app_ids(conn: Connection, client_id: str, app_ids: list[str]) -> None:
    await conn.execute(
        "UPDATE gateway.clients SET app_ids = $2 WHERE client_id = $1", client_id, app_ids
    )


async def insert_key(conn: Connection, key_id: str, client_id: str, cipher: bytes) -> None:
    await conn.execute(
        "INSERT INTO gateway.client_keys (key_id, client_id, secret_cipher) VALUES ($1, $2, $3)",
        key_id,
        client_id,
        cipher,
    )


async def revoke_key(conn: Connection, key_id: str) -> bool:
    status = await conn.execute(
        "UPDATE gateway.client_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL",
        key_id,
    )
    return bool(status.endswith(" 1"))


async def revoke_client(conn: Connection, client_id: str) -> bool:
    status = await conn.execute(
        "UPDATE gateway.clients SET revoked_at = now() WHERE client_id = $1 AND revoked_at IS NULL",
        client_id,
    )
    await conn.execute(
        "UPDATE gateway.client_keys SET revoked_at = now()"
        " WHERE client_id = $1 AND revoked_at IS NULL",
        client_id,
    )
    return bool(status.endswith(" 1"))


async def list_clients(conn: Connection) -> list[ClientRow]:
    rows = await conn.fetch(
        "SELECT c.*, coalesce(array_agg(k.key_id ORDER BY k.created_at)"
        " FILTER (WHERE k.key_id IS NOT NULL), '{}') AS active_keys"
        " FROM gateway.clients c LEFT JOIN gateway.client_keys k"
        " ON k.client_id = c.client_id AND k.revoked_at IS NULL"
        " GROUP BY c.client_id ORDER BY c.client_id"
    )
    return [_client(r) for r in rows]


def _client(r: Any) -> ClientRow:
    return ClientRow(
        client_id=r["client_id"],
        kind=r["kind"],
        name=r["name"],
        store_id=r["store_id"],
        scopes=list(r["scopes"]),
        rate_per_second=r["rate_per_second"],
        burst=r["burst"],
        created_at=r["created_at"],
        revoked_at=r["revoked_at"],
        active_keys=list(r["active_keys"]),
        app_ids=list(r["app_ids"]),
    )


async def active_keys(conn: Connection) -> list[ActiveKeyRow]:
    rows = await conn.fetch(
        "SELECT k.key_id, k.secret_cipher, c.client_id, c.kind, c.store_id, c.scopes,"
        " c.rate_per_second, c.burst, c.app_ids FROM gateway.client_keys k"
        " JOIN gateway.clients c ON c.client_id = k.client_id"
        " WHERE k.revoked_at IS NULL AND c.revoked_at IS NULL"
    )
    return [
        ActiveKeyRow(
            key_id=r["key_id"],
            secret_cipher=bytes(r["secret_cipher"]),
            client_id=r["client_id"],
            kind=r["kind"],
            store_id=r["store_id"],
            scopes=list(r["scopes"]),
            rate_per_second=r["rate_per_second"],
            burst=r["burst"],
            app_ids=list(r["app_ids"]),
        )
        for r in rows
    ]


async def revoked_key_ids(conn: Connection) -> set[str]:
    """Keys that existed and were revoked: callers get KEY_REVOKED, not KEY_UNKNOWN."""
    rows = await conn.fetch(
        "SELECT k.key_id FROM gateway.client_keys k JOIN gateway.clients c"
        " ON c.client_id = k.client_id"
        " WHERE k.revoked_at IS NOT NULL OR c.revoked_at IS NOT NULL"
    )
    return {r["key_id"] for r in rows}
