"""WeCom work that fails (issue 20 audit), against the real database and the
guides' WeCom fake: tag pushes back off exponentially, are abandoned after
CALLBACK_MAX_ATTEMPTS and requeued by `repush-tags`, and reach WeCom under
display names (a name over 30 characters refused by name); a guide task WeCom
refuses backs off without blocking the next and fails after
TASK_MAX_ATTEMPTS; a sent task expires after TASK_LIFE_HOURS; a resigned
staff member's customers move only when transfer_result says so.

The handlers run on their own clock in 2030, far from the session guides
service's real-time clock, so its loops never take these rows."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from servicekit.db import Database, asyncpg_dsn, create_pool
from services.guides import binding_repository as binding_repo
from services.guides import domain, retries
from services.guides import repository as repo
from services.guides import tag_repository as tag_repo
from services.guides import task_repository as task_repo
from services.guides.handlers import GuidesHandlers
from services.guides.server import build
from services.guides.settings import GuidesSettings
from services.guides.wecom import FakeWeCom

from ..harness import Infra
from .guides_support import uid

START = datetime(2030, 6, 3, 1, 0, tzinfo=UTC)


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
def fake() -> FakeWeCom:
    return FakeWeCom(msgid_prefix=f"rt{uuid.uuid4().hex[:6]}-")


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@contextlib.asynccontextmanager
async def _handlers(
    infra: Infra, fake: FakeWeCom, clock: Clock
) -> AsyncIterator[tuple[GuidesHandlers, Database]]:
    settings = GuidesSettings(
        **infra.service_settings().model_dump(),
        member_addr="127.0.0.1:1",
        wecom_corp_id=fake.corp_id,
        wecom_secret=fake.secret,
        task_gather_seconds=0,
        task_max_attempts=3,
        task_life_hours=48,
    )
    app = build(settings, clock=clock, wecom_transport=fake.transport())
    pool = await create_pool(infra.database_url, 1, 3)
    try:
        yield app.handlers, Database(pool, "guides", "guides")
    finally:
        await pool.close()
        await app.handlers.wecom.close()
        await app.handlers.members.close()
        if app.handlers.coupons is not None:
            await app.handlers.coupons.close()


@pytest.fixture
async def pair(
    infra: Infra, fake: FakeWeCom, clock: Clock
) -> AsyncIterator[tuple[GuidesHandlers, Database]]:
    async with _handlers(infra, fake, clock) as p:
        yield p


async def _drain(step: Callable[[Database], Awaitable[bool]], db: Database) -> None:
    """Run a loop's step until it has nothing due (other tests' rows included)."""
    for _ in range(500):
        if not await step(db):
            return
    raise AssertionError("the step never ran dry")


async def _staff(db: Database, at: datetime, store: str = "SH001") -> repo.StaffRow:
    staff_id = uid("g")
    row = repo.StaffRow(staff_id, "导购", store, "guide", "active", staff_id, "test", at)
    async with db.unit_of_work() as uow:
        return await repo.upsert_staff(uow.conn, row)


async def _customer(db: Database, staff: repo.StaffRow, at: datetime) -> tuple[str, uuid.UUID]:
    """A WeCom contact of the staff member, bound to them."""
    ext, member_id = uid("wm"), uuid.uuid4()
    async with db.unit_of_work() as uow:
        await binding_repo.upsert_contact(uow.conn, ext, member_id, at)
        await binding_repo.link_contact(uow.conn, ext, staff.staff_id, at)
        await binding_repo.set_binding(uow.conn, member_id, "", staff, "wecom_add", "wecom", at)
    return ext, member_id


async def _row(db: Database, sql: str, *args: Any) -> Any:
    async with db.reading() as uow:
        return await uow.conn.fetchrow(sql, *args)


# ---------------------------------------------------------------- tag pushes


async def test_a_failing_tag_push_backs_off_is_abandoned_then_requeued(
    pair: tuple[GuidesHandlers, Database], fake: FakeWeCom, clock: Clock
) -> None:
    h, db = pair
    staff = await _staff(db, clock())
    ext, member_id = await _customer(db, staff, clock())
    fake.mark_errors[staff.staff_id] = 45033  # WeCom: too many concurrent calls
    async with db.unit_of_work() as uow:
        await tag_repo.enqueue_tag_push(uow.conn, member_id, ["price:low"], [], clock())
    sql = (
        "SELECT attempts, last_error, next_attempt_at, done_at FROM guides.tag_pushes"
        " WHERE member_id = $1"
    )

    await _drain(h.push_next_tags, db)
    push = await _row(db, sql, member_id)
    # One try, then a wait: not retried at once (main retried 5 times in a row).
    assert push["attempts"] == 1 and "errcode 45033" in push["last_error"]
    assert push["next_attempt_at"] == clock() + timedelta(minutes=1)
    waits = [timedelta(minutes=1)]
    for n in range(2, 6):
        clock.at = push["next_attempt_at"] - timedelta(seconds=1)
        await _drain(h.push_next_tags, db)
        assert (await _row(db, sql, member_id))["attempts"] == n - 1  # not due yet
        clock.at = push["next_attempt_at"]
        await _drain(h.push_next_tags, db)
        push = await _row(db, sql, member_id)
        assert push["attempts"] == n
        waits.append(push["next_attempt_at"] - clock())
    assert waits == [timedelta(minutes=m) for m in (1, 2, 4, 8, 16)]
    # CALLBACK_MAX_ATTEMPTS (5) used: abandoned, however long it waits.
    clock.at += timedelta(days=1)
    await _drain(h.push_next_tags, db)
    assert (await _row(db, sql, member_id))["attempts"] == 5
    assert push["done_at"] is None

    # WeCom is back; an operator requeues the abandoned pushes.
    del fake.mark_errors[staff.staff_id]
    assert await retries.repush_tags(h, db, "op") >= 1
    await _drain(h.push_next_tags, db)
    push = await _row(db, sql, member_id)
    assert push["done_at"] == clock() and push["attempts"] == 1
    # The rule tag's code reached WeCom as its display name.
    assert fake.marked[(staff.staff_id, ext)] == {"价格敏感"}
    audit = await _row(
        db, "SELECT actor, detail FROM guides.audit WHERE action = 'tags_repushed' AND at = $1",
        clock(),
    )  # fmt: skip
    assert audit["actor"] == "op"


async def test_tags_reach_wecom_by_display_name_and_a_long_name_is_refused(
    pair: tuple[GuidesHandlers, Database], fake: FakeWeCom, clock: Clock
) -> None:
    h, db = pair
    staff = await _staff(db, clock())
    ext, member_id = await _customer(db, staff, clock())
    long_tag = "x" * 31  # a manual tag may be 32 characters; WeCom takes 30
    async with db.unit_of_work() as uow:
        await tag_repo.enqueue_tag_push(
            uow.conn, member_id, ["habit:morning", "category:fruit_tea", long_tag, "vip"], [],
            clock(),
        )  # fmt: skip
    await _drain(h.push_next_tags, db)
    push = await _row(
        db, "SELECT attempts, last_error, done_at FROM guides.tag_pushes WHERE member_id = $1",
        member_id,
    )  # fmt: skip
    # Done in one try: the long name is refused by name, the others are marked.
    assert push["done_at"] is not None and push["attempts"] == 1
    assert push["last_error"] == f"TAG_NAME_TOO_LONG: {long_tag}"
    assert fake.marked[(staff.staff_id, ext)] == {"早间顾客", "偏好品类:fruit_tea", "vip"}
    refused = await _row(
        db, "SELECT detail FROM guides.audit WHERE action = 'tag_push_refused' AND subject = $1",
        f"member:{member_id}",
    )  # fmt: skip
    assert long_tag in refused["detail"] and "TAG_NAME_TOO_LONG" in refused["detail"]
    # Removing the rule tag removes the same display name.
    async with db.unit_of_work() as uow:
        await tag_repo.enqueue_tag_push(uow.conn, member_id, [], ["habit:morning"], clock())
    await _drain(h.push_next_tags, db)
    assert fake.marked[(staff.staff_id, ext)] == {"偏好品类:fruit_tea", "vip"}


# ---------------------------------------------------------------- guide tasks


async def _task(db: Database, staff: repo.StaffRow, at: datetime, n: int = 1) -> uuid.UUID:
    async with db.unit_of_work() as uow:
        task_id = await task_repo.open_task(
            uow.conn, staff.staff_id, uid("j"), "ask", date(2030, 6, 3), "唤醒", "好久不见", at
        )
    for _ in range(n):
        ext, member_id = await _customer(db, staff, at)
        async with db.unit_of_work() as uow:
            await task_repo.add_target(uow.conn, task_id, member_id, ext)
    return task_id


TASK = "SELECT status, attempts, error_code, next_attempt_at FROM guides.guide_tasks WHERE task_id = $1"


async def test_a_task_wecom_refuses_backs_off_never_blocks_and_fails(
    pair: tuple[GuidesHandlers, Database], fake: FakeWeCom, clock: Clock
) -> None:
    h, db = pair
    refused_guide, other_guide = await _staff(db, clock()), await _staff(db, clock())
    # The refused task is the older one: main's claim (ORDER BY created_at)
    # took it first on every poll and gave up, so the second was never sent.
    first = await _task(db, refused_guide, clock() - timedelta(minutes=2), n=2)
    second = await _task(db, other_guide, clock() - timedelta(minutes=1))
    fake.template_errors[refused_guide.staff_id] = 41048  # WeCom refuses this sender

    await _drain(h.send_next_task, db)
    assert (await _row(db, TASK, second))["status"] == "sent"
    assert [t for t in fake.msg_tasks.values() if t["sender"] == other_guide.staff_id]
    row = await _row(db, TASK, first)
    assert (row["status"], row["attempts"], row["error_code"]) == ("open", 1, "41048")
    assert row["next_attempt_at"] == clock() + timedelta(minutes=1)

    clock.at = row["next_attempt_at"]
    await _drain(h.send_next_task, db)
    row = await _row(db, TASK, first)
    assert (row["status"], row["attempts"]) == ("open", 2)
    clock.at = row["next_attempt_at"]
    await _drain(h.send_next_task, db)
    # TASK_MAX_ATTEMPTS (3 here): failed with WeCom's code, customers settled.
    row = await _row(db, TASK, first)
    assert (row["status"], row["attempts"], row["error_code"]) == ("failed", 3, "41048")
    async with db.reading() as uow:
        targets = await task_repo.task_targets(uow.conn, first)
        audit = await repo.audit_of(uow.conn, f"task:{first}")
    assert {t["status"] for t in targets} == {"not_sent"}
    assert [(a["action"], a["detail"]["code"]) for a in audit] == [("task_failed", "41048")]
    # No longer tried, and not among the guide's open work.
    clock.at += timedelta(days=1)
    await _drain(h.send_next_task, db)
    assert (await _row(db, TASK, first))["attempts"] == 3
    async with db.reading() as uow:
        assert await task_repo.tasks_of(uow.conn, refused_guide.staff_id) == []


async def test_a_sent_task_never_sent_by_the_guide_expires(
    pair: tuple[GuidesHandlers, Database], fake: FakeWeCom, clock: Clock
) -> None:
    h, db = pair
    guide = await _staff(db, clock())
    task_id = await _task(db, guide, clock(), n=2)
    await _drain(h.send_next_task, db)
    assert (await _row(db, TASK, task_id))["status"] == "sent"
    msgid = (await _row(db, "SELECT msgid FROM guides.guide_tasks WHERE task_id = $1", task_id))[
        "msgid"
    ]
    sent_ext = sorted(fake.msg_tasks[msgid]["status"])[0]
    fake.msg_tasks[msgid]["status"][sent_ext] = 1  # the guide sent to one only

    # Within TASK_LIFE_HOURS (48 here) it is polled and stays sent.
    clock.at = START + timedelta(hours=47)
    await h.track_sent_tasks(db)
    assert (await _row(db, TASK, task_id))["status"] == "sent"
    clock.at = START + timedelta(hours=48)
    await h.track_sent_tasks(db)
    assert (await _row(db, TASK, task_id))["status"] == "expired"
    async with db.reading() as uow:
        targets = {
            t["external_userid"]: t["status"]
            for t in await task_repo.task_targets(uow.conn, task_id)
        }
        audit = await repo.audit_of(uow.conn, f"task:{task_id}")
    assert targets[sent_ext] == "sent"
    assert sorted(targets.values()) == ["not_sent", "sent"]
    assert audit[-1]["action"] == "task_expired"
    assert (audit[-1]["detail"]["sent"], audit[-1]["detail"]["not_sent"]) == (1, 1)
    # Expired: no longer among the sent tasks the loop polls, nor the guide's tasks.
    async with db.reading() as uow:
        assert task_id not in await task_repo.sent_task_ids(uow.conn)
        assert await task_repo.tasks_of(uow.conn, guide.staff_id) == []


# ---------------------------------------------------------------- resigned transfers


def _transfer_fail(takeover: str, ext: str, reason: str, at: datetime) -> domain.WeComEvent:
    xml = (
        f"<xml><ToUserName>corp</ToUserName><FromUserName>sys</FromUserName>"
        f"<CreateTime>{int(at.timestamp())}</CreateTime><MsgType>event</MsgType>"
        "<Event>change_external_contact</Event><ChangeType>transfer_fail</ChangeType>"
        f"<FailReason>{reason}</FailReason><UserID>{takeover}</UserID>"
        f"<ExternalUserID>{ext}</ExternalUserID></xml>"
    )
    return domain.parse_event(xml.encode())


async def test_a_resigned_transfer_is_pending_until_wecom_settles_it(
    pair: tuple[GuidesHandlers, Database], fake: FakeWeCom, clock: Clock
) -> None:
    h, db = pair
    leaver, takeover = await _staff(db, clock(), "SH004"), await _staff(db, clock(), "SH004")
    done, refused, limited, waiting = [await _customer(db, leaver, clock()) for _ in range(4)]

    moved, failed = await h.resign_staff(db, leaver.staff_id, takeover.staff_id, "op-9")
    assert (moved, failed) == (4, [])

    async def guide_of(member_id: uuid.UUID) -> str:
        async with db.reading() as uow:
            b = await binding_repo.get_binding(uow.conn, member_id)
        assert b is not None
        return b.staff_id

    # errcode 0 only started WeCom's 24-hour takeover: nobody moved yet
    # (main moved every binding at once).
    for _, member_id in (done, refused, limited, waiting):
        assert await guide_of(member_id) == leaver.staff_id
    async with db.reading() as uow:
        rows = await retries.transfers_of(uow.conn, leaver.staff_id)
    assert {r["status"] for r in rows} == {"pending"} and len(rows) == 4
    # Resigning again does not ask WeCom twice for a pending customer.
    calls = len(fake.transfers)
    await h.resign_staff(db, leaver.staff_id, takeover.staff_id, "op-9")
    assert len(fake.transfers) == calls

    fake.transfer_status[done[0]] = 1
    fake.transfer_status[refused[0]] = 3
    clock.at += timedelta(hours=24)
    counts = await retries.poll_transfers(h, db)
    assert (counts["done"], counts["refused"]) == (1, 1) and counts["pending"] >= 2
    assert await guide_of(done[1]) == takeover.staff_id
    assert await guide_of(refused[1]) == leaver.staff_id
    async with db.reading() as uow:
        links = await binding_repo.links_of_member(uow.conn, done[1])
        history = await uow.conn.fetchrow(
            "SELECT reason, actor FROM guides.binding_history WHERE member_id = $1"
            " ORDER BY changed_at DESC LIMIT 1",
            done[1],
        )
        done_audit = await repo.audit_of(uow.conn, f"member:{done[1]}")
        refused_audit = await repo.audit_of(uow.conn, f"member:{refused[1]}")
    assert links == [(takeover.staff_id, done[0])]
    assert (history["reason"], history["actor"]) == ("resigned_transfer", "op-9")
    assert [a["action"] for a in done_audit] == [
        "transfer_requested",
        "guide_bound",
        "transfer_done",
    ]
    assert [a["action"] for a in refused_audit] == ["transfer_requested", "transfer_refused"]
    assert refused_audit[-1]["detail"]["status"] == 3

    # WeCom's transfer_fail callback: the takeover is at its customer limit.
    async with db.unit_of_work() as uow:
        outcome = await h._process(
            uow, _transfer_fail(takeover.staff_id, limited[0], "customer_limit_exceed", clock())
        )
    assert outcome == "done"
    assert await guide_of(limited[1]) == leaver.staff_id
    async with db.reading() as uow:
        settled = {
            r["external_userid"]: r for r in await retries.transfers_of(uow.conn, leaver.staff_id)
        }
    assert (settled[limited[0]]["status"], settled[limited[0]]["wecom_status"]) == ("refused", 4)
    assert settled[limited[0]]["reason"] == "customer_limit_exceed"
    assert (settled[done[0]]["status"], settled[waiting[0]]["status"]) == ("done", "pending")
    # Still waiting (status 2): polled again later, unchanged.
    assert (await retries.poll_transfers(h, db))["pending"] >= 1
    assert await guide_of(waiting[1]) == leaver.staff_id


# ---------------------------------------------------------------- the rule-tag batch


async def test_the_rule_tag_batch_runs_in_one_replica_once_per_period(
    pair: tuple[GuidesHandlers, Database], clock: Clock, infra: Infra
) -> None:
    from servicekit.errors import FailedPrecondition
    from services.guides import tag_batch

    h, db = pair
    other = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        # Another replica (or the CronJob) is running it: this one skips.
        assert await other.fetchval(
            "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", tag_batch.LOCK_NAME
        )
        assert await tag_batch.run_alone(h, db, window_days=1) is None
        with pytest.raises(FailedPrecondition) as busy:
            await tag_batch.run_or_refuse(h, db, window_days=1)
        assert busy.value.code == "TAG_BATCH_BUSY"
        await other.execute(
            "SELECT pg_advisory_unlock(hashtextextended($1, 0))", tag_batch.LOCK_NAME
        )
        ran = await tag_batch.run_alone(h, db, window_days=1)
        assert ran is not None
        every = timedelta(hours=24)
        # A replica whose timer fires an hour after that run skips the period...
        clock.at = START + timedelta(hours=1)
        assert await tag_batch.run_alone(h, db, window_days=1, every=every) is None
        # ...and runs once the period has passed.
        clock.at = START + timedelta(hours=25)
        assert await tag_batch.run_alone(h, db, window_days=1, every=every) is not None
        last = await other.fetchval(
            "SELECT last_run_at FROM guides.job_runs WHERE job = $1", tag_batch.JOB
        )
        assert last == clock()
    finally:
        await other.execute("DELETE FROM guides.job_runs WHERE job = $1", "tag-batch")
        await other.close()


async def _cli(infra: Infra, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "DATABASE_URL": infra.database_url, "WECOM_API_BASE": "fake"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.guides", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_operator_commands(infra: Infra) -> None:
    from services.guides import tag_batch

    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        push_id = await conn.fetchval(
            "INSERT INTO guides.tag_pushes (member_id, added, removed, attempts, last_error)"
            " VALUES ($1, '{vip}', '{}', 5, 'WeCom was down') RETURNING id",
            uuid.uuid4(),
        )
        code, out, err = await _cli(infra, "repush-tags", "--actor", "cli-op")
        assert code == 0, err
        assert out.startswith("requeued ") and int(out.split()[1]) >= 1
        assert await conn.fetchval(
            "SELECT attempts FROM guides.tag_pushes WHERE id = $1", push_id
        ) in (0, 1)  # requeued (and perhaps pushed again by a running service)
        code, out, err = await _cli(infra, "poll-transfers")
        assert code == 0, err
        assert "'done'" in out and "'refused'" in out
        # The batch while another runner holds it: refused by name.
        assert await conn.fetchval(
            "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", tag_batch.LOCK_NAME
        )
        try:
            code, _, err = await _cli(infra, "tag-batch", "--window-days", "1")
        finally:
            await conn.execute(
                "SELECT pg_advisory_unlock(hashtextextended($1, 0))", tag_batch.LOCK_NAME
            )
        assert code == 1 and err.startswith("TAG_BATCH_BUSY"), err
    finally:
        await conn.close()
