"""WeCom's callbacks: the URL check, receiving a callback (verify, decrypt,
store; nothing slow before WeCom gets its answer) and processing the stored
ones with retries: a customer added (identified as a member, linked, bound to
the first guide), edited or removed.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta

from servicekit.db import Database, UnitOfWork
from servicekit.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
)

from . import binding_repository as binding_repo
from . import callback_repository as callback_repo
from . import domain, retries
from . import repository as repo
from .binding_handlers import BindingHandlers
from .handlers_common import WECOM_ACTOR

log = logging.getLogger(__name__)


# Callback changes that add a customer to a staff member's contacts.
ADD_CHANGES = frozenset({"add_external_contact", "add_half_external_contact"})


REMOVE_CHANGES = frozenset({"del_external_contact", "del_follow_user"})


@dataclass(frozen=True)
class CallbackOutcome:
    reply: str
    outcome: str  # accepted | duplicate
    dedup_key: str = ""


class CallbackHandlers(BindingHandlers):
    """WeCom's callback inbox and what each callback changes."""

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
        if not await callback_repo.remember_signature(uow.conn, msg_signature.lower(), now):
            return CallbackOutcome("success", "duplicate", event.dedup_key)
        fresh = await callback_repo.enqueue_callback(
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
                row = await callback_repo.claim_callback(uow.conn, now)
                if row is None:
                    return False
                key, attempts = row["dedup_key"], row["attempts"]
                event = domain.parse_event(row["message"].encode())
                status = await self._process(uow, event)
                await callback_repo.finish_callback(uow.conn, key, status)
            return True
        except Exception as exc:
            if not key:
                raise
            final = attempts + 1 >= self.callback_max_attempts
            log.warning("callback %s failed (attempt %d): %r", key, attempts + 1, exc)
            async with db.unit_of_work() as uow:
                await callback_repo.fail_callback(
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
            # the directory, and SyncCommunities (every 10 minutes) group chats.
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
            await binding_repo.upsert_contact(uow.conn, ext, member_id, now)
            await binding_repo.link_contact(uow.conn, ext, staff_id, now)
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
        if event.change_type == "transfer_fail":
            return await retries.on_transfer_fail(self, uow, event)
        if event.change_type in REMOVE_CHANGES:
            await binding_repo.unlink_contact(uow.conn, ext, staff_id, now)
            member_id_or_none = await binding_repo.contact_member(uow.conn, ext)
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
