"""Operator accounts in the console's own schema: create (with a one-time
password shown once), verify a password (Argon2id, argon2-cffi's defaults),
change it; and the commands' account management (list, disable, enable,
reset-password, roles), each change written with the audit row naming who
made it, in one transaction. Never the services' databases."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from servicekit.errors import AlreadyExists, InvalidArgument, NotFound

from .roles import Role

# The gateway's X-Operator-User rule (gateway/principal.py): the name is what
# every audit record shows, so it must pass there unchanged.
USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_PASSWORD_LENGTH = 12

# argon2-cffi's PasswordHasher is Argon2id with RFC 9106's low-memory profile.
_HASHER = PasswordHasher()
# Verified against when the account does not exist, so a wrong name costs what a wrong password does.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class Operator:
    username: str
    roles: tuple[str, ...]
    totp_secret: str | None
    must_change_password: bool


def one_time_password() -> str:
    return secrets.token_urlsafe(12)


def check_username(username: str) -> str:
    if not USERNAME.match(username):
        raise InvalidArgument(
            "username: 1 to 64 letters, digits, '_', '.', '@', '-'",
            code="INVALID_USERNAME",
            field="username",
        )
    return username


def check_roles(roles: list[str]) -> list[str]:
    known = {r.value for r in Role}
    unknown = [r for r in roles if r not in known]
    if not roles or unknown:
        raise InvalidArgument(
            f"roles: one or more of {sorted(known)}; unknown: {unknown}",
            code="INVALID_ROLE",
            field="role",
        )
    return sorted(set(roles))


def check_new_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidArgument(
            f"the new password needs at least {MIN_PASSWORD_LENGTH} characters",
            code="PASSWORD_TOO_SHORT",
            field="password",
        )
    return password


async def create(
    conn: asyncpg.Connection,
    username: str,
    roles: list[str],
    *,
    totp_secret: str | None = None,
    by: str | None = None,
) -> str:
    """Creates the account; returns its one-time password (never stored in clear).
    With `by` (a command's caller), the creation is audited under that name."""
    check_username(username)
    roles = check_roles(roles)
    password = one_time_password()
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO console.operators (username, password_hash, roles, totp_secret,"
                " must_change_password) VALUES ($1, $2, $3, $4, true)",
                username,
                _HASHER.hash(password),
                roles,
                totp_secret,
            )
            if by is not None:
                await audit(
                    conn, by, "create", username, {"roles": roles, "totp": bool(totp_secret)}
                )
    except asyncpg.UniqueViolationError:
        raise AlreadyExists(
            f"operator {username!r} exists", code="OPERATOR_EXISTS", field="username"
        ) from None
    return password


async def reset(conn: asyncpg.Connection, username: str, roles: list[str]) -> str:
    """`make run`'s demo operator: created, or given a new one-time password
    (and these roles) if it exists; returns the password, shown once."""
    check_username(username)
    roles = check_roles(roles)
    password = one_time_password()
    await conn.execute(
        "INSERT INTO console.operators (username, password_hash, roles, must_change_password)"
        " VALUES ($1, $2, $3, true) ON CONFLICT (username) DO UPDATE SET"
        " password_hash = EXCLUDED.password_hash, roles = EXCLUDED.roles,"
        " must_change_password = true, disabled_at = NULL",
        username,
        _HASHER.hash(password),
        roles,
    )
    return password


def check_actor(by: str) -> str:
    by = by.strip()
    if not by or len(by) > 128:
        raise InvalidArgument(
            "by: who runs the command, 1 to 128 characters",
            code="INVALID_ACTOR",
            field="by",
        )
    return by


async def audit(
    conn: asyncpg.Connection, by: str, action: str, username: str, detail: dict[str, Any]
) -> None:
    await conn.execute(
        "INSERT INTO console.operator_audit (actor, action, username, detail)"
        " VALUES ($1, $2, $3, $4::jsonb)",
        check_actor(by),
        action,
        username,
        json.dumps(detail, ensure_ascii=False),
    )


async def _locked_row(conn: asyncpg.Connection, username: str) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT username, roles, disabled_at FROM console.operators WHERE username = $1 FOR UPDATE",
        username,
    )
    if row is None:
        raise NotFound(f"no operator {username!r}", code="OPERATOR_NOT_FOUND", field="username")
    return row


