"""WeCom work that can fail, made robust (issue 20 audit): what the guides
service sends to WeCom is retried with exponential back-off, never blocks
other work, and ends in a state an operator can see and act on.

- Tag pushes (`mark_tag`): a failed push waits (1 min, 2 min, 4 min ... 1 h)
  until `next_attempt_at`; after CALLBACK_MAX_ATTEMPTS it is abandoned with its
  error until `repush-tags` requeues it. Rule tags reach WeCom under a display
  name (zh-CN, `price:low` is 价格敏感); a name over WeCom's 30 characters is
  refused (`TAG_NAME_TOO_LONG`, audited) instead of failing the push forever.
- Guide tasks (`add_msg_template`): a task WeCom refuses backs off and lets the
  next task go; after TASK_MAX_ATTEMPTS it is `failed` with WeCom's code and
  its customers `not_sent`. A sent task the guide never sends `expires` after
  TASK_LIFE_HOURS: its customers are settled (sent or not_sent) and it is no
  longer polled.
- Resigned-staff transfers: WeCom's errcode 0 only starts a 24-hour takeover,
  so the transfer is recorded `pending`; `transfer_result` (polled by the
  directory-sync job or `poll-transfers`) or a `transfer_fail` callback
  settles it: status 1 moves the contact and the binding, 3 (the customer
  refused) and 4 (the takeover is at its customer limit) keep the old binding.

The use cases take the handlers (their clock, WeCom client, rebinding).
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from asyncpg import Connection

from servicekit.db import Database, UnitOfWork
from servicekit.errors import DomainError, InvalidArgument

from . import binding_repository as binding_repo
from . import repository as repo
from . import task_repository as task_repo
from .domain import WeComEvent

if TYPE_CHECKING:
    from .binding_handlers import BindingHandlers
    from .handlers_common import HandlersBase

log = logging.getLogger(__name__)

S = "guides"
WECOM_ACTOR = "wecom"

# WeCom's limit on a corp tag's name (add_corp_tag), in characters.
WECOM_TAG_NAME_MAX = 30

# Rule tags are codes (domain.rule_tags); guides see them in WeCom by name.
RULE_TAG_NAMES = {
    "price:low": "价格敏感",
    "price:mid": "中等客单",
    "price:high": "高客单",
    "habit:morning": "早间顾客",
    "habit:afternoon": "午后顾客",
    "habit:evening": "晚间顾客",
    "channel:store": "门店消费",
    "channel:mini_program": "小程序下单",
    "channel:delivery": "外卖下单",
}
# Rule tags with a value of their own: the prefix's name, then the value.
RULE_TAG_PREFIXES = {"category:": "偏好品类:", "store:": "常去门店:"}

# get_groupmsg_send_result's per-customer status.
SEND_STATUSES = {1: "sent", 2: "not_contact", 3: "failed"}


@dataclass(frozen=True)
class RetryPolicy:
    """How WeCom work is retried: back-off doubling from `backoff_base` up to
    `backoff_cap`; a guide task gives up after `task_max_attempts`; a sent task
    expires `task_life` after it was sent."""

    task_max_attempts: int = 5
    task_life: timedelta = timedelta(hours=72)
    backoff_base: timedelta = timedelta(minutes=1)
    backoff_cap: timedelta = timedelta(hours=1)

    def backoff(self, attempts: int) -> timedelta:
        """The wait after the `attempts`-th failed try (1, 2, ...)."""
        return min(self.backoff_base * 2 ** max(attempts - 1, 0), self.backoff_cap)


def wecom_error_code(exc: DomainError) -> str:
    """WeCom's errcode from a WeComError's message, or `no_answer`."""
    found = re.search(r"errcode (-?\d+)", exc.message or "")
    return found.group(1) if found else "no_answer"


def wecom_tag_name(tag: str) -> str:
    """The name a tag has in WeCom: a rule tag's display name, anything else
    as it is. Over WeCom's 30 characters: TAG_NAME_TOO_LONG."""
    name = RULE_TAG_NAMES.get(tag, "")
    if not name:
        for prefix, label in RULE_TAG_PREFIXES.items():
            if tag.startswith(prefix):
                name = label + tag.removeprefix(prefix)
                break
    name = name or tag
    if len(name) > WECOM_TAG_NAME_MAX:
        raise InvalidArgument(
            f"WeCom tag names are at most {WECOM_TAG_NAME_MAX} characters: {name!r}",
            code="TAG_NAME_TOO_LONG",
            field="tag",
        )
    return name


def _wecom_names(tags: list[str]) -> tuple[list[str], list[str]]:
    """(WeCom names of the tags that fit, tags refused)."""
    names, refused = [], []
    for tag in tags:
        try:
            names.append(wecom_tag_name(tag))
        except InvalidArgument:
            refused.append(tag)
    return names, refused


