"""Use cases of the guides service, given a unit of work (or the Database when
a use case must call WeCom between transactions). Business code never commits."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from loyalty.common.v1 import common_pb2
from loyalty.events.v1 import events_pb2
from servicekit.db import Database, UnitOfWork
from servicekit.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    parse_member_id,
)
from servicekit.events import ReceivedEvent
from servicekit.protos import timestamp, to_datetime

from . import domain
from . import repository as repo
from .domain import AttributionRule, Candidate, OrderFact, Role, TagRules
from .ports import CouponIssuer, MemberDirectory
from .wecom import WeComApi
from .wecom_crypto import WeComCrypto

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

WECOM_ACTOR = "wecom"
CHANNEL_NAMES = {
    common_pb2.CHANNEL_STORE: "store",
    common_pb2.CHANNEL_MINI_PROGRAM: "mini_program",
    common_pb2.CHANNEL_DELIVERY: "delivery",
}
# Callback changes that add a customer to a staff member's contacts.
ADD_CHANGES = frozenset({"add_external_contact", "add_half_external_contact"})
REMOVE_CHANGES = frozenset({"del_external_contact", "del_follow_user"})


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class CallbackOutcome:
    reply: str
    outcome: str  # accepted | duplicate
    dedup_key: str = ""


@dataclass(frozen=True)
class TagBatchResult:
    members: int
    added: int
    removed: int


def _parse_day(value: str, field: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(
            f"{field} must be a date, YYYY-MM-DD", code="INVALID_DATE", field=field
        ) from None


class GuidesHandlers:
    def __init__(
        self,
        crypto: WeComCrypto,
        wecom: WeComApi,
        members: MemberDirectory,
        *,
        corp_id: str,
        link_secret: bytes,
        rules: tuple[AttributionRule, ...],
        window: timedelta,
        tz: ZoneInfo,
        callback_max_age: timedelta,
        callback_max_attempts: int = 5,
        tag_window: timedelta = timedelta(days=90),
        tag_rules: TagRules | None = None,
        clock: Clock | None = None,
        coupons: CouponIssuer | None = None,
        session_secret: bytes = b"",
        session_ttl: timedelta = timedelta(hours=2),
        task_gather: timedelta = timedelta(minutes=5),
    ) -> None:
        self.crypto = crypto
        self.wecom = wecom
        self.members = members
        self.corp_id = corp_id
        self.link_secret = link_secret
        self.rules = rules
        self.window = window
        self.tz = tz
        self.callback_max_age = callback_max_age
        self.callback_max_attempts = callback_max_attempts
        self.tag_window = tag_window
        self.tag_rules = tag_rules or TagRules()
        self.clock = clock or _utcnow
        self.coupons = coupons
        self.session_secret = session_secret or link_secret + b"/workstation"
        self.session_ttl = session_ttl
        self.task_gather = task_gather

    # ------------------------------------------------------------ staff

    async def upsert_staff(
        self,
        uow: UnitOfWork,
        staff_id: str,
        name: str,
        store_id: str,
        role: str,
        staff_code: str,
        actor: str,
    ) -> repo.StaffRow:
        staff_id = domain.require_id(staff_id, "staff_id")
        store_id = domain.require_id(store_id, "store_id")
        actor = domain.require_id(actor, "actor")
        if not name.strip():
            raise InvalidArgument("name is required", code="MISSING_FIELD", field="name")
        parsed = domain.parse_role(role)
        code = domain.require_id(staff_code, "staff_code") if staff_code.strip() else staff_id
        now = self.clock()
        before = await repo.get_staff(uow.conn, staff_id, lock=True)
        if before is not None and before.status == "resigned":
            raise FailedPrecondition(
                f"staff {staff_id} has resigned", code="STAFF_RESIGNED", field="staff_id"
            )
        row = repo.StaffRow(
            staff_id, name.strip(), store_id, parsed.value, "active", code, actor, now
        )
        try:
            async with uow.conn.transaction():
                saved = await repo.upsert_staff(uow.conn, row)
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(
                f"staff code {code} belongs to another staff member",
                code="STAFF_CODE_TAKEN",
                field="staff_code",
            ) from None
        if before is None or replace(before, updated_at=now, updated_by=actor) != saved:
            await repo.audit(
                uow.conn,
                actor,
                "staff_created" if before is None else "staff_updated",
                f"staff:{staff_id}",
                {"name": saved.name, "store_id": store_id, "role": parsed.value, "code": code},
                now,
            )
        return saved

    async def get_staff(self, uow: UnitOfWork, staff_id: str) -> repo.StaffRow:
        row = await repo.get_staff(uow.conn, staff_id)
        if row is None:
            raise NotFound(f"no staff {staff_id}", code="UNKNOWN_STAFF", field="staff_id")
        return row

    async def list_staff(self, uow: UnitOfWork, store_id: str) -> list[repo.StaffRow]:
        return await repo.list_staff(uow.conn, store_id.strip())

    async def sync_directory(self, db: Database, actor: str) -> dict[str, int]:
        """WeCom's directory into the staff table. Staff gone from it, or
        disabled there, are resigned; their customers go to the store manager
        where the store has one (otherwise they wait for ResignStaff)."""
        users = await self.wecom.list_users()
        if not users:
            # An empty answer is a misconfigured app (no directory permission),
            # never "everyone left": resigning all staff would move every customer.
            raise FailedPrecondition(
                "WeCom's directory came back empty; check the app's directory permission",
                code="DIRECTORY_EMPTY",
            )
        counts = {"created": 0, "updated": 0, "resigned": 0, "unchanged": 0}
        seen: set[str] = set()
        leavers: list[repo.StaffRow] = []
        now = self.clock()
        async with db.unit_of_work() as uow:
            for user in users:
                seen.add(user.staff_id)
                before = await repo.get_staff(uow.conn, user.staff_id, lock=True)
                if not user.active:
                    if before is not None and before.status == "active":
                        leavers.append(before)
                    continue
                if not user.store_id:
                    log.warning("directory user %s has no store; skipped", user.staff_id)
                    continue
                try:
                    role = Role(user.role)
                except ValueError:
                    role = Role.GUIDE
                if before is not None and (before.name, before.store_id, before.role) == (
                    user.name,
                    user.store_id,
                    role.value,
                ):
                    counts["unchanged"] += 1
                    continue
                if before is not None and before.status == "resigned":
                    counts["unchanged"] += 1
                    continue
                await self.upsert_staff(
                    uow,
                    user.staff_id,
                    user.name,
                    user.store_id,
                    role.value,
                    before.staff_code if before else "",
                    actor,
                )
                counts["created" if before is None else "updated"] += 1
            for row in await repo.list_staff(uow.conn, ""):
                if row.status == "active" and row.staff_id not in seen:
                    leavers.append(row)
        for leaver in leavers:
            takeover = await self._store_manager(db, leaver)
            if takeover is None:
                async with db.unit_of_work() as uow:
                    await repo.upsert_staff(
                        uow.conn,
                        replace(leaver, status="resigned", updated_by=actor, updated_at=now),
                    )
                    await repo.audit(
                        uow.conn,
                        actor,
                        "staff_resigned",
                        f"staff:{leaver.staff_id}",
                        {
                            "takeover": None,
                            "note": "no store manager: customers wait for ResignStaff",
                        },
                        now,
                    )
            else:
                await self.resign_staff(db, leaver.staff_id, takeover, actor)
            counts["resigned"] += 1
        return counts

    async def _store_manager(self, db: Database, leaver: repo.StaffRow) -> str | None:
        async with db.reading() as uow:
            for row in await repo.list_staff(uow.conn, leaver.store_id):
                if (
                    row.role == Role.STORE_MANAGER.value
                    and row.status == "active"
                    and row.staff_id != leaver.staff_id
                ):
                    return row.staff_id
        return None

    async def resign_staff(
        self, db: Database, staff_id: str, takeover_id: str, actor: str
    ) -> tuple[int, list[str]]:
        """Mark the staff member resigned and move their customers (WeCom's
        resigned-staff transfer): each transferred customer's binding follows.
        Customers WeCom refuses stay where they are and are returned; calling
        again retries only them."""
        actor = domain.require_id(actor, "actor")
        takeover_id = domain.require_id(takeover_id, "takeover_staff_id")
        async with db.reading() as uow:
            leaver = await self.get_staff(uow, staff_id)
            takeover = await repo.get_staff(uow.conn, takeover_id)
            customers = await repo.customers_of(uow.conn, staff_id)
        if takeover is None or takeover.status != "active" or takeover_id == staff_id:
            raise FailedPrecondition(
                "the takeover staff member must be another active staff member",
                code="INVALID_TAKEOVER",
                field="takeover_staff_id",
            )
        results = (
            await self.wecom.transfer_resigned(staff_id, takeover_id, [ext for ext, _ in customers])
            if customers
            else {}
        )
        now = self.clock()
        moved = 0
        failed: list[str] = []
        async with db.unit_of_work() as uow:
            if leaver.status != "resigned":
                await repo.upsert_staff(
                    uow.conn, replace(leaver, status="resigned", updated_by=actor, updated_at=now)
                )
            for ext, member_id in customers:
                if results.get(ext, -1) != 0:
                    failed.append(ext)
                    continue
                await repo.move_link(uow.conn, ext, staff_id, takeover_id, now)
                await repo.lock_member(uow.conn, member_id)
                current = await repo.get_binding(uow.conn, member_id)
                if current is not None and current.staff_id == staff_id:
                    await self._rebind(
                        uow, member_id, staff_id, takeover, "resigned_transfer", actor, now
                    )
                moved += 1
            await repo.audit(
                uow.conn,
                actor,
                "staff_resigned",
                f"staff:{staff_id}",
                {"takeover": takeover_id, "transferred": moved, "failed": failed},
                now,
            )
        return moved, failed

    # ------------------------------------------------------------ callbacks

    def _encrypted(self, body: bytes) -> str:
        fields = domain.parse_xml(body, "body")
        encrypted = fields.get("Encrypt", "")
        if not encrypted:
            raise InvalidArgument(
                "the callback has no Encrypt element", code="INVALID_CALLBACK", field="body"
            )
        return encrypted

    def verify_url(self, msg_signature: str, ts: str, nonce: str, echostr: str) -> str:
        """WeCom's URL check: the decrypted echostr proves we hold the key."""
        self.crypto.verify(msg_signature, ts, nonce, echostr)
        domain.check_age(ts, self.clock(), self.callback_max_age)
        return self.crypto.decrypt(echostr).decode()

    async def receive_callback(
        self, uow: UnitOfWork, msg_signature: str, ts: str, nonce: str, body: bytes
    ) -> CallbackOutcome:
        """Verify, decrypt, store: nothing slow before WeCom gets its answer.
        A replayed request (same signature) or a redelivered event (same
        content) is answered as WeCom expects and changes nothing."""
        encrypted = self._encrypted(body)
        self.crypto.verify(msg_signature, ts, nonce, encrypted)
        now = self.clock()
        domain.check_age(ts, now, self.callback_max_age)
        message = self.crypto.decrypt(encrypted)
        event = domain.parse_event(message)
        if not await repo.remember_signature(uow.conn, msg_signature.lower(), now):
            return CallbackOutcome("success", "duplicate", event.dedup_key)
        fresh = await repo.enqueue_callback(
            uow.conn, event.dedup_key, event.event, event.change_type, message.decode(), now
        )
        return CallbackOutcome("success", "accepted" if fresh else "duplicate", event.dedup_key)

    async def process_next_callback(self, db: Database) -> bool:
        """Process one due callback; False when none is due. A failure is
        recorded and retried with backoff, then left `failed` for an operator."""
        now = self.clock()
        key = ""
        attempts = 0
        try:
            async with db.unit_of_work() as uow:
                row = await repo.claim_callback(uow.conn, now)
                if row is None:
                    return False
                key, attempts = row["dedup_key"], row["attempts"]
                event = domain.parse_event(row["message"].encode())
                status = await self._process(uow, event)
                await repo.finish_callback(uow.conn, key, status)
            return True
        except Exception as exc:
            if not key:
                raise
            final = attempts + 1 >= self.callback_max_attempts
            log.warning("callback %s failed (attempt %d): %r", key, attempts + 1, exc)
            async with db.unit_of_work() as uow:
                await repo.fail_callback(
                    uow.conn,
                    key,
                    exc.message if isinstance(exc, DomainError) else repr(exc),
                    "failed" if final else "pending",
                    now + timedelta(seconds=min(2**attempts, 300)),
                )
            return True

    async def _process(self, uow: UnitOfWork, event: domain.WeComEvent) -> str:
        now = self.clock()
        if event.event != "change_external_contact":
            # Group chats (change_external_chat) and directory changes
            # (change_contact) are kept in the inbox; SyncDirectory applies
            # the directory, and communities are not built yet.
            return "ignored"
        ext, staff_id = event.external_userid, event.staff_id
        if not ext or not staff_id:
            raise InvalidArgument("the event names no customer or staff", code="INVALID_CALLBACK")
        if event.change_type in ADD_CHANGES or event.change_type == "edit_external_contact":
            staff = await repo.get_staff(uow.conn, staff_id)
            if staff is None:
                raise FailedPrecondition(
                    f"staff {staff_id} is not known yet (sync the directory)", code="UNKNOWN_STAFF"
                )
            contact = await self.wecom.get_external_contact(ext)
            member_id = uuid.UUID(
                await self.members.identify_wecom(
                    self.corp_id, ext, contact.unionid, f"wecom:{staff.store_id}:{staff_id}"
                )
            )
            await repo.upsert_contact(uow.conn, ext, member_id, now)
            await repo.link_contact(uow.conn, ext, staff_id, now)
            if event.change_type in ADD_CHANGES:
                await self._bind_first(uow, member_id, staff, now)
            await repo.audit(
                uow.conn,
                WECOM_ACTOR,
                f"contact_{'added' if event.change_type in ADD_CHANGES else 'edited'}",
                f"member:{member_id}",
                {"staff_id": staff_id, "external_userid": ext, "state": event.state},
                now,
            )
            return "done"
        if event.change_type in REMOVE_CHANGES:
            await repo.unlink_contact(uow.conn, ext, staff_id, now)
            member_id_or_none = await repo.contact_member(uow.conn, ext)
            await repo.audit(
                uow.conn,
                WECOM_ACTOR,
                event.change_type,
                f"member:{member_id_or_none}" if member_id_or_none else f"contact:{ext}",
                {"staff_id": staff_id, "external_userid": ext},
                now,
            )
            return "done"
        await repo.audit(
            uow.conn,
            WECOM_ACTOR,
            event.change_type or "unknown",
            f"contact:{ext}",
            {"staff_id": staff_id},
            now,
        )
        return "done"

    # ------------------------------------------------------------ binding

    async def _bind_first(
        self, uow: UnitOfWork, member_id: uuid.UUID, staff: repo.StaffRow, now: datetime
    ) -> None:
        """The staff member who added the customer becomes the exclusive guide,
        unless the member already has one (the first guide keeps the member)."""
        await repo.lock_member(uow.conn, member_id)
        current = await repo.get_binding(uow.conn, member_id)
        if current is None:
            await self._rebind(uow, member_id, "", staff, "wecom_add", WECOM_ACTOR, now)
            await repo.funnel_added(uow.conn, member_id, now, staff.staff_id, staff.store_id)
        elif current.staff_id != staff.staff_id:
            await repo.audit(
                uow.conn,
                WECOM_ACTOR,
                "binding_kept",
                f"member:{member_id}",
                {"guide": current.staff_id, "also_added_by": staff.staff_id},
                now,
            )

    async def _rebind(
        self,
        uow: UnitOfWork,
        member_id: uuid.UUID,
        from_staff: str,
        staff: repo.StaffRow,
        reason: str,
        actor: str,
        now: datetime,
    ) -> None:
        await repo.set_binding(uow.conn, member_id, from_staff, staff, reason, actor, now)
        await repo.audit(
            uow.conn,
            actor,
            "guide_bound",
            f"member:{member_id}",
            {"from": from_staff, "to": staff.staff_id, "reason": reason},
            now,
        )
        await uow.emit(
            events_pb2.GuideBound(
                member_id=str(member_id),
                from_staff_id=from_staff,
                to_staff_id=staff.staff_id,
                store_id=staff.store_id,
                reason=reason,
                bound_at=timestamp(now),
            ),
            member_id=str(member_id),
        )

    async def reassign_guide(
        self, uow: UnitOfWork, member: str, staff_id: str, actor: str, reason: str
    ) -> None:
        member_id = parse_member_id(member)
        actor = domain.require_id(actor, "actor")
        staff = await repo.get_staff(uow.conn, staff_id)
        if staff is None or staff.status != "active":
            raise FailedPrecondition(
                f"staff {staff_id} is not an active staff member",
                code="UNKNOWN_STAFF",
                field="staff_id",
            )
        await repo.lock_member(uow.conn, member_id)
        current = await repo.get_binding(uow.conn, member_id)
        if current is not None and current.staff_id == staff.staff_id:
            return
        await self._rebind(
            uow,
            member_id,
            current.staff_id if current else "",
            staff,
            f"operator:{reason.strip()}" if reason.strip() else "operator",
            actor,
            self.clock(),
        )

    # ------------------------------------------------------------ attribution

    async def sign_link(self, uow: UnitOfWork, staff_id: str) -> str:
        staff = await self.get_staff(uow, staff_id)
        if staff.status != "active":
            raise FailedPrecondition(
                f"staff {staff_id} has resigned", code="STAFF_RESIGNED", field="staff_id"
            )
        return domain.sign_guide_ref(self.link_secret, staff.staff_id, self.clock())

    async def _candidates(
        self,
        uow: UnitOfWork,
        p: events_pb2.OrderCompleted,
        binding: repo.BindingRow | None,
        at: datetime,
    ) -> list[Candidate]:
        out: list[Candidate] = []
        if p.guide_ref:
            ref = domain.verify_guide_ref(self.link_secret, p.guide_ref, self.tz)
            staff = await repo.get_staff(uow.conn, ref.staff_id) if ref else None
            if ref and staff and staff.status == "active":
                out.append(
                    Candidate(
                        AttributionRule.GUIDE_LINK, staff.staff_id, staff.store_id, ref.issued_at
                    )
                )
            else:
                log.info("order %s: guide link not honoured", p.order_id)
        if p.staff_code:
            staff = await repo.staff_by_code(uow.conn, p.staff_code)
            if staff and staff.status == "active":
                out.append(
                    Candidate(AttributionRule.STAFF_CODE, staff.staff_id, staff.store_id, at)
                )
        if binding is not None:
            out.append(
                Candidate(
                    AttributionRule.BINDING, binding.staff_id, binding.store_id, binding.bound_at
                )
            )
        return out

    async def on_order_completed(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        p = event.payload
        assert isinstance(p, events_pb2.OrderCompleted)
        if not p.member_id:
            return
        member_id = uuid.UUID(p.member_id)
        at = to_datetime(p.ordered_at) or self.clock()
        # The member's lock first (the rule-tag refresh below needs it), with the binding.
        binding = await repo.lock_member_binding(uow.conn, member_id)
        chosen = domain.attribute(
            await self._candidates(uow, p, binding, at), self.rules, at, self.window
        )
        categories: dict[str, int] = {}
        for line in p.lines:
            if line.category:
                categories[line.category] = categories.get(line.category, 0) + line.quantity
        inserted = await repo.insert_order(
            uow.conn,
            uuid.UUID(p.order_id),
            member_id,
            p.store_id,
            CHANNEL_NAMES.get(p.channel, "store"),
            p.paid_amount_fen,
            at,
            sorted(categories.items()),
            chosen.staff_id if chosen else "",
            chosen.store_id if chosen else "",
            chosen.rule.value if chosen else "",
            date.fromisoformat(domain.local_day(at, self.tz)),
        )
        if inserted:  # the funnel was advanced by the same statement
            await self.refresh_rule_tags(uow, member_id, locked=True)

    async def on_order_refunded(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        p = event.payload
        assert isinstance(p, events_pb2.OrderRefunded)
        at = to_datetime(p.refunded_at) or self.clock()
        if (
            await repo.apply_refund(
                uow.conn, uuid.UUID(p.refund_id), uuid.UUID(p.order_id), p.refunded_amount_fen, at
            )
            and p.member_id
        ):
            await self.refresh_rule_tags(uow, uuid.UUID(p.member_id))

    async def on_member_registered(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        p = event.payload
        assert isinstance(p, events_pb2.MemberRegistered)
        at = to_datetime(p.registered_at) or self.clock()
        await repo.funnel_registered(uow.conn, uuid.UUID(p.member_id), at, p.source)

    async def order_attribution(self, uow: UnitOfWork, order_id: str) -> repo.Any:
        try:
            oid = uuid.UUID(order_id)
        except ValueError:
            raise InvalidArgument(
                "order_id is not an order id", code="INVALID_ORDER_ID", field="order_id"
            ) from None
        row = await repo.get_order(uow.conn, oid)
        if row is None:
            raise NotFound(f"no order {order_id} seen yet", code="UNKNOWN_ORDER", field="order_id")
        return row

    async def daily_report(
        self, uow: UnitOfWork, from_day: str, to_day: str, store_id: str, staff_id: str
    ) -> list[repo.Any]:
        start, end = _parse_day(from_day, "from_day"), _parse_day(to_day, "to_day")
        if end < start or (end - start).days > 366:
            raise InvalidArgument(
                "to_day must be on or after from_day, at most 366 days later",
                code="INVALID_RANGE",
                field="to_day",
            )
        return await repo.daily_report(uow.conn, start, end, store_id, staff_id)

    # ------------------------------------------------------------ tags

    async def _visible_tags(self, uow: UnitOfWork, member_id: uuid.UUID) -> set[str]:
        return {r["tag"] for r in await repo.tags_of(uow.conn, member_id)}

    async def _tags_changed(
        self, uow: UnitOfWork, member_id: uuid.UUID, before: set[str], now: datetime
    ) -> tuple[list[str], list[str]]:
        after = await self._visible_tags(uow, member_id)
        added, removed = sorted(after - before), sorted(before - after)
        if added or removed:
            await uow.emit(
                events_pb2.MemberTagsChanged(
                    member_id=str(member_id),
                    added=added,
                    removed=removed,
                    tags=sorted(after),
                    changed_at=timestamp(now),
                ),
                member_id=str(member_id),
            )
            await repo.enqueue_tag_push(uow.conn, member_id, added, removed)
        return added, removed

    async def list_tags(self, uow: UnitOfWork, member: str) -> list[repo.Any]:
        return await repo.tags_of(uow.conn, parse_member_id(member))

    async def set_tag(
        self,
        uow: UnitOfWork,
        member: str,
        tag: str,
        present: bool,
        actor: str,
        source: str = "manual",
    ) -> None:
        member_id = parse_member_id(member)
        tag = domain.normalise_tag(tag)
        actor = domain.require_id(actor, "actor")
        now = self.clock()
        await repo.lock_member(uow.conn, member_id)
        before = await self._visible_tags(uow, member_id)
        if present:
            changed = await repo.add_tag(uow.conn, member_id, tag, source, actor, now)
        else:
            changed = await repo.remove_tag(uow.conn, member_id, tag, source)
        if changed:
            await repo.audit(
                uow.conn,
                actor,
                "tag_added" if present else "tag_removed",
                f"member:{member_id}",
                {"tag": tag, "source": source},
                now,
            )
            await self._tags_changed(uow, member_id, before, now)

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
        await repo.merge_member_rows(uow.conn, p.merge_id, survivor, absorbed)
        kept = await repo.get_binding(uow.conn, survivor)
        moved = await repo.get_binding(uow.conn, absorbed)
        if moved is not None:
            await repo.delete_binding(uow.conn, absorbed)
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
            await repo.record_merge_moves(uow.conn, p.merge_id, bindings)
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
        moves = await repo.merge_moves(uow.conn, p.merge_id)
        if not moves:
            log.info("unmerge %s: no moves recorded here, nothing to move back", p.merge_id)
            return
        before = {m: await self._visible_tags(uow, m) for m in (survivor, restored)}
        await repo.unmerge_member_rows(uow.conn, moves, survivor, restored)
        bindings = dict(moves.get("binding", []))
        replaced = bindings.get("survivor")
        current = await repo.get_binding(uow.conn, survivor)
        if replaced is not None and current is not None:
            if current.staff_id == replaced["merged_to"]:
                if replaced["staff_id"]:
                    await self._restore_binding(uow, survivor, current.staff_id, replaced, now)
                else:
                    await repo.drop_binding(uow.conn, survivor, current.staff_id, "oneid", now)
                    await self._announce_binding(uow, survivor, current.staff_id, "", "", now)
        own = bindings.get("absorbed")
        if own is not None and await repo.get_binding(uow.conn, restored) is None:
            await self._restore_binding(uow, restored, "", own, now)
        await repo.audit(
            uow.conn, "oneid", "member_unmerged", f"member:{survivor}",
            {"restored": str(restored), "merge_id": p.merge_id}, now,
        )  # fmt: skip
        await repo.forget_merge_moves(uow.conn, p.merge_id)
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
        await repo.restore_binding(
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

    async def on_journey_tagged(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        """A journey's `tag` step writes into the one tag model (source "journey")."""
        p = event.payload
        assert isinstance(p, events_pb2.JourneyTagged)
        try:
            async with uow.conn.transaction():
                await self.set_tag(uow, p.member_id, p.tag, True, "journey", source="journey")
        except InvalidArgument as exc:
            # A journey's tag this model cannot hold (too long, unprintable):
            # retrying cannot help, so it is recorded instead of dead-lettered.
            await repo.audit(
                uow.conn, "journey", "tag_refused", f"member:{p.member_id}",
                {"tag": p.tag[:100], "code": exc.code}, self.clock(),
            )  # fmt: skip

    async def refresh_rule_tags(
        self, uow: UnitOfWork, member_id: uuid.UUID, locked: bool = False
    ) -> tuple[int, int]:
        """One member's rule tags from their orders in the window (incremental
        on each order event; the batch calls the same for every member).
        `locked`: the caller holds the member's lock (repo.lock_member)."""
        now = self.clock()
        if not locked:
            await repo.lock_member(uow.conn, member_id)
        rows, tags = await repo.recent_orders_and_tags(uow.conn, member_id, now - self.tag_window)
        facts = [
            OrderFact(
                str(r["order_id"]),
                r["store_id"],
                r["channel"],
                r["paid"],
                r["ordered_at"],
                tuple(_json_list(r["categories"])),
            )
            for r in rows
        ]
        want = domain.rule_tags(facts, self.tz, self.tag_rules)
        have = {tag for tag, source in tags if source == "rule"}
        if want == have:
            return 0, 0
        before = {tag for tag, _ in tags}  # read once: the rule tags and `before`
        for tag in want - have:
            await repo.add_tag(uow.conn, member_id, tag, "rule", "rules", now)
        for tag in have - want:
            await repo.remove_tag(uow.conn, member_id, tag, "rule")
        await self._tags_changed(uow, member_id, before, now)
        return len(want - have), len(have - want)

    async def run_tag_batch(self, db: Database, window_days: int = 0) -> TagBatchResult:
        handlers = self
        if window_days:
            if window_days < 1 or window_days > 3660:
                raise InvalidArgument(
                    "window_days must be 1..3660", code="INVALID_WINDOW", field="window_days"
                )
            handlers = replace_window(self, timedelta(days=window_days))
        async with db.reading() as uow:
            members = await repo.members_for_tag_batch(uow.conn, self.clock() - handlers.tag_window)
        added = removed = 0
        # A transaction per member: a batch never holds many members' locks.
        for member_id in members:
            async with db.unit_of_work() as uow:
                a, r = await handlers.refresh_rule_tags(uow, member_id)
            added, removed = added + a, removed + r
        return TagBatchResult(len(members), added, removed)

    async def push_next_tags(self, db: Database) -> bool:
        """Mark one queued tag change on the member's WeCom contacts; False when none."""
        async with db.unit_of_work() as uow:
            row = await repo.claim_tag_push(uow.conn, self.callback_max_attempts)
            if row is None:
                return False
            error = ""
            try:
                for staff_id, ext in await repo.links_of_member(uow.conn, row["member_id"]):
                    await self.wecom.mark_tags(
                        staff_id, ext, list(row["added"]), list(row["removed"])
                    )
            except DomainError as exc:
                error = exc.message or "failed"
            await repo.finish_tag_push(uow.conn, row["id"], error, self.clock())
        return True

    # ------------------------------------------------------------ funnel

    async def funnel_report(
        self, uow: UnitOfWork, from_day: str, to_day: str, group_by: str
    ) -> list[repo.Any]:
        start, end = _parse_day(from_day, "from_day"), _parse_day(to_day, "to_day")
        if end < start:
            raise InvalidArgument("to_day is before from_day", code="INVALID_RANGE", field="to_day")
        group = group_by or "store"
        if group not in ("store", "guide", "channel"):
            raise InvalidArgument(
                "group_by must be store, guide or channel",
                code="INVALID_GROUP_BY",
                field="group_by",
            )
        lo = datetime.combine(start, datetime.min.time(), self.tz)
        hi = datetime.combine(end + timedelta(days=1), datetime.min.time(), self.tz)
        return await repo.funnel_report(uow.conn, group, lo, hi)

    # ------------------------------------------------------------ the workstation

    async def open_workstation(
        self, uow: UnitOfWork, code: str
    ) -> tuple[repo.StaffRow, str, datetime]:
        """WeCom's OAuth code exchange: the sidebar page's staff member gets a session."""
        if not code.strip():
            raise InvalidArgument("code is required", code="MISSING_FIELD", field="code")
        try:
            staff_id = await self.wecom.user_of_code(code.strip())
        except DomainError:
            raise PermissionDenied(
                "WeCom did not accept the OAuth code", code="INVALID_OAUTH_CODE", field="code"
            ) from None
        staff = await repo.get_staff(uow.conn, staff_id)
        if staff is None or staff.status != "active":
            raise PermissionDenied(
                f"{staff_id} is not an active staff member", code="NOT_STAFF", field="code"
            )
        expires = self.clock() + self.session_ttl
        token = domain.sign_session(self.session_secret, staff.staff_id, expires)
        await repo.audit(
            uow.conn,
            staff.staff_id,
            "workstation_opened",
            f"staff:{staff.staff_id}",
            {},
            self.clock(),
        )
        return staff, token, expires

    async def _session(self, uow: UnitOfWork, token: str) -> repo.StaffRow:
        staff_id = domain.verify_session(self.session_secret, token, self.clock())
        staff = await repo.get_staff(uow.conn, staff_id)
        if staff is None or staff.status != "active":
            raise PermissionDenied(
                "the staff member is no longer active", code="NOT_STAFF", field="token"
            )
        return staff

    async def _visible(
        self, uow: UnitOfWork, token: str, member: str
    ) -> tuple[repo.StaffRow, uuid.UUID, str, str]:
        """(staff, member id, relation, the member's guide): a guide sees the
        members bound to them, and those bound to a guide of their store."""
        staff = await self._session(uow, token)
        member_id = parse_member_id(member)
        binding = await repo.get_binding(uow.conn, member_id)
        if binding is not None and binding.staff_id == staff.staff_id:
            return staff, member_id, "bound", binding.staff_id
        if binding is not None and binding.store_id == staff.store_id:
            return staff, member_id, "store", binding.staff_id
        raise PermissionDenied(
            "the member is not bound to you or your store",
            code="NOT_YOUR_CUSTOMER",
            field="member_id",
        )

    async def workstation_member(
        self, uow: UnitOfWork, token: str, member: str
    ) -> dict[str, object]:
        staff, member_id, relation, guide = await self._visible(uow, token, member)
        orders = await repo.member_orders(uow.conn, member_id, 10)
        await repo.audit(
            uow.conn, staff.staff_id, "member_viewed", f"member:{member_id}", {}, self.clock()
        )
        return {
            "member_id": str(member_id),
            "relation": relation,
            "guide": guide,
            "tags": await repo.tags_of(uow.conn, member_id),
            "orders": orders,
            "notes": await repo.notes_of(uow.conn, member_id),
            "last_order_at": orders[0]["ordered_at"] if orders else None,
        }

    async def workstation_tag(
        self, uow: UnitOfWork, token: str, member: str, tag: str, present: bool
    ) -> str:
        staff, member_id, _, _ = await self._visible(uow, token, member)
        await self.set_tag(uow, str(member_id), tag, present, staff.staff_id)
        return str(member_id)

    async def add_note(
        self, uow: UnitOfWork, token: str, member: str, text: str
    ) -> tuple[str, datetime]:
        staff, member_id, _, _ = await self._visible(uow, token, member)
        text = text.strip()
        if not text or len(text) > 1000:
            raise InvalidArgument("a note is 1-1000 characters", code="INVALID_NOTE", field="text")
        now = self.clock()
        await repo.add_note(uow.conn, member_id, staff.staff_id, text, now)
        await repo.audit(
            uow.conn,
            staff.staff_id,
            "note_added",
            f"member:{member_id}",
            {"length": len(text)},
            now,
        )
        return staff.staff_id, now

    async def set_budget(
        self, uow: UnitOfWork, scope: str, owner: str, month: str, coupons: int, actor: str
    ) -> repo.Any:
        if scope not in ("staff", "store"):
            raise InvalidArgument("scope is staff or store", code="INVALID_SCOPE", field="scope")
        owner = domain.require_id(owner, "owner_id")
        actor = domain.require_id(actor, "actor")
        try:
            datetime.strptime(month, "%Y-%m")
        except ValueError:
            raise InvalidArgument("month is YYYY-MM", code="INVALID_MONTH", field="month") from None
        if coupons < 0 or coupons > 1_000_000:
            raise InvalidArgument(
                "coupons must be 0..1000000", code="INVALID_BUDGET", field="coupons"
            )
        try:
            async with uow.conn.transaction():
                row = await repo.set_budget(uow.conn, scope, owner, month, coupons)
        except asyncpg.CheckViolationError:
            raise FailedPrecondition(
                "the budget would be below what is already used",
                code="BUDGET_BELOW_USED",
                field="coupons",
            ) from None
        await repo.audit(
            uow.conn,
            actor,
            "budget_set",
            f"{scope}:{owner}",
            {"month": month, "coupons": coupons},
            self.clock(),
        )
        return row

    async def grant_coupon(
        self, db: Database, token: str, member: str, template_id: str, grant_key: str
    ) -> tuple[str, str, int, int, bool]:
        """A coupon from the guide's budget and their store's, both taken in
        one transaction (or neither); then issued by rewards under a key derived
        from the grant key, so a retry after any failure issues at most once.
        A coupon rewards refuses gives the budget back."""
        if self.coupons is None:
            raise FailedPrecondition("coupon grants are not configured", code="GRANTS_DISABLED")
        template_id = domain.require_id(template_id, "template_id")
        grant_key = domain.require_id(grant_key, "grant_key")
        now = self.clock()
        month = domain.budget_month(now, self.tz)
        async with db.unit_of_work() as uow:
            staff, member_id, _, _ = await self._visible(uow, token, member)
            key = f"{staff.staff_id}:{grant_key}"
            prior = await repo.get_grant(uow.conn, key, lock=True)
            if prior is not None and (prior["member_id"], prior["template_id"]) != (
                member_id,
                template_id,
            ):
                raise AlreadyExists(
                    "grant_key was used for another grant",
                    code="GRANT_KEY_REUSED",
                    field="grant_key",
                )
            if prior is not None and prior["status"] == "issued":
                return (
                    prior["coupon_id"],
                    prior["coupon_code"],
                    await repo.remaining(uow.conn, "staff", staff.staff_id, prior["month"]),
                    await repo.remaining(uow.conn, "store", staff.store_id, prior["month"]),
                    True,
                )
            if prior is None or prior["status"] == "released":
                # Staff row first, then store: one lock order, no deadlock.
                staff_left = await repo.take_budget(uow.conn, "staff", staff.staff_id, month)
                store_left = (
                    await repo.take_budget(uow.conn, "store", staff.store_id, month)
                    if staff_left is not None
                    else None
                )
                if staff_left is None or store_left is None:
                    # Raising rolls back the staff budget taken above too.
                    raise ResourceExhausted(
                        f"no coupon budget left this month for the "
                        f"{'guide' if staff_left is None else 'store'}",
                        code="BUDGET_EXHAUSTED",
                        field="template_id",
                    )
                await repo.upsert_grant(
                    uow.conn,
                    key,
                    staff.staff_id,
                    staff.store_id,
                    member_id,
                    template_id,
                    month,
                    now,
                )
            else:
                month = prior["month"]  # reserved earlier; the issue is retried below
        try:
            coupon_id, code = await self.coupons.issue(
                template_id, str(member_id), f"guide-grant:{key}"[:128], staff.staff_id
            )
        except FailedPrecondition:
            async with db.unit_of_work() as uow:
                await repo.give_back_budget(uow.conn, "staff", staff.staff_id, month)
                await repo.give_back_budget(uow.conn, "store", staff.store_id, month)
                await repo.finish_grant(uow.conn, key, "released")
            raise
        async with db.unit_of_work() as uow:
            await repo.finish_grant(uow.conn, key, "issued", coupon_id, code)
            await repo.audit(
                uow.conn, staff.staff_id, "coupon_granted", f"member:{member_id}",
                {"template_id": template_id, "coupon_id": coupon_id, "month": month}, now,
            )  # fmt: skip
            return (
                coupon_id,
                code,
                await repo.remaining(uow.conn, "staff", staff.staff_id, month),
                await repo.remaining(uow.conn, "store", staff.store_id, month),
                False,
            )

    # ------------------------------------------------------------ communities

    async def upsert_community(
        self,
        uow: UnitOfWork,
        chat_id: str,
        name: str,
        store_id: str,
        audience: str,
        tiers: list[str],
        actor: str,
    ) -> repo.Any:
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
        row = await repo.upsert_community(
            uow.conn, chat_id, name.strip() or chat_id, store_id, audience, clean, actor
        )
        await repo.audit(
            uow.conn, actor, "community_saved", f"community:{chat_id}",
            {"store_id": store_id, "audience": audience, "tiers": clean}, self.clock(),
        )  # fmt: skip
        return row

    async def list_communities(self, uow: UnitOfWork, store_id: str) -> list[repo.Any]:
        return await repo.communities(uow.conn, store_id.strip())

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
            known = {g["chat_id"] for g in await repo.communities(uow.conn)}
            for chat_id in sorted(set(owned) - known):
                owner = await self.wecom.group_owner(chat_id)
                if owner not in store_of:
                    continue
                await repo.add_community(uow.conn, chat_id, store_of[owner], "general", actor)
                await repo.audit(
                    uow.conn, actor, "community_found", f"community:{chat_id}",
                    {"store_id": store_of[owner], "owner": owner}, self.clock(),
                )  # fmt: skip
        async with db.reading() as uow:
            groups = await repo.communities(uow.conn)
        joined = left = 0
        for group in groups:
            members = await self.wecom.group_members(group["chat_id"])
            now = self.clock()
            async with db.unit_of_work() as uow:
                live = await repo.live_group_members(uow.conn, group["chat_id"])
                for ext in sorted(set(members) - live):
                    at = datetime.fromtimestamp(members[ext], UTC) if members[ext] else now
                    await repo.join_group(uow.conn, group["chat_id"], ext, at)
                    await self._community_event(uow, ext, group, at, joined=True)
                    joined += 1
                for ext in sorted(live - set(members)):
                    await repo.leave_group(uow.conn, group["chat_id"], ext, now)
                    await self._community_event(uow, ext, group, now, joined=False)
                    left += 1
        async with db.unit_of_work() as uow:
            await repo.audit(
                uow.conn, actor, "communities_synced", "communities",
                {"groups": len(groups), "joined": joined, "left": left}, self.clock(),
            )  # fmt: skip
        return len(groups), joined, left

    async def _community_event(
        self, uow: UnitOfWork, ext: str, group: repo.Any, at: datetime, joined: bool
    ) -> None:
        member_id = await repo.contact_member(uow.conn, ext)
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
            await repo.communities(uow.conn, store_id),
            key=lambda g: (domain.AUDIENCES.index(g["audience"]), g["chat_id"]),
        )
        by_chat = {g["chat_id"]: g for g in groups}
        invite, misfits = [], []
        for row in await repo.store_members(uow.conn, store_id, staff_id.strip()):
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
    ) -> repo.Any:
        start, end = _parse_day(from_day, "from_day"), _parse_day(to_day, "to_day")
        if end < start:
            raise InvalidArgument("to_day is before from_day", code="INVALID_RANGE", field="to_day")
        lo = datetime.combine(start, datetime.min.time(), self.tz)
        hi = datetime.combine(end + timedelta(days=1), datetime.min.time(), self.tz)
        return await repo.community_report(uow.conn, chat_id, lo, hi)

    async def on_tier_changed(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        p = event.payload
        assert isinstance(p, events_pb2.TierChanged)
        await repo.set_member_tier(uow.conn, uuid.UUID(p.member_id), p.to_tier)

    # ------------------------------------------------------------ guide tasks

    async def on_guide_task_requested(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        """A journey asks the member's guide to act: the member joins the day's
        task of that guide and journey step (sent to WeCom once gathered)."""
        p = event.payload
        assert isinstance(p, events_pb2.GuideTaskRequested)
        member_id = uuid.UUID(p.member_id)
        at = to_datetime(p.requested_at) or self.clock()
        binding = await repo.get_binding(uow.conn, member_id)
        staff = await repo.get_staff(uow.conn, binding.staff_id) if binding else None
        ext = await repo.live_link(uow.conn, member_id, staff.staff_id) if staff else None
        if staff is None or staff.status != "active" or ext is None:
            reason = "no_guide" if staff is None or staff.status != "active" else "not_a_contact"
            await repo.audit(
                uow.conn, "journey", "task_skipped", f"member:{member_id}",
                {"journey_id": p.journey_id, "step_id": p.step_id, "reason": reason}, at,
            )  # fmt: skip
            return
        task_id = await repo.open_task(
            uow.conn, staff.staff_id, p.journey_id, p.step_id,
            # Gathered from when it arrived here (the journey's clock may differ).
            date.fromisoformat(domain.local_day(at, self.tz)), p.title, p.script, self.clock(),
        )  # fmt: skip
        await repo.add_target(uow.conn, task_id, member_id, ext)

    async def send_next_task(self, db: Database) -> bool:
        """Hand one gathered task to WeCom's message-task API; False when none."""
        async with db.unit_of_work() as uow:
            row = await repo.claim_task(uow.conn, "open", self.clock() - self.task_gather)
            if row is None:
                return False
            targets = await repo.task_targets(uow.conn, row["task_id"])
            try:
                msgid = await self.wecom.add_msg_template(
                    row["staff_id"], [t["external_userid"] for t in targets], row["script"]
                )
            except DomainError as exc:
                log.warning("guide task %s not sent: %s", row["task_id"], exc.message)
                return False  # stays open; the next poll tries again
            await repo.set_task(uow.conn, row["task_id"], "sent", msgid)
        return True

    async def track_sent_tasks(self, db: Database) -> bool:
        """Per customer, whether the guide sent the message; a task is done when
        nobody is pending. One pass over the sent tasks; False (no hot loop)."""
        statuses = {1: "sent", 2: "not_contact", 3: "failed"}
        async with db.reading() as uow:
            task_ids = await repo.sent_task_ids(uow.conn)
        for task_id in task_ids:
            async with db.unit_of_work() as uow:
                row = await repo.lock_sent_task(uow.conn, task_id)
                if row is None:
                    continue  # another replica has it, or it is done
                try:
                    results = await self.wecom.send_results(row["msgid"], row["staff_id"])
                except DomainError as exc:
                    log.warning("guide task %s not checked: %s", task_id, exc.message)
                    continue
                pending = False
                for t in await repo.task_targets(uow.conn, task_id):
                    status = statuses.get(results.get(t["external_userid"], 0), "pending")
                    pending = pending or status == "pending"
                    if status != t["status"]:
                        await repo.set_target(uow.conn, task_id, t["external_userid"], status)
                if not pending:
                    await repo.set_task(uow.conn, task_id, "done")
        return False

    async def list_tasks(
        self, uow: UnitOfWork, token: str
    ) -> list[tuple[repo.Any, list[repo.Any]]]:
        staff = await self._session(uow, token)
        return [
            (t, await repo.task_targets(uow.conn, t["task_id"]))
            for t in await repo.tasks_of(uow.conn, staff.staff_id)
        ]


def replace_window(handlers: GuidesHandlers, window: timedelta) -> GuidesHandlers:
    """The same handlers with another rule-tag window (a batch run's override)."""
    clone = object.__new__(GuidesHandlers)
    clone.__dict__.update(handlers.__dict__)
    clone.tag_window = window
    return clone


def _json_list(value: object) -> list[tuple[str, int]]:
    """A JSONB [[category, quantity], ...] as asyncpg returns it (text)."""
    data = json.loads(value) if isinstance(value, str) else value
    return [(str(c), int(q)) for c, q in data]  # type: ignore[union-attr]


def _binding_detail(binding: repo.BindingRow) -> dict[str, Any]:
    return {
        "staff_id": binding.staff_id,
        "store_id": binding.store_id,
        "bound_at": binding.bound_at.isoformat(),
    }
