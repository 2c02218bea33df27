"""`python -m console [serve]`: serve the operator console until SIGTERM/SIGINT.
`python -m console migrate | check-migrations`: the console's own schema (operator accounts).
`python -m console users create --username NAME --role ROLE [--role ...] [--totp]`:
create an operator; prints the one-time password (and the TOTP secret) once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import asyncpg
import pyotp

from servicekit.db import asyncpg_dsn
from servicekit.errors import DomainError
from servicekit.logs import configure_logging
from servicekit.migrations import pending_changes, upgrade

from . import users
from .roles import Role
from .settings import ConsoleSettings

NAME = "console"
USAGE = "usage: python -m console [serve | migrate | check-migrations | users create ...]"


async def create_user(
    database_url: str, username: str, roles: list[str], totp: bool
) -> dict[str, str]:
    secret = pyotp.random_base32() if totp else None
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        password = await users.create(conn, username, roles, totp_secret=secret)
    finally:
        await conn.close()
    shown = {"username": username, "roles": ",".join(sorted(roles)), "one_time_password": password}
    if secret:
        shown["totp_uri"] = pyotp.TOTP(secret).provisioning_uri(
            name=username, issuer_name="loyalty-console"
        )
    return shown


def users_main(argv: list[str], settings: ConsoleSettings) -> int:
    parser = argparse.ArgumentParser(prog="python -m console users")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create an operator; prints a one-time password once")
    create.add_argument("--username", required=True)
    create.add_argument("--role", action="append", required=True, choices=[r.value for r in Role])
    create.add_argument("--totp", action="store_true", help="enrol a TOTP second factor")
    args = parser.parse_args(argv)
    try:
        shown = asyncio.run(create_user(settings.database_url, args.username, args.role, args.totp))
    except DomainError as exc:
        print(json.dumps({"error": {"code": exc.code, "message": str(exc), "field": exc.field}}))
        return 1
    print(json.dumps(shown, ensure_ascii=False))
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
