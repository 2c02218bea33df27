"""Operator accounts managed by command (`python -m console users list |
disable | enable | reset-password | roles | audit`), against the real
PostgreSQL (accounts, their audit) and Redis (sessions): a disabled operator's
sessions end at once, a change of roles applies at the next request, a reset
password is one-time again, and every change is audited under who ran it."""

from __future__ import annotations

import asyncio
import getpass
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from console import users
from console.__main__ import users_main
from console.server import ConsoleServer
from console.sessions import COOKIE
from console.settings import ConsoleSettings
from servicekit.db import asyncpg_dsn
from tests.harness import Infra
from tests.integration.test_console_security import (
    PASSWORD,
    FakeClock,
    browser,
    console_settings,
    csrf,
    log_in,
    operator,
)


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def settings(infra: Infra) -> ConsoleSettings:
    """A Redis namespace of this module's own: its failed log-ins must not
    lock 127.0.0.1 out of the other console tests' consoles."""
    return console_settings(infra, redis_namespace=f"{infra.namespace}:{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
async def console(settings: ConsoleSettings, clock: FakeClock) -> AsyncIterator[ConsoleServer]:
    server = ConsoleServer(settings, clock=clock)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def conn(infra: Infra) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    yield c
    await c.close()


async def run(
    settings: ConsoleSettings, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, list[dict]]:
    """`python -m console users ARGV` in this process (its own event loop, in a
    thread): the exit status and the JSON lines it printed."""
    capsys.readouterr()
    status = await asyncio.to_thread(users_main, list(argv), settings)
    out = capsys.readouterr().out
    return status, [json.loads(line) for line in out.splitlines() if line.strip()]


async def test_disable_ends_every_session_at_once_and_enable_lets_the_operator_back(
    console: ConsoleServer,
    conn: asyncpg.Connection,
    settings: ConsoleSettings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = await operator(conn, ["viewer"])
    async with browser(console) as first, browser(console) as second:
        for client in (first, second):
            assert (await log_in(client, name)).status_code == 303
            assert (await client.get("/account/password")).status_code == 200
        status, [shown] = await run(
            settings, capsys, "disable", "--username", name, "--by", "ops.lead"
        )
        assert status == 0
        assert shown == {"username": name, "changed": True, "sessions_ended": 2}
        for client in (first, second):
            page = await client.get("/account/password")
            assert page.status_code == 303 and page.headers["location"] == "/login"
        assert (await log_in(first, name)).status_code == 401
    status, [shown] = await run(settings, capsys, "enable", "--username", name, "--by", "ops.lead")
    assert status == 0 and shown == {"username": name, "changed": True}
    async with browser(console) as client:
        assert (await log_in(client, name)).status_code == 303
    audit = await users.audit_log(conn, name)
    assert [(a["by"], a["action"]) for a in audit] == [
        ("ops.lead", "disable"),
        ("ops.lead", "enable"),
    ]


async def test_a_session_the_index_missed_is_refused_once_the_account_is_disabled(
    console: ConsoleServer, conn: asyncpg.Connection
) -> None:
    """Belt and braces: disabled in the table only (no session deleted), the
    next request of a live session is signed out and the session deleted."""
    name = await operator(conn, ["viewer"])
    async with browser(console) as client:
        assert (await log_in(client, name)).status_code == 303
        assert await users.set_disabled(conn, name, True, by="test")
        page = await client.get("/account/password")
        assert page.status_code == 303 and page.headers["location"] == "/login"
        await users.set_disabled(conn, name, False, by="test")
        # The session itself is gone: enabling again does not revive it.
        page = await client.get("/account/password")
        assert page.status_code == 303 and page.headers["location"] == "/login"


async def test_a_change_of_roles_applies_at_the_next_request(
    console: ConsoleServer,
    conn: asyncpg.Connection,
    settings: ConsoleSettings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = await operator(conn, ["viewer", "member_admin"])
    async with browser(console) as client:
        assert (await log_in(client, name)).status_code == 303
        page = await client.get("/account/password")
        assert 'href="/merge-reviews"' in page.text
        token = csrf(page.text)
        status, [shown] = await run(
            settings, capsys, "roles", "--username", name, "--set", "viewer", "--by", "ops.lead"
        )
        assert status == 0
        assert shown == {
            "username": name,
            "roles_before": ["member_admin", "viewer"],
            "roles": ["viewer"],
        }
        page = await client.get("/account/password")
        assert 'href="/merge-reviews"' not in page.text
        assert (await client.get("/merge-reviews")).status_code == 403
        # A forged POST in the same, still signed-in session: refused by the new roles.
        reply = await client.post(
            f"/merge-reviews/{uuid.uuid4()}/approve", data={"csrf_token": token, "note": "x"}
        )
        assert reply.status_code == 403
    [entry] = await users.audit_log(conn, name)
    assert entry["by"] == "ops.lead" and entry["action"] == "roles"
    assert entry["detail"] == {"from": ["member_admin", "viewer"], "to": ["viewer"]}


async def test_reset_password_shows_a_one_time_password_once_and_ends_sessions(
    console: ConsoleServer,
    conn: asyncpg.Connection,
    settings: ConsoleSettings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = await operator(conn, ["viewer"])
    async with browser(console) as client:
        assert (await log_in(client, name)).status_code == 303
        old_cookie = client.cookies[COOKIE]
        status, [shown] = await run(settings, capsys, "reset-password", "--username", name)
        assert status == 0 and shown["sessions_ended"] == 1
        once = shown["one_time_password"]
        client.cookies.set(COOKIE, old_cookie)
        page = await client.get("/account/password")
        assert page.status_code == 303 and page.headers["location"] == "/login"
    stored = await conn.fetchval(
        "SELECT password_hash FROM console.operators WHERE username = $1", name
    )
    assert stored.startswith("$argon2id$") and once not in stored
    async with browser(console) as client:
        assert (await log_in(client, name, PASSWORD)).status_code == 401
        reply = await log_in(client, name, once)
        assert reply.headers["location"] == "/account/password"
        assert (await client.get("/dashboards/overview")).headers["location"] == (
            "/account/password"
        )
    # Without --by, the OS user running the command is who the audit names.
    [entry] = await users.audit_log(conn, name)
    assert entry["action"] == "reset-password" and entry["by"] == getpass.getuser()
    assert once not in json.dumps(entry)


async def test_list_shows_every_account_without_secrets_and_create_is_audited(
    conn: asyncpg.Connection, settings: ConsoleSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"op-{uuid.uuid4().hex[:8]}"
    status, [created] = await run(
        settings, capsys, "create", "--username", name, "--role", "marketer", "--by", "ops.lead"
    )
    assert status == 0
    await users.set_disabled(conn, name, True, by="ops.lead")
    status, listed = await run(settings, capsys, "list")
    assert status == 0
    [mine] = [row for row in listed if row["username"] == name]
    assert mine["roles"] == ["marketer"] and mine["disabled"] is True
    assert mine["must_change_password"] is True and mine["totp"] is False
    assert created["one_time_password"] not in json.dumps(listed)
    assert not any("hash" in key or "secret" in key for row in listed for key in row)
    status, log = await run(settings, capsys, "audit", "--username", name)
    assert [(e["by"], e["action"]) for e in log] == [
        ("ops.lead", "create"),
        ("ops.lead", "disable"),
    ]
    assert log[0]["detail"] == {"roles": ["marketer"], "totp": False}


async def test_commands_on_an_unknown_operator_or_with_bad_roles_are_refused_by_code(
    conn: asyncpg.Connection, settings: ConsoleSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    ghost = f"ghost-{uuid.uuid4().hex[:6]}"
    for argv in (
        ("disable", "--username", ghost),
        ("enable", "--username", ghost),
        ("reset-password", "--username", ghost),
        ("roles", "--username", ghost, "--set", "viewer"),
    ):
        status, [shown] = await run(settings, capsys, *argv)
        assert status == 1 and shown["error"]["code"] == "OPERATOR_NOT_FOUND", argv
    name = await operator(conn, ["viewer"])
    with pytest.raises(SystemExit):  # argparse: not one of the roles
        await run(settings, capsys, "roles", "--username", name, "--set", "admin")
    status, [shown] = await run(settings, capsys, "disable", "--username", name, "--by", " ")
    assert status == 1 and shown["error"]["code"] == "INVALID_ACTOR"
    assert await users.audit_log(conn, ghost) == []
    assert await users.audit_log(conn, name) == []
    # Nothing changed: the operator is still enabled.
    assert await users.get(conn, name) is not None