# ---------------------------------------------------------------- tag pushes


async def push_next_tags(h: HandlersBase, db: Database) -> bool:
    """Mark one due tag change on the member's WeCom contacts; False when none
    is due. A failure waits its back-off; the last allowed one abandons it."""
    now = h.clock()
    async with db.unit_of_work() as uow:
        row = await uow.conn.fetchrow(
            f"SELECT id, member_id, added, removed, attempts FROM {S}.tag_pushes"
            " WHERE done_at IS NULL AND attempts < $1 AND next_attempt_at <= $2"
            " ORDER BY next_attempt_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
            h.callback_max_attempts,
            now,
        )
        if row is None:
            return False
        added, refused = _wecom_names(list(row["added"]))
        removed, refused_removed = _wecom_names(list(row["removed"]))
        refused += refused_removed
        if refused:
            await repo.audit(
                uow.conn, WECOM_ACTOR, "tag_push_refused", f"member:{row['member_id']}",
                {"tags": refused, "code": "TAG_NAME_TOO_LONG"}, now,
            )  # fmt: skip
        error = ""
        try:
            if added or removed:
                for staff_id, ext in await binding_repo.links_of_member(uow.conn, row["member_id"]):
                    await h.wecom.mark_tags(staff_id, ext, added, removed)
        except DomainError as exc:
            error = exc.message or "failed"
        attempts = row["attempts"] + 1
        if error:
            await uow.conn.execute(
                f"UPDATE {S}.tag_pushes SET attempts = $2, last_error = $3, next_attempt_at = $4"
                " WHERE id = $1",
                row["id"],
                attempts,
                error[:500],
                now + h.retry.backoff(attempts),
            )
            if attempts >= h.callback_max_attempts:
                log.warning(
                    "tag push %s abandoned after %d attempts: %s", row["id"], attempts, error
                )
        else:
            note = f"TAG_NAME_TOO_LONG: {', '.join(refused)}" if refused else ""
            await uow.conn.execute(
                f"UPDATE {S}.tag_pushes SET attempts = $2, last_error = $3, done_at = $4"
                " WHERE id = $1",
                row["id"],
                attempts,
                note[:500],
                now,
            )
    return True


async def repush_tags(h: HandlersBase, db: Database, actor: str) -> int:
    """Requeue the abandoned tag pushes (attempts used up): due now, with a
    full set of attempts again. Audited; returns how many."""
    now = h.clock()
    async with db.unit_of_work() as uow:
        count = len(
            await uow.conn.fetch(
                f"UPDATE {S}.tag_pushes SET attempts = 0, next_attempt_at = $2"
                " WHERE done_at IS NULL AND attempts >= $1 RETURNING id",
                h.callback_max_attempts,
                now,
            )
        )
        await repo.audit(uow.conn, actor, "tags_repushed", "tag_pushes", {"requeued": count}, now)
    return count


# ---------------------------------------------------------------- guide tasks


async def send_next_task(h: HandlersBase, db: Database) -> bool:
    """Hand one gathered, due task to WeCom's message-task API; False when
    none is due. A refusal backs the task off (others go meanwhile); the last
    allowed one fails it with WeCom's code and settles its customers."""
    now = h.clock()
    async with db.unit_of_work() as uow:
        row = await uow.conn.fetchrow(
            f"SELECT task_id, staff_id, script, attempts FROM {S}.guide_tasks"
            " WHERE status = 'open' AND created_at <= $1"
            " AND (next_attempt_at IS NULL OR next_attempt_at <= $2)"
            " ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED",
            now - h.task_gather,
            now,
        )
        if row is None:
            return False
        task_id, attempts = row["task_id"], row["attempts"] + 1
        targets = await task_repo.task_targets(uow.conn, task_id)
        try:
            msgid = await h.wecom.add_msg_template(
                row["staff_id"], [t["external_userid"] for t in targets], row["script"]
            )
        except DomainError as exc:
            await _task_refused(h, uow.conn, task_id, attempts, exc, now)
            return True
        await uow.conn.execute(
            f"UPDATE {S}.guide_tasks SET status = 'sent', msgid = $2, sent_at = $3,"
            " attempts = $4, next_attempt_at = NULL WHERE task_id = $1",
            task_id,
            msgid,
            now,
            attempts,
        )
    return True


