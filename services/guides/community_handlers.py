"""Communities, the WeCom customer groups: their definitions, syncing their
members from WeCom (joins and leaves announced), the gaps (whom to invite,
who no longer fits), a group's report, and the member tiers they are matched on.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from loyalty.events.v1 import events_pb2
from servicekit.db import Database, UnitOfWork
from servicekit.errors import (
    InvalidArgument,
)
from servicekit.events import ReceivedEvent
from servicekit.protos import timestamp

from . import binding_repository as binding_repo
from . import community_repository as community_repo
from . import domain
from . import repository as repo
from .handlers_common import HandlersBase, parse_day


class CommunityHandlers(HandlersBase):
    """Customer groups and their members."""

    async def upsert_community(
        self,
        uow: UnitOfWork,
        chat_id: str,
        name: str,
        store_id: str,
        audience: str,
        tiers: list[str],
        actor: str,
    ) -> Any:
        chat_id = domain.require_id(chat_id, "chat_id")
        store_id = domain.require_id(store_id, "store_id")
        actor = domain.require_id(actor, "actor")
        if audience not in domain.AUDIENCES:
            raise InvalidArgument(
                f"audience must be one of {', '.join(domain.AUDIENCES)}",
                code="INVALID_AUDIENCE",
                field="audience",
            )
        clean = sorted({domain.require_id(t, f"tiers[{n}]") for n, t in enumerate(tiers)})
        row = await community_repo.upsert_community(
            uow.conn, chat_id, name.strip() or chat_id, store_id, audience, clean, actor
        )
        await repo.audit(
            uow.conn, actor, "community_saved", f"community:{chat_id}",
            {"store_id": store_id, "audience": audience, "tiers": clean}, self.clock(),
        )  # fmt: skip
        return row

    async def list_communities(self, uow: UnitOfWork, store_id: str) -> list[Any]:
        return await community_repo.communities(uow.conn, store_id.strip())

    async def sync_communities(self, db: Database, actor: str) -> tuple[int, int, int]:
        """Every group's customers from WeCom, diffed against the last sync:
        joins and leaves are recorded, and published for members we know. The
        groups are those operators defined and those WeCom lists as owned by
        an active staff member (groupchat/list): a group found there and not
        yet defined is added for its owner's store, audience general, for an
        operator to classify (a defined group's definition is kept)."""
        async with db.reading() as uow:
            staff = [s for s in await repo.list_staff(uow.conn, "") if s.status == "active"]
        store_of = {s.staff_id: s.store_id for s in staff}
        owned = await self.wecom.owned_group_chats(sorted(store_of)) if store_of else []
        async with db.unit_of_work() as uow:
            known = {g["chat_id"] for g in await community_repo.communities(uow.conn)}
            for chat_id in sorted(set(owned) - known):
                owner = await self.wecom.group_owner(chat_id)
                if owner not in store_of:
                    continue
                await community_repo.add_community(
                    uow.conn, chat_id, store_of[owner], "general", actor
                )
                await repo.audit(
                    uow.conn, actor, "community_found", f"community:{chat_id}",
                    {"store_id": store_of[owner], "owner": owner}, self.clock(),
                )  # fmt: skip
        async with db.reading() as uow:
            groups = await community_repo.communities(uow.conn)
        joined = left = 0
        for group in groups:
            members = await self.wecom.group_members(group["chat_id"])
            now = self.clock()
            async with db.unit_of_work() as uow:
                live = await community_repo.live_group_members(uow.conn, group["chat_id"])
                for ext in sorted(set(members) - live):
                    at = datetime.fromtimestamp(members[ext], UTC) if members[ext] else now
                    await community_repo.join_group(uow.conn, group["chat_id"], ext, at)
                    await self._community_event(uow, ext, group, at, joined=True)
                    joined += 1
                for ext in sorted(live - set(members)):
                    await community_repo.leave_group(uow.conn, group["chat_id"], ext, now)
                    await self._community_event(uow, ext, group, now, joined=False)
                    left += 1
        async with db.unit_of_work() as uow:
            await repo.audit(
                uow.conn, actor, "communities_synced", "communities",
                {"groups": len(groups), "joined": joined, "left": left}, self.clock(),
            )  # fmt: skip
        return len(groups), joined, left

    async def _community_event(
        self, uow: UnitOfWork, ext: str, group: Any, at: datetime, joined: bool
    ) -> None:
        member_id = await binding_repo.contact_member(uow.conn, ext)
        if member_id is None:
            return  # a customer no guide has added: nobody to tell journeys about
        fields = {
            "member_id": str(member_id),
            "chat_id": group["chat_id"],
            "store_id": group["store_id"],
            "audience": group["audience"],
            "at": timestamp(at),
        }
        message = (
            events_pb2.CommunityJoined(**fields) if joined else events_pb2.CommunityLeft(**fields)
        )
        await uow.emit(message, member_id=str(member_id))

    async def community_gaps(
        self, uow: UnitOfWork, store_id: str, staff_id: str
    ) -> tuple[list[tuple[str, str, str, str]], list[tuple[str, str, str, str]]]:
        """(invitations, misfits). A member of the store belongs in the first
        group of the store, by audience (vip, growth, general), whose tiers
        include theirs; not in any group they fit: invite them (their guide
        does). In a group whose tiers no longer include theirs: a misfit."""
        store_id = domain.require_id(store_id, "store_id")
        groups = sorted(
            await community_repo.communities(uow.conn, store_id),
            key=lambda g: (domain.AUDIENCES.index(g["audience"]), g["chat_id"]),
        )
        by_chat = {g["chat_id"]: g for g in groups}
        invite, misfits = [], []
        for row in await community_repo.store_members(uow.conn, store_id, staff_id.strip()):
            tier, chats = row["tier"], set(row["chats"])
            fits = [g for g in groups if domain.fits_audience(list(g["tiers"]), tier)]
            if fits and not chats & {g["chat_id"] for g in fits}:
                g = fits[0]
                invite.append((str(row["member_id"]), row["staff_id"], g["chat_id"], g["audience"]))
            for chat in sorted(chats):
                g = by_chat[chat]
                if not domain.fits_audience(list(g["tiers"]), tier):
                    misfits.append((str(row["member_id"]), chat, g["audience"], tier))
        return invite, misfits

    async def community_report(
        self, uow: UnitOfWork, chat_id: str, from_day: str, to_day: str
    ) -> Any:
        start, end = parse_day(from_day, "from_day"), parse_day(to_day, "to_day")
        if end < start:
            raise InvalidArgument("to_day is before from_day", code="INVALID_RANGE", field="to_day")
        lo = datetime.combine(start, datetime.min.time(), self.tz)
        hi = datetime.combine(end + timedelta(days=1), datetime.min.time(), self.tz)
        return await community_repo.community_report(uow.conn, chat_id, lo, hi)

    async def on_tier_changed(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        p = event.payload
        assert isinstance(p, events_pb2.TierChanged)
        await community_repo.set_member_tier(uow.conn, uuid.UUID(p.member_id), p.to_tier)
