"""Operator accounts in the console's own schema: create (with a one-time
password shown once), verify a password (Argon2id, argon2-cffi's defaults),
change it. Never the services' databases."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from servicekit.errors import AlreadyExists, InvalidArgument

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
    conn: asyncpg.Connection, username: str, roles: list[str], *, totp_secret: str | None = None
) -> str:
    """Creates the account; returns its one-time password (never stored in clear)."""
    check_username(username)
    roles = check_roles(roles)
    password = one_time_password()
    try:
        await conn.execute(
            "INSERT INTO console.operators (username, password_hash, roles, totp_secret,"
            " must_change_password) VALUES ($1, $2, $3, $4, true)",
            username,
            _HASHER.hash(password),
            roles,
            totp_secret,
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
