"""The one entrypoint shape: `python -m services.<name> [serve|migrate|check-migrations]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .migrations import pending_changes, upgrade
from .server import ServiceApp, run_service
from .settings import ServiceSettings


def main(name: str, build: Callable[[ServiceSettings], ServiceApp]) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}")
    parser.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=["serve", "migrate", "check-migrations"],
        help="serve gRPC (default); migrate the schema to head; check models match migrations",
    )
    args = parser.parse_args()
    if args.command == "serve":
        run_service(build, name)
    elif args.command == "migrate":
        upgrade(name, ServiceSettings().database_url)
    else:
        diff = pending_changes(name, ServiceSettings().database_url)
        for change in diff:
            print(change)
        sys.exit(1 if diff else 0)