async def list_operators(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """Every account, enabled or not, by name (never a password hash or TOTP secret)."""
    rows = await conn.fetch(
        "SELECT username, roles, totp_secret IS NOT NULL AS totp, must_change_password,"
        " created_at, disabled_at FROM console.operators ORDER BY username"
    )
    return [
        {
            "username": r["username"],
            "roles": list(r["roles"]),
            "disabled": r["disabled_at"] is not None,
            "totp": r["totp"],
            "must_change_password": r["must_change_password"],
            "created_at": r["created_at"].isoformat(),
            "disabled_at": r["disabled_at"].isoformat() if r["disabled_at"] else None,
        }
        for r in rows
    ]


async def set_disabled(conn: asyncpg.Connection, username: str, disabled: bool, *, by: str) -> bool:
    """Disables (or enables) the account; True when that changed something.
    The caller ends a disabled operator's sessions (SessionStore.end_all); a
    session the store missed is refused anyway: each request re-reads the account."""
    check_actor(by)
    async with conn.transaction():
        row = await _locked_row(conn, username)
        if (row["disabled_at"] is not None) == disabled:
            return False
        await conn.execute(
            "UPDATE console.operators SET disabled_at = CASE WHEN $2 THEN now() END"
            " WHERE username = $1",
            username,
            disabled,
        )
        await audit(conn, by, "disable" if disabled else "enable", username, {})
    return True


async def reset_password(conn: asyncpg.Connection, username: str, *, by: str) -> str:
    """A new one-time password (returned, shown once), to be replaced at the
    next log-in as after create. The caller ends the operator's sessions."""
    check_actor(by)
    password = one_time_password()
    async with conn.transaction():
        await _locked_row(conn, username)
        await conn.execute(
            "UPDATE console.operators SET password_hash = $2, must_change_password = true"
            " WHERE username = $1",
            username,
            _HASHER.hash(password),
        )
        await audit(conn, by, "reset-password", username, {})
    return password


async def set_roles(
    conn: asyncpg.Connection, username: str, roles: list[str], *, by: str
) -> tuple[list[str], list[str]]:
    """Replaces the operator's roles; (before, after). Signed-in sessions take
    the new roles at their next request (the console re-reads the account)."""
    check_actor(by)
    roles = check_roles(roles)
    async with conn.transaction():
        row = await _locked_row(conn, username)
        before = sorted(row["roles"])
        if before != roles:
            await conn.execute(
                "UPDATE console.operators SET roles = $2 WHERE username = $1", username, roles
            )
            await audit(conn, by, "roles", username, {"from": before, "to": roles})
    return before, roles


async def audit_log(conn: asyncpg.Connection, username: str | None = None) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT at, actor, action, username, detail FROM console.operator_audit"
        " WHERE $1::text IS NULL OR username = $1 ORDER BY id",
        username,
    )
    return [
        {
            "at": r["at"].isoformat(),
            "by": r["actor"],
            "action": r["action"],
            "username": r["username"],
            "detail": json.loads(r["detail"]),
        }
        for r in rows
    ]


async def state(conn: asyncpg.Connection, username: str) -> tuple[str, ...] | None:
    """The roles of an enabled account; None when it is disabled or gone
    (what every signed-in request re-checks)."""
    roles = await conn.fetchval(
        "SELECT roles FROM console.operators WHERE username = $1 AND disabled_at IS NULL",
        username,
    )
    return tuple(roles) if roles is not None else None


async def verify(conn: asyncpg.Connection, username: str, password: str) -> Operator | None:
    """The operator when the password is right and the account enabled; None otherwise."""
    row = await conn.fetchrow(
        "SELECT username, password_hash, roles, totp_secret, must_change_password"
        " FROM console.operators WHERE username = $1 AND disabled_at IS NULL",
        username,
    )
    try:
        _HASHER.verify(row["password_hash"] if row else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if row is None:
        return None
    if _HASHER.check_needs_rehash(row["password_hash"]):
        await conn.execute(
            "UPDATE console.operators SET password_hash = $2 WHERE username = $1",
            username,
            _HASHER.hash(password),
        )
    return _operator(row)


async def get(conn: asyncpg.Connection, username: str) -> Operator | None:
    row = await conn.fetchrow(
        "SELECT username, roles, totp_secret, must_change_password"
        " FROM console.operators WHERE username = $1 AND disabled_at IS NULL",
        username,
    )
    return _operator(row) if row else None


async def set_password(conn: asyncpg.Connection, username: str, password: str) -> None:
    check_new_password(password)
    await conn.execute(
        "UPDATE console.operators SET password_hash = $2, must_change_password = false"
        " WHERE username = $1",
        username,
        _HASHER.hash(password),
    )


def _operator(row: asyncpg.Record) -> Operator:
    return Operator(
        username=row["username"],
        roles=tuple(row["roles"]),
        totp_secret=row["totp_secret"],
        must_change_password=row["must_change_password"],
    )