async def _task_refused(
    h: HandlersBase,
    conn: Connection,
    task_id: uuid.UUID,
    attempts: int,
    exc: DomainError,
    now: datetime,
) -> None:
    code, error = wecom_error_code(exc), (exc.message or "failed")[:500]
    if attempts < h.retry.task_max_attempts:
        log.warning("guide task %s not sent (attempt %d): %s", task_id, attempts, error)
        await conn.execute(
            f"UPDATE {S}.guide_tasks SET attempts = $2, last_error = $3, error_code = $4,"
            " next_attempt_at = $5 WHERE task_id = $1",
            task_id,
            attempts,
            error,
            code,
            now + h.retry.backoff(attempts),
        )
        return
    await conn.execute(
        f"UPDATE {S}.guide_tasks SET status = 'failed', attempts = $2, last_error = $3,"
        " error_code = $4, next_attempt_at = NULL WHERE task_id = $1",
        task_id,
        attempts,
        error,
        code,
    )
    await conn.execute(
        f"UPDATE {S}.task_targets SET status = 'not_sent' WHERE task_id = $1 AND status = 'pending'",
        task_id,
    )
    await repo.audit(
        conn, WECOM_ACTOR, "task_failed", f"task:{task_id}",
        {"attempts": attempts, "code": code, "error": error}, now,
    )  # fmt: skip


async def expire_tasks(h: HandlersBase, db: Database, limit: int = 500) -> int:
    """Sent tasks older than the task life: a last read of WeCom's results,
    then each customer still pending is `not_sent` and the task `expired` (no
    longer polled). Returns how many expired."""
    now = h.clock()
    async with db.reading() as uow:
        ids = [
            r["task_id"]
            for r in await uow.conn.fetch(
                f"SELECT task_id FROM {S}.guide_tasks WHERE status = 'sent' AND sent_at <= $1"
                " ORDER BY sent_at LIMIT $2",
                now - h.retry.task_life,
                limit,
            )
        ]
    expired = 0
    for task_id in ids:
        async with db.unit_of_work() as uow:
            row = await task_repo.lock_sent_task(uow.conn, task_id)
            if row is None:
                continue  # another replica has it, or it is settled
            try:
                results = await h.wecom.send_results(row["msgid"], row["staff_id"])
            except DomainError as exc:
                log.warning("guide task %s: last results unread: %s", task_id, exc.message)
                results = {}
            counts = {"sent": 0, "not_sent": 0}
            for t in await task_repo.task_targets(uow.conn, task_id):
                status = t["status"]
                if status == "pending":
                    status = SEND_STATUSES.get(results.get(t["external_userid"], 0), "not_sent")
                    await task_repo.set_target(uow.conn, task_id, t["external_userid"], status)
                counts["sent" if status == "sent" else "not_sent"] += 1
            await task_repo.set_task(uow.conn, task_id, "expired")
            await repo.audit(
                uow.conn, WECOM_ACTOR, "task_expired", f"task:{task_id}",
                {"sent_at": now.isoformat(), **counts}, now,
            )  # fmt: skip
            expired += 1
    return expired


# ---------------------------------------------------------------- resigned transfers


async def pending_transfers_of(conn: Connection, handover: str) -> set[str]:
    """The leaver's customers whose transfer WeCom has not settled yet."""
    rows = await conn.fetch(
        f"SELECT external_userid FROM {S}.resigned_transfers"
        " WHERE handover_staff_id = $1 AND status = 'pending'",
        handover,
    )
    return {r["external_userid"] for r in rows}


async def record_transfer(
    uow: UnitOfWork,
    handover: str,
    takeover: str,
    ext: str,
    member_id: uuid.UUID,
    actor: str,
    now: datetime,
) -> None:
    """WeCom accepted the request (errcode 0): the takeover is pending."""
    await uow.conn.execute(
        f"INSERT INTO {S}.resigned_transfers (handover_staff_id, takeover_staff_id,"
        " external_userid, member_id, actor, requested_at) VALUES ($1, $2, $3, $4, $5, $6)"
        " ON CONFLICT (handover_staff_id, external_userid) WHERE status = 'pending' DO NOTHING",
        handover,
        takeover,
        ext,
        member_id,
        actor,
        now,
    )
    await repo.audit(
        uow.conn, actor, "transfer_requested", f"member:{member_id}",
        {"from": handover, "to": takeover, "external_userid": ext}, now,
    )  # fmt: skip


