"""The console's log-in and session security over real HTTP, against the real
PostgreSQL (operator accounts) and Redis (sessions, log-in counters): session
fixation, CSRF, cookie flags, lock-out, idle and absolute time-outs (by the
injected clock), one-time passwords, TOTP, Argon2id. No gateway is needed:
these are refused or answered before the console calls it."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie

import asyncpg
import httpx
import pyotp
import pytest

from console import users
from console.server import ConsoleServer
from console.sessions import COOKIE
from console.settings import ConsoleSettings, GatewayKey
from servicekit.db import asyncpg_dsn
from tests.harness import Infra

IDLE = 600
ABSOLUTE = 3600
PASSWORD = "a-long-enough-password"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


def console_settings(infra: Infra, **overrides: object) -> ConsoleSettings:
    values: dict[str, object] = {
        "database_url": infra.database_url,
        "redis_url": infra.redis_url,
        "redis_namespace": infra.namespace,
        "console_host": "127.0.0.1",
        "console_port": 0,
        # Nothing listens there: no test here may reach the gateway.
        "console_gateway_url": "http://127.0.0.1:9",
        "console_session_idle_seconds": IDLE,
        "console_session_absolute_seconds": ABSOLUTE,
        "console_login_max_failures_per_account": 3,
        "console_login_max_failures_per_address": 6,
        "log_json": False,
    }
    values.update(overrides)
    return ConsoleSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
async def console(infra: Infra, clock: FakeClock) -> AsyncIterator[ConsoleServer]:
    server = ConsoleServer(console_settings(infra), clock=clock)
    await server.start()
    yield server
    await server.stop()


@asynccontextmanager
async def own_console(
    infra: Infra, clock: FakeClock, **overrides: object
) -> AsyncIterator[ConsoleServer]:
    """A console with log-in counters of its own (a Redis namespace inside the
    run's), so one test's lock-out of 127.0.0.1 does not lock the others."""
    namespace = f"{infra.namespace}:{uuid.uuid4().hex[:6]}"
    server = ConsoleServer(
        console_settings(infra, redis_namespace=namespace, **overrides), clock=clock
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(scope="module")
async def conn(infra: Infra) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    yield c
    await c.close()


async def operator(
    conn: asyncpg.Connection, roles: list[str], *, totp_secret: str | None = None
) -> str:
    """A new operator whose one-time password was already replaced by PASSWORD."""
    name = f"op-{uuid.uuid4().hex[:8]}"
    await users.create(conn, name, roles, totp_secret=totp_secret)
    await users.set_password(conn, name, PASSWORD)
    return name


def browser(console: ConsoleServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=console.url, timeout=10)


def csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


async def log_in(
    client: httpx.AsyncClient, username: str, password: str = PASSWORD, totp: str = ""
) -> httpx.Response:
    form = await client.get("/login")
    return await client.post(
        "/login",
        data={
            "csrf_token": csrf(form.text),
            "username": username,
            "password": password,
            "totp": totp,
        },
    )


def set_cookie_header(reply: httpx.Response) -> SimpleCookie:
    cookie: SimpleCookie = SimpleCookie()
    for header in reply.headers.get_list("set-cookie"):
        cookie.load(header)
    return cookie


async def test_log_in_rotates_the_session_id_and_the_old_id_is_dead(
    console: ConsoleServer, conn: asyncpg.Connection
) -> None:
    name = await operator(conn, ["viewer"])
    async with browser(console) as client:
        await client.get("/login")
        before = client.cookies[COOKIE]
        reply = await log_in(client, name)
        assert reply.status_code == 303 and reply.headers["location"] == "/"
        after = client.cookies[COOKIE]
        assert after != before
    # An attacker who planted `before` in the victim's browser gets nothing.
    async with browser(console) as attacker:
        attacker.cookies.set(COOKIE, before)
        page = await attacker.get("/dashboards/overview")
        assert page.status_code == 303 and page.headers["location"] == "/login"


async def test_posts_without_the_csrf_token_are_refused_403(
    console: ConsoleServer, conn: asyncpg.Connection
) -> None:
    name = await operator(conn, ["member_admin"])
    async with browser(console) as client:
        await client.get("/login")
        no_token = await client.post("/login", data={"username": name, "password": PASSWORD})
        assert no_token.status_code == 403
        assert (await log_in(client, name)).status_code == 303
        review = uuid.uuid4()
        # Signed in, the right role, but no token / another token: refused before the gateway.
        for data in ({"note": "x"}, {"note": "x", "csrf_token": "forged"}):
            reply = await client.post(f"/merge-reviews/{review}/approve", data=data)
            assert reply.status_code == 403
            assert 'id="message"' in reply.text
        # The session survived: the operator is still signed in.
        assert (await client.get("/account/password")).status_code == 200


async def test_a_cross_site_post_without_the_session_cookie_is_refused(
    console: ConsoleServer,
) -> None:
    async with browser(console) as client:
        reply = await client.post(
            f"/merge-reviews/{uuid.uuid4()}/approve", data={"csrf_token": "x", "note": "x"}
        )
        assert reply.status_code == 403


async def test_session_cookie_is_httponly_samesite_strict_and_not_secure_over_http(
    console: ConsoleServer, conn: asyncpg.Connection
) -> None:
    name = await operator(conn, ["viewer"])
    async with browser(console) as client:
        await client.get("/login")
        reply = await log_in(client, name)
        morsel = set_cookie_header(reply)[COOKIE]
        assert morsel["httponly"] is True
        assert morsel["samesite"] == "strict"
        assert morsel["path"] == "/"
        assert not morsel["secure"]
        # A session cookie: no Max-Age / Expires kept on disk.
        assert not morsel["max-age"] and not morsel["expires"]


async def test_cookie_is_secure_when_the_console_is_behind_tls(
    infra: Infra, clock: FakeClock
) -> None:
    async with own_console(infra, clock, console_cookie_secure=True) as server:
        async with browser(server) as client:
            reply = await client.get("/login")
            assert set_cookie_header(reply)[COOKIE]["secure"] is True


async def test_failed_log_ins_lock_the_account_even_for_the_right_password(
    infra: Infra, clock: FakeClock, conn: asyncpg.Connection
) -> None:
    name = await operator(conn, ["viewer"])
    async with own_console(infra, clock) as console, browser(console) as client:
        for _ in range(3):
            assert (await log_in(client, name, "wrong-password-123")).status_code == 401
        locked = await log_in(client, name)
        assert locked.status_code == 429
        assert 'id="login-error"' in locked.text
        assert COOKIE in client.cookies
        assert (await client.get("/dashboards/overview")).status_code == 303


async def test_failed_log_ins_from_one_address_lock_that_address_for_every_account(
    infra: Infra, clock: FakeClock, conn: asyncpg.Connection
) -> None:
    victim = await operator(conn, ["viewer"])
    async with own_console(infra, clock) as console, browser(console) as client:
        # Spread over many names: no account reaches its own limit (3), the address does (6).
        for i in range(6):
            assert (await log_in(client, f"guess-{i}", "wrong-password-123")).status_code == 401
        assert (await log_in(client, victim)).status_code == 429


async def _guess_then_log_in(
    console: ConsoleServer, victim: str, guesser: str, operator_address: str
) -> int:
    """Six wrong log-ins as from `guesser` (X-Forwarded-For), then the
    victim's right one as from `operator_address`: its status."""
    async with browser(console) as client:
        for i in range(6):
            client.headers["X-Forwarded-For"] = guesser
            assert (await log_in(client, f"guess-{i}", "wrong-password-123")).status_code == 401
        client.headers["X-Forwarded-For"] = operator_address
        return (await log_in(client, victim)).status_code


async def test_behind_a_trusted_ingress_the_address_limit_keys_on_the_forwarded_client(
    infra: Infra, clock: FakeClock, conn: asyncpg.Connection
) -> None:
    """CONSOLE_TRUSTED_PROXIES names the ingress (here the test's own peer): an
    attacker behind it locks out its own address, not every operator's."""
    victim = await operator(conn, ["viewer"])
    async with own_console(infra, clock, console_trusted_proxies="127.0.0.1") as console:
        assert await _guess_then_log_in(console, victim, "203.0.113.7", "198.51.100.9") == 303
        # The guesser's own address is locked, even for the right password.
        async with browser(console) as client:
            client.headers["X-Forwarded-For"] = "203.0.113.7"
            assert (await log_in(client, victim)).status_code == 429


async def test_without_trusted_proxies_the_address_limit_keys_on_the_peer(
    infra: Infra, clock: FakeClock, conn: asyncpg.Connection
) -> None:
    """Default: X-Forwarded-For is ignored (anyone can send it), so made-up
    addresses do not dodge the limit: the peer is locked."""
    victim = await operator(conn, ["viewer"])
    async with own_console(infra, clock) as console:
        assert await _guess_then_log_in(console, victim, "203.0.113.7", "198.51.100.9") == 429


async def test_an_idle_session_expires_and_so_does_an_old_one(
    console: ConsoleServer, conn: asyncpg.Connection, clock: FakeClock
) -> None:
    name = await operator(conn, ["viewer"])
    async with browser(console) as client:
        assert (await log_in(client, name)).status_code == 303
        clock.now += IDLE - 5
        assert (await client.get("/account/password")).status_code == 200
        clock.now += IDLE + 1
        expired = await client.get("/account/password")
        assert expired.status_code == 303 and expired.headers["location"] == "/login"
    async with browser(console) as client:
        assert (await log_in(client, name)).status_code == 303
        # Active all along (never idle), but past the absolute time-out.
        for _ in range(ABSOLUTE // (IDLE - 10) + 1):
            clock.now += IDLE - 10
            last = await client.get("/account/password")
        assert last.status_code == 303 and last.headers["location"] == "/login"


async def test_a_one_time_password_must_be_replaced_before_anything_else(
    console: ConsoleServer, conn: asyncpg.Connection
) -> None:
    name = f"op-{uuid.uuid4().hex[:8]}"
    once = await users.create(conn, name, ["viewer"])
    stored = await conn.fetchval(
        "SELECT password_hash FROM console.operators WHERE username = $1", name
    )
    assert stored.startswith("$argon2id$") and once not in stored
    async with browser(console) as client:
        reply = await log_in(client, name, once)
        assert reply.headers["location"] == "/account/password"
        assert (await client.get("/dashboards/overview")).headers["location"] == (
            "/account/password"
        )
        page = await client.get("/account/password")
        short = await client.post(
            "/account/password", data={"csrf_token": csrf(page.text), "password": "short"}
        )
        assert short.status_code == 400
        done = await client.post(
            "/account/password", data={"csrf_token": csrf(page.text), "password": PASSWORD}
        )
        assert done.status_code == 303
    async with browser(console) as client:
        assert (await log_in(client, name, once)).status_code == 401
        assert (await log_in(client, name, PASSWORD)).headers["location"] == "/"


async def test_totp_is_required_when_enrolled(
    console: ConsoleServer, conn: asyncpg.Connection, clock: FakeClock
) -> None:
    secret = pyotp.random_base32()
    name = await operator(conn, ["viewer"], totp_secret=secret)
    async with browser(console) as client:
        assert (await log_in(client, name)).status_code == 401
        wrong = pyotp.TOTP(secret).at(clock.now - 3600)
        assert (await log_in(client, name, totp=wrong)).status_code == 401
        code = pyotp.TOTP(secret).at(clock.now)
        assert (await log_in(client, name, totp=code)).status_code == 303


async def test_users_create_refuses_bad_names_roles_and_duplicates(
    conn: asyncpg.Connection,
) -> None:
    from servicekit.errors import AlreadyExists, InvalidArgument

    with pytest.raises(InvalidArgument) as bad_name:
        await users.create(conn, "li wei/ops", ["viewer"])
    assert bad_name.value.field == "username"
    with pytest.raises(InvalidArgument) as bad_role:
        await users.create(conn, "li.wei", ["admin"])
    assert bad_role.value.code == "INVALID_ROLE"
    name = f"op-{uuid.uuid4().hex[:8]}"
    await users.create(conn, name, ["viewer"])
    with pytest.raises(AlreadyExists):
        await users.create(conn, name, ["viewer"])


async def test_the_demo_operator_gets_a_new_one_time_password_each_run(
    console: ConsoleServer, conn: asyncpg.Connection
) -> None:
    name = f"demo-{uuid.uuid4().hex[:6]}"
    first = await users.reset(conn, name, ["viewer"])
    await users.set_password(conn, name, PASSWORD)
    second = await users.reset(conn, name, ["viewer", "marketer"])
    assert second != first
    async with browser(console) as client:
        assert (await log_in(client, name, PASSWORD)).status_code == 401
        assert (await log_in(client, name, first)).status_code == 401
        reply = await log_in(client, name, second)
        assert reply.headers["location"] == "/account/password"
    assert (await users.get(conn, name)) == users.Operator(
        name, ("marketer", "viewer"), None, must_change_password=True
    )


async def test_the_language_switch_changes_the_text_and_redirects_only_within_the_site(
    console: ConsoleServer, conn: asyncpg.Connection
) -> None:
    name = await operator(conn, ["viewer"])
    async with browser(console) as client:
        await log_in(client, name)
        page = await client.get("/account/password")
        assert "设置新密码" in page.text
        token = csrf(page.text)
        for target in ("//evil.example/x", "/\\evil.example", "https://evil.example/"):
            reply = await client.post(
                "/locale", data={"csrf_token": token, "locale": "en", "next": target}
            )
            assert reply.status_code == 303 and reply.headers["location"] == "/"
        back = await client.post(
            "/locale", data={"csrf_token": token, "locale": "en", "next": "/account/password"}
        )
        assert back.headers["location"] == "/account/password"
        assert "Choose a new password" in (await client.get("/account/password")).text


async def test_an_unreachable_gateway_is_a_page_saying_so_not_a_crash(
    infra: Infra, clock: FakeClock, conn: asyncpg.Connection
) -> None:
    name = await operator(conn, ["viewer", "member_admin"])
    keys = {
        "viewer": GatewayKey(key_id="k_unused", secret="unused"),
        "member_admin": GatewayKey(key_id="k_unused2", secret="unused"),
    }
    async with own_console(infra, clock, console_gateway_clients=keys) as server:
        async with browser(server) as client:
            await log_in(client, name)
            dashboard = await client.get("/dashboards/overview")
            assert dashboard.status_code == 200
            assert "GATEWAY_UNREACHABLE" in dashboard.text
            queue = await client.get("/merge-reviews")
            assert queue.status_code == 502 and "GATEWAY_UNREACHABLE" in queue.text
