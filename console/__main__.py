"""`python -m console [serve]`: serve the operator console until SIGTERM/SIGINT.
`python -m console migrate | check-migrations`: the console's own schema (operator accounts).
`python -m console users create --username NAME --role ROLE [--role ...] [--totp]`:
create an operator; prints the one-time password (and the TOTP secret) once.
`python -m console users list`: every account, one JSON object a line.
`python -m console users disable | enable --username NAME`: disable (its
sessions end at once) or enable an account.
`python -m console users reset-password --username NAME`: a new one-time
password, printed once (to be replaced at the next log-in); sessions end.
`python -m console users roles --username NAME --set ROLE [ROLE ...]`: replace
the roles (signed-in sessions take them at their next request).
`python -m console users audit [--username NAME]`: the audit of these changes.
Every change is audited under `--by NAME`, else the OS user running the command.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from typing import Any

import asyncpg
import pyotp

from servicekit.db import asyncpg_dsn
from servicekit.errors import DomainError
from servicekit.logs import configure_logging
from servicekit.migrations import pending_changes, upgrade
from servicekit.redis_client import create_redis

from . import users
from .roles import Role
from .sessions import SessionStore
from .settings import ConsoleSettings

NAME = "console"
USAGE = (
    "usage: python -m console [serve | migrate | check-migrations |"
    " users create | list | disable | enable | reset-password | roles | audit ...]"
)


async def create_user(
    database_url: str, username: str, roles: list[str], totp: bool, by: str
) -> dict[str, str]:
    secret = pyotp.random_base32() if totp else None
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        password = await users.create(conn, username, roles, totp_secret=secret, by=by)
    finally:
        await conn.close()
    shown = {"username": username, "roles": ",".join(sorted(roles)), "one_time_password": password}
    if secret:
        shown["totp_uri"] = pyotp.TOTP(secret).provisioning_uri(
            name=username, issuer_name="loyalty-console"
        )
    return shown


async def end_sessions(settings: ConsoleSettings, username: str) -> int:
    redis = create_redis(settings.redis_url)
    try:
        store = SessionStore(
            redis,
            settings.redis_namespace,
            idle_seconds=settings.console_session_idle_seconds,
            absolute_seconds=settings.console_session_absolute_seconds,
        )
        return await store.end_all(username)
    finally:
        await redis.aclose()


async def manage(settings: ConsoleSettings, args: argparse.Namespace) -> Any:
    """One `users` sub-command other than create: what it prints (a list: one line each)."""
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    try:
        if args.command == "list":
            return await users.list_operators(conn)
        if args.command == "audit":
            return await users.audit_log(conn, args.username)
        name = args.username
        if args.command in ("disable", "enable"):
            changed = await users.set_disabled(conn, name, args.command == "disable", by=args.by)
            shown: dict[str, Any] = {"username": name, "changed": changed}
            if args.command == "disable":
                # Also when it was already disabled: no session may outlive the command.
                shown["sessions_ended"] = await end_sessions(settings, name)
            return shown
        if args.command == "reset-password":
            password = await users.reset_password(conn, name, by=args.by)
            ended = await end_sessions(settings, name)
            return {"username": name, "one_time_password": password, "sessions_ended": ended}
        before, after = await users.set_roles(conn, name, args.set, by=args.by)
        return {"username": name, "roles_before": before, "roles": after}
    finally:
        await conn.close()


def users_main(argv: list[str], settings: ConsoleSettings) -> int:
    parser = argparse.ArgumentParser(prog="python -m console users")
    sub = parser.add_subparsers(dest="command", required=True)
    roles = [r.value for r in Role]

    def command(name: str, help_: str, *, username: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        if username:
            p.add_argument("--username", required=True)
        p.add_argument(
            "--by",
            default=None,
            help="who runs the command, for the audit (default: the OS user)",
        )
        return p

    create = command("create", "create an operator; prints a one-time password once")
    create.add_argument("--role", action="append", required=True, choices=roles)
    create.add_argument("--totp", action="store_true", help="enrol a TOTP second factor")
    command("list", "every account, one JSON line each", username=False)
    command("disable", "disable an account and end its sessions at once")
    command("enable", "enable a disabled account")
    command("reset-password", "a new one-time password, shown once; sessions end")
    set_roles = command("roles", "replace an account's roles")
    set_roles.add_argument("--set", nargs="+", required=True, choices=roles, metavar="ROLE")
    log = sub.add_parser("audit", help="the audit of account changes")
    log.add_argument("--username", default=None)
    args = parser.parse_args(argv)
    if getattr(args, "by", None) is None:
        args.by = getpass.getuser()
    try:
        if args.command == "create":
            shown: Any = asyncio.run(
                create_user(settings.database_url, args.username, args.role, args.totp, args.by)
            )
        else:
            shown = asyncio.run(manage(settings, args))
    except DomainError as exc:
        print(json.dumps({"error": {"code": exc.code, "message": str(exc), "field": exc.field}}))
        return 1
    for line in shown if isinstance(shown, list) else [shown]:
        print(json.dumps(line, ensure_ascii=False))
    return 0


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else "serve"
    if command != "users" and any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(f"{USAGE}\n\n{__doc__}")
        return
    settings = ConsoleSettings()
    if command == "users":
        sys.exit(users_main(sys.argv[2:], settings))
    if command == "migrate":
        upgrade(NAME, settings.database_url)
        return
    if command == "check-migrations":
        diff = pending_changes(NAME, settings.database_url)
        for change in diff:
            print(change)
        sys.exit(1 if diff else 0)
    if command != "serve":
        sys.exit(USAGE)
    configure_logging(NAME, settings.log_level, settings.log_json)
    from .server import ConsoleServer

    asyncio.run(ConsoleServer(settings).run_until_signalled())


if __name__ == "__main__":
    main()