async def poll_transfers(h: BindingHandlers, db: Database) -> dict[str, int]:
    """Ask WeCom how each pending transfer went (transfer_result, per leaver
    and takeover) and settle those it has decided."""
    async with db.reading() as uow:
        pairs = await uow.conn.fetch(
            f"SELECT DISTINCT handover_staff_id, takeover_staff_id FROM {S}.resigned_transfers"
            " WHERE status = 'pending' ORDER BY 1, 2"
        )
    counts = {"done": 0, "refused": 0, "pending": 0}
    for pair in pairs:
        handover, takeover = pair["handover_staff_id"], pair["takeover_staff_id"]
        try:
            results = await h.wecom.transfer_result(handover, takeover)
        except DomainError as exc:
            log.warning("transfer_result %s -> %s unread: %s", handover, takeover, exc.message)
            continue
        async with db.unit_of_work() as uow:
            rows = await uow.conn.fetch(
                f"SELECT * FROM {S}.resigned_transfers WHERE handover_staff_id = $1"
                " AND takeover_staff_id = $2 AND status = 'pending' ORDER BY id"
                " FOR UPDATE SKIP LOCKED",
                handover,
                takeover,
            )
            now = h.clock()
            for row in rows:
                status, _ = results.get(row["external_userid"], (0, 0))
                if status == 1:
                    await _transfer_done(h, uow, row, now)
                    counts["done"] += 1
                elif status in (3, 4):
                    reason = "customer_refused" if status == 3 else "customer_limit_exceed"
                    await _transfer_refused(uow, row, status, reason, now)
                    counts["refused"] += 1
                else:  # 2: waiting (WeCom takes over after 24 hours); none yet
                    counts["pending"] += 1
    return counts


async def _transfer_done(h: BindingHandlers, uow: UnitOfWork, row: Any, now: datetime) -> None:
    handover, takeover, ext = (
        row["handover_staff_id"],
        row["takeover_staff_id"],
        row["external_userid"],
    )
    member_id = row["member_id"]
    await binding_repo.move_link(uow.conn, ext, handover, takeover, now)
    await repo.lock_member(uow.conn, member_id)
    current = await binding_repo.get_binding(uow.conn, member_id)
    staff = await repo.get_staff(uow.conn, takeover)
    rebound = current is not None and current.staff_id == handover and staff is not None
    if rebound:
        assert staff is not None
        await h._rebind(uow, member_id, handover, staff, "resigned_transfer", row["actor"], now)
    await _settle(uow.conn, row["id"], "done", 1, "", now)
    await repo.audit(
        uow.conn, WECOM_ACTOR, "transfer_done", f"member:{member_id}",
        {"from": handover, "to": takeover, "external_userid": ext, "rebound": rebound}, now,
    )  # fmt: skip


async def _transfer_refused(
    uow: UnitOfWork, row: Any, wecom_status: int, reason: str, now: datetime
) -> None:
    """The customer stays with the leaver in WeCom, and the binding stays."""
    await _settle(uow.conn, row["id"], "refused", wecom_status, reason, now)
    await repo.audit(
        uow.conn, WECOM_ACTOR, "transfer_refused", f"member:{row['member_id']}",
        {"from": row["handover_staff_id"], "to": row["takeover_staff_id"],
         "external_userid": row["external_userid"], "status": wecom_status, "reason": reason},
        now,
    )  # fmt: skip


async def _settle(
    conn: Connection, row_id: int, status: str, wecom_status: int, reason: str, now: datetime
) -> None:
    await conn.execute(
        f"UPDATE {S}.resigned_transfers SET status = $2, wecom_status = $3, reason = $4,"
        " settled_at = $5 WHERE id = $1",
        row_id,
        status,
        wecom_status,
        reason,
        now,
    )


async def on_transfer_fail(h: BindingHandlers, uow: UnitOfWork, event: WeComEvent) -> str:
    """WeCom's `transfer_fail` callback (UserID: the takeover): the pending
    transfer of that customer to them is refused."""
    reason = event.fields.get("FailReason", "")
    row = await uow.conn.fetchrow(
        f"SELECT * FROM {S}.resigned_transfers WHERE external_userid = $1"
        " AND takeover_staff_id = $2 AND status = 'pending' ORDER BY id LIMIT 1 FOR UPDATE",
        event.external_userid,
        event.staff_id,
    )
    now = h.clock()
    if row is None:
        await repo.audit(
            uow.conn, WECOM_ACTOR, "transfer_fail", f"contact:{event.external_userid}",
            {"staff_id": event.staff_id, "reason": reason, "pending": False}, now,
        )  # fmt: skip
        return "done"
    status = 4 if reason == "customer_limit_exceed" else 3
    await _transfer_refused(uow, row, status, reason or "transfer_fail", now)
    return "done"


async def transfers_of(conn: Connection, handover: str) -> list[Any]:
    """A leaver's transfers, newest first (for operators and tests)."""
    return list(
        await conn.fetch(
            f"SELECT external_userid, takeover_staff_id, member_id, status, wecom_status,"
            f" reason, requested_at, settled_at FROM {S}.resigned_transfers"
            " WHERE handover_staff_id = $1 ORDER BY id DESC",
            handover,
        )
    )
