"""`python -m gateway [serve]`: serve HTTP and POS gRPC until SIGTERM/SIGINT.
`python -m gateway migrate | check-migrations`: the gateway's own schema (clients, keys).
`python -m gateway clients create|list|rotate|revoke ...`: register callers (prints a secret once).
"""

from __future__ import annotations

import asyncio
import sys

from servicekit.logs import configure_logging
from servicekit.migrations import pending_changes, upgrade

from .app import NAME, build
from .auth.admin import main as clients_main
from .settings import GatewaySettings

USAGE = "usage: python -m gateway [serve | migrate | check-migrations | clients ...]"


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else "serve"
    if command != "clients" and any(a in ("-h", "--help") for a in sys.argv[1:]):
        # Before anything runs: `migrate --help` must not migrate.
        print(f"{USAGE}\n\n{__doc__}")
        return
    if command == "clients":
        s = GatewaySettings()
        sys.exit(
            clients_main(
                sys.argv[2:], s.database_url, s.redis_url, s.redis_namespace, s.auth_secret_key
            )
        )
    if command == "migrate":
        upgrade(NAME, GatewaySettings().database_url)
        return
    if command == "check-migrations":
        diff = pending_changes(NAME, GatewaySettings().database_url)
        for change in diff:
            print(change)
        sys.exit(1 if diff else 0)
    if command != "serve":
        sys.exit(USAGE)
    settings = GatewaySettings()
    configure_logging(NAME, settings.log_level, settings.log_json)
    gateway = build(settings)
    try:
        import uvloop
    except ImportError:
        asyncio.run(gateway.run_until_signalled())
    else:
        uvloop.run(gateway.run_until_signalled())


if __name__ == "__main__":
    main()
