"""Operator commands of the guides service, against its database directly:
`staff list [--store S]`, `staff add ID --name N --store S [--role R] [--code C]`,
`sync-directory`, `sync-communities`, `resign ID --takeover ID`,
`tag-batch [--window-days N]`, `repush-tags`, `poll-transfers`
(`sync-directory` polls pending transfers too).
Every change is audited under --actor (default: the OS user)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from typing import Any

from servicekit.db import Database, create_pool
from servicekit.errors import DomainError

from . import retries, tag_batch
from .domain import Role
from .schema import SCHEMA
from .server import build
from .settings import GuidesSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.guides")
    # --actor goes anywhere after the command (audited as the one who acted).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--actor", default=f"cli:{getpass.getuser()}")
    sub = parser.add_subparsers(dest="command", required=True)
    staff = sub.add_parser("staff", help="list or add store staff")
    staff_sub = staff.add_subparsers(dest="action", required=True)
    listing = staff_sub.add_parser("list", parents=[common])
    listing.add_argument("--store", default="")
    add = staff_sub.add_parser("add", parents=[common], help="create or update a staff member")
    add.add_argument("staff_id", help="WeCom user id")
    add.add_argument("--name", required=True)
    add.add_argument("--store", required=True)
    add.add_argument("--role", default=Role.GUIDE.value, choices=[r.value for r in Role])
    add.add_argument("--code", default="", help="staff code typed at the till (default: the id)")
    sub.add_parser(
        "sync-directory", parents=[common], help="pull staff from WeCom's contact directory"
    )
    sub.add_parser(
        "sync-communities",
        parents=[common],
        help="find the group chats staff own in WeCom, pull their members",
    )
    resign = sub.add_parser(
        "resign", parents=[common], help="a staff member left: transfer their customers"
    )
    resign.add_argument("staff_id")
    resign.add_argument("--takeover", required=True)
    _add_retry_commands(sub, common)
    batch = sub.add_parser("tag-batch", parents=[common], help="recompute every member's rule tags")
    batch.add_argument("--window-days", type=int, default=0)
    return parser


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except DomainError as exc:
        print(f"{exc.code}: {exc.message}", file=sys.stderr)
        return 1


async def _main(args: argparse.Namespace) -> int:
    settings = GuidesSettings()
    app = build(settings)
    handlers = app.handlers
    db = Database(await create_pool(settings.database_url, 1, 2), SCHEMA, "guides")
    try:
        if args.command == "staff" and args.action == "list":
            async with db.reading() as uow:
                for s in await handlers.list_staff(uow, args.store):
                    print(
                        f"{s.staff_id}\t{s.name}\t{s.store_id}\t{s.role}\t{s.status}\t{s.staff_code}"
                    )
        elif args.command == "staff":
            async with db.unit_of_work() as uow:
                s = await handlers.upsert_staff(
                    uow, args.staff_id, args.name, args.store, args.role, args.code, args.actor
                )
            print(f"saved {s.staff_id} ({s.role} at {s.store_id}, code {s.staff_code})")
        elif args.command in RETRY_COMMANDS:
            await _run_retry_command(args, handlers, db)
        elif args.command == "sync-directory":
            print(await handlers.sync_directory(db, args.actor))
            # The hourly job also settles the transfers WeCom has decided.
            print("transfers:", await retries.poll_transfers(handlers, db))
        elif args.command == "sync-communities":
            groups, joined, left = await handlers.sync_communities(db, args.actor)
            print(f"{groups} groups: {joined} joined, {left} left")
        elif args.command == "resign":
            moved, failed = await handlers.resign_staff(
                db, args.staff_id, args.takeover, args.actor
            )
            print(
                f"transfer started for {moved} (pending WeCom's takeover);"
                f" WeCom refused {len(failed)}: {' '.join(failed)}"
            )
        else:
            print(await tag_batch.run_or_refuse(handlers, db, args.window_days))
        # The events these commands wrote leave through the service's outbox relay.
        return 0
    finally:
        await db.close()
        await handlers.wecom.close()
        await handlers.members.close()
        if handlers.coupons is not None:
            await handlers.coupons.close()


RETRY_COMMANDS = ("repush-tags", "poll-transfers")


def _add_retry_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    sub.add_parser(
        "repush-tags",
        parents=[common],
        help="requeue the WeCom tag pushes abandoned after their attempts",
    )
    sub.add_parser(
        "poll-transfers",
        parents=[common],
        help="settle pending resigned-staff transfers from WeCom's transfer_result",
    )


async def _run_retry_command(args: argparse.Namespace, handlers: Any, db: Database) -> None:
    if args.command == "repush-tags":
        print(f"requeued {await retries.repush_tags(handlers, db, args.actor)} tag pushes")
    else:
        print(await retries.poll_transfers(handlers, db))
