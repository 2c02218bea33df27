"""The one entrypoint shape:
`python -m services.<name> [serve|migrate|check-migrations|events status]`, and
`partitions ensure|list|detach` for a service with time partitions
(servicekit/partitions_cli.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .eventstatus import print_events_status
from .migrations import pending_changes, upgrade
from .server import ServiceApp, run_service
from .settings import ServiceSettings


def main(name: str, build: Callable[[ServiceSettings], ServiceApp]) -> None:
    if sys.argv[1:2] == ["partitions"]:
        from .partitions_cli import run

        sys.exit(run(name, sys.argv[2:]))
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}")
    parser.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=["serve", "migrate", "check-migrations", "events"],
        help="serve gRPC (default); migrate the schema to head; check models match"
        " migrations; events status: sequences published and applied, lag, gaps",
    )
    parser.add_argument("action", nargs="?", choices=["status"], help="for events: status")
    args = parser.parse_args()
    if args.command == "events":
        if args.action != "status":
            parser.error("events needs an action: events status")
        print_events_status(name, ServiceSettings())
        return
    if args.command == "serve":
        run_service(build, name)
    elif args.command == "migrate":
        upgrade(name, ServiceSettings().database_url)
    else:
        diff = pending_changes(name, ServiceSettings().database_url)
        for change in diff:
            print(change)
        sys.exit(1 if diff else 0)
