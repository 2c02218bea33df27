"""OneID merges and unmerges as guides sees them: the survivor takes the
absorbed member's rows (the guide who bound first keeps the person), and an
unmerge moves back exactly what that merge moved, bindings included.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

from loyalty.events.v1 import events_pb2
from servicekit.db import UnitOfWork
from servicekit.events import ReceivedEvent
from servicekit.protos import timestamp

from . import binding_repository as binding_repo
from . import merge_repository as merge_repo
from . import repository as repo
from .binding_handlers import BindingHandlers
from .tag_handlers import TagHandlers

log = logging.getLogger(__name__)


def _binding_detail(binding: binding_repo.BindingRow) -> dict[str, Any]:
    return {
        "staff_id": binding.staff_id,
        "store_id": binding.store_id,
        "bound_at": binding.bound_at.isoformat(),
    }


class MergeHandlers(BindingHandlers, TagHandlers):
    """Following OneID's merges and unmerges."""

    async def on_member_merged(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        """OneID merged two members: the survivor takes the absorbed member's
        contacts, orders, tags and notes; of two guides, the one who bound
        first keeps the person (the first guide keeps the member)."""
        p = event.payload
        assert isinstance(p, events_pb2.MemberMerged)
        survivor, absorbed = uuid.UUID(p.survivor_member_id), uuid.UUID(p.absorbed_member_id)
        now = self.clock()
        # Both locks, in id order (as every batch here takes members).
        for m in sorted((survivor, absorbed)):
            await repo.lock_member(uow.conn, m)
        before = await self._visible_tags(uow, survivor)
        had_tags = bool(await self._visible_tags(uow, absorbed))
        await merge_repo.merge_member_rows(uow.conn, p.merge_id, survivor, absorbed)
        kept = await binding_repo.get_binding(uow.conn, survivor)
        moved = await binding_repo.get_binding(uow.conn, absorbed)
        if moved is not None:
            await merge_repo.delete_binding(uow.conn, absorbed)
            bindings: list[tuple[str, str, dict[str, Any]]] = [
                ("binding", "absorbed", _binding_detail(moved))
            ]
            if kept is None or moved.bound_at < kept.bound_at:
                staff = await repo.get_staff(uow.conn, moved.staff_id)
                if staff is not None:
                    await self._rebind(
                        uow, survivor, kept.staff_id if kept else "", staff, "merge", "oneid", now
                    )
                    # What the survivor had before (staff "" when none).
                    had = _binding_detail(kept) if kept else {"staff_id": ""}
                    bindings.append(("binding", "survivor", had | {"merged_to": staff.staff_id}))
            await merge_repo.record_merge_moves(uow.conn, p.merge_id, bindings)
        await repo.audit(
            uow.conn, "oneid", "member_merged", f"member:{survivor}",
            {"absorbed": str(absorbed), "merge_id": p.merge_id}, now,
        )  # fmt: skip
        await self._tags_changed(uow, survivor, before, now)
        if had_tags:
            await uow.emit(
                events_pb2.MemberTagsChanged(member_id=str(absorbed), changed_at=timestamp(now)),
                member_id=str(absorbed),
            )
        await self.refresh_rule_tags(uow, survivor)

    async def on_member_unmerged(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        """OneID reversed a merge: exactly what that merge moved here goes back
        to the restored member (contacts, orders, notes, tags, its binding), and
        the survivor gets back the guide it had if the merge replaced it and
        nobody rebound it since. Rule tags are then recomputed for both from
        their own orders. A merge applied before moves were recorded, or an
        unmerge applied already, finds nothing to move."""
        p = event.payload
        assert isinstance(p, events_pb2.MemberUnmerged)
        survivor, restored = uuid.UUID(p.survivor_member_id), uuid.UUID(p.restored_member_id)
        now = self.clock()
        for m in sorted((survivor, restored)):
            await repo.lock_member(uow.conn, m)
        moves = await merge_repo.merge_moves(uow.conn, p.merge_id)
        if not moves:
            log.info("unmerge %s: no moves recorded here, nothing to move back", p.merge_id)
            return
        before = {m: await self._visible_tags(uow, m) for m in (survivor, restored)}
        await merge_repo.unmerge_member_rows(uow.conn, moves, survivor, restored)
        bindings = dict(moves.get("binding", []))
        replaced = bindings.get("survivor")
        current = await binding_repo.get_binding(uow.conn, survivor)
        if replaced is not None and current is not None:
            if current.staff_id == replaced["merged_to"]:
                if replaced["staff_id"]:
                    await self._restore_binding(uow, survivor, current.staff_id, replaced, now)
                else:
                    await merge_repo.drop_binding(
                        uow.conn, survivor, current.staff_id, "oneid", now
                    )
                    await self._announce_binding(uow, survivor, current.staff_id, "", "", now)
        own = bindings.get("absorbed")
        if own is not None and await binding_repo.get_binding(uow.conn, restored) is None:
            await self._restore_binding(uow, restored, "", own, now)
        await repo.audit(
            uow.conn, "oneid", "member_unmerged", f"member:{survivor}",
            {"restored": str(restored), "merge_id": p.merge_id}, now,
        )  # fmt: skip
        await merge_repo.forget_merge_moves(uow.conn, p.merge_id)
        for m in (survivor, restored):
            await self.refresh_rule_tags(uow, m)
            await self._tags_changed(uow, m, before[m], now)

    async def _restore_binding(
        self,
        uow: UnitOfWork,
        member_id: uuid.UUID,
        from_staff: str,
        binding: dict[str, Any],
        now: datetime,
    ) -> None:
        bound_at = datetime.fromisoformat(binding["bound_at"])
        await merge_repo.restore_binding(
            uow.conn,
            member_id,
            from_staff,
            binding["staff_id"],
            binding["store_id"],
            bound_at,
            "oneid",
            now,
        )
        await self._announce_binding(
            uow, member_id, from_staff, binding["staff_id"], binding["store_id"], now
        )

    async def _announce_binding(
        self,
        uow: UnitOfWork,
        member_id: uuid.UUID,
        from_staff: str,
        to_staff: str,
        store_id: str,
        now: datetime,
    ) -> None:
        await repo.audit(
            uow.conn,
            "oneid",
            "guide_bound",
            f"member:{member_id}",
            {"from": from_staff, "to": to_staff, "reason": "unmerge"},
            now,
        )
        await uow.emit(
            events_pb2.GuideBound(
                member_id=str(member_id),
                from_staff_id=from_staff,
                to_staff_id=to_staff,
                store_id=store_id,
                reason="unmerge",
                bound_at=timestamp(now),
            ),
            member_id=str(member_id),
        )
