"""The durable scheduler: sweepers claim due timers in batches and run them.

Guarantees (docs/journeys.md):
- A batch is one transaction: claim (FOR UPDATE SKIP LOCKED, so sweepers never
  share a timer), run the steps, reserve caps, write sends, move or delete the
  timers. A crash anywhere rolls the whole batch back; the timers are still due
  and the next sweep runs them again (at least once), with the same sequence
  numbers, so the same send keys (effectively once).
- Only due rows are read: the partial index on due_at holds unpaused timers.
- Within a batch, sends that compete for one member's daily budget are decided
  by journey priority, not by arrival.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import asyncpg

from loyalty.events.v1 import events_pb2
from servicekit.db import Connection, Database
from servicekit.protos import timestamp

from . import facts_repository as facts_repo
from . import repository as repo
from . import scheduler_repository as scheduler_repo
from .channels import new_send_key, poll_forever
from .domain import (
    DAILY_CAPS,
    Clock,
    DroppedIntent,
    GuideTaskIntent,
    MemberFacts,
    QuietHours,
    RewardIntent,
    SendIntent,
    TagIntent,
    consent_refusal,
    local_day,
    run,
)
from .journey import Journey, parse_journey
from .ports import ConsentPort
from .templates import RenderError, render

log = logging.getLogger(__name__)

MAX_STEP_ATTEMPTS = 5


class JourneyCache:
    """Published versions never change, so they are cached forever."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, int], Journey] = {}

    async def get(self, conn: Connection, journey_id: str, version: int) -> Journey:
        key = (journey_id, version)
        found = self._items.get(key)
        if found is None:
            doc = await repo.journey_doc(conn, journey_id, version)
            if doc is None:
                raise LookupError(f"journey {journey_id} v{version} is missing")
            found = parse_journey(doc)
            self._items[key] = found
        return found


@dataclass
class SweepStats:
    steps: int = 0
    sent: int = 0
    capped: int = 0
    suppressed: int = 0
    dropped: int = 0
    deferred: int = 0
    # Sends whose template could not be filled for the member.
    failed: int = 0
    # Batches rolled back by a deadlock or serialization failure (retried later).
    conflicts: int = 0


@dataclass
class _Pending:
    due: scheduler_repo.DueStep
    journey: Journey
    intent: SendIntent
    day: date
    status: str = "pending"
    reason: str = ""
    variant: str | None = None
    member: MemberFacts | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    error_code: str = ""
    # A mini-program send: the epoch of the subscription credit it took.
    credit_epoch: int | None = None


@dataclass
class _Batch:
    sends: list[_Pending] = field(default_factory=list)
    dropped: list[scheduler_repo.SendRow] = field(default_factory=list)
    rewards: list[tuple[str, uuid.UUID, uuid.UUID, str, str, int, datetime]] = field(
        default_factory=list
    )
    tags: list[tuple[uuid.UUID, str]] = field(default_factory=list)
    guide_tasks: list[events_pb2.GuideTaskRequested] = field(default_factory=list)
    moves: list[tuple[uuid.UUID, str, datetime]] = field(default_factory=list)
    finished: list[uuid.UUID] = field(default_factory=list)
    enrollments: list[tuple[uuid.UUID, int, str | None, str | None, str, datetime | None]] = field(
        default_factory=list
    )


class Scheduler:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        consent: ConsentPort,
        quiet: QuietHours,
        journeys: JourneyCache,
        batch_size: int = 500,
        caps: dict[str, int] | None = None,
        wecom_sender: str = "",
    ) -> None:
        self._db = db
        # The WeCom sender of a member who has no exclusive guide (WECOM_SENDER).
        self._wecom_sender = wecom_sender
        self._clock = clock
        self._consent = consent
        self._quiet = quiet
        self._journeys = journeys
        self.batch_size = batch_size
        self._caps = caps if caps is not None else DAILY_CAPS
        self.stats = SweepStats()

    async def sweep_once(self, limit: int | None = None) -> int:
        """Run one batch of due steps; returns how many timers it claimed.

        Several sweeper tasks may share this object: what a batch claimed is
        kept per call (never on the instance), so isolating one task's failing
        step cannot postpone another task's."""
        limit = limit or self.batch_size
        claimed: list[scheduler_repo.DueStep] = []
        try:
            return await self._sweep(limit, claimed)
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
            self.stats.conflicts += 1
            log.warning("sweep batch rolled back by a lock conflict; its timers stay due")
            return 0
        except Exception:
            if limit == 1:
                await self._postpone_poison(claimed)
                return 1
            log.exception("sweep batch failed; isolating the failing step")
            # Run the batch one by one so one bad step cannot block the rest.
            done = 0
            for _ in range(limit):
                n = await self.sweep_once(1)
                if n == 0:
                    break
                done += n
            return done

    async def _postpone_poison(self, claimed: list[scheduler_repo.DueStep]) -> None:
        """The step that just failed alone: try it later, give up after a few tries."""
        if not claimed:
            return
        d = claimed[0]
        now = self._clock.now()
        async with self._db.unit_of_work() as uow:
            attempts = await scheduler_repo.postpone_timer(
                uow.conn, d, now + timedelta(minutes=2 ** min(d.attempts, 10))
            )
            if attempts == 0:
                return  # another sweeper ran it meanwhile
            log.error("step %s of %s failed (attempt %d)", d.step_id, d.enrollment_id, attempts)
            if attempts >= MAX_STEP_ATTEMPTS:
                await repo.end_enrollment(uow.conn, d.enrollment_id, "failed", now)

    async def run_until_idle(self, max_batches: int = 10_000) -> int:
        """Sweep until nothing is due (tests and the bench)."""
        total = 0
        for _ in range(max_batches):
            n = await self.sweep_once()
            if n == 0:
                break
            total += n
        return total

    async def run(self, poll_interval: float) -> None:
        await poll_forever(self.sweep_once, poll_interval, log, "sweeper")

    async def _sweep(self, limit: int, claimed: list[scheduler_repo.DueStep]) -> int:
        now = self._clock.now()
        async with self._db.unit_of_work() as uow:
            conn = uow.conn
            due = await scheduler_repo.claim_due(conn, now, limit)
            claimed.extend(due)
            if not due:
                return 0
            facts = await self._consent.facts_with_consent(conn, list({d.member_id for d in due}))
            batch = _Batch()
            for d in due:
                journey = await self._journeys.get(conn, d.journey_id, d.version)
                member = facts.get(str(d.member_id)) or MemberFacts(str(d.member_id))
                self._run_one(d, journey, member, now, batch)
            await self._decide_sends(conn, batch, facts, now)
            await scheduler_repo.insert_sends(conn, [self._send_row(p, now) for p in batch.sends])
            await scheduler_repo.insert_sends(conn, batch.dropped)
            await scheduler_repo.insert_reward_requests(conn, batch.rewards)
            await facts_repo.add_tags(conn, batch.tags)
            # Member tags are owned by the guides service (docs/guides.md): the
            # local row lets this journey branch on it at once, the event
            # records it there; its MemberTagsChanged then refreshes the copy.
            for member_id, tag in batch.tags:
                await uow.emit(
                    events_pb2.JourneyTagged(
                        member_id=str(member_id), tag=tag, tagged_at=timestamp(now)
                    ),
                    member_id=str(member_id),
                )
            # The member's guide gets the task (services/guides sends it via WeCom).
            for task in batch.guide_tasks:
                await uow.emit(task, member_id=task.member_id)
            await scheduler_repo.move_timers(conn, batch.moves)
            await scheduler_repo.delete_timers(conn, batch.finished)
            await scheduler_repo.update_enrollments(conn, batch.enrollments)
        self.stats.steps += len(due)
        return len(due)

    def _run_one(
        self,
        d: scheduler_repo.DueStep,
        journey: Journey,
        member: MemberFacts,
        now: datetime,
        batch: _Batch,
    ) -> None:
        if d.grp == "holdout":
            # The holdout's measurement window is over: it ends, having been sent nothing.
            batch.finished.append(d.enrollment_id)
            batch.enrollments.append((d.enrollment_id, d.seq, d.variant, None, "holdout", now))
            return
        result = run(
            journey,
            d.step_id,
            seq=d.seq,
            now=now,
            due_at=d.due_at,
            facts=member,
            quiet=self._quiet,
            variant=d.variant,
        )
        day = local_day(now, member.tz)
        for intent in result.intents:
            if isinstance(intent, SendIntent):
                batch.sends.append(
                    _Pending(d, journey, intent, day, variant=result.variant, member=member)
                )
            elif isinstance(intent, DroppedIntent):
                step = journey.step(intent.step_id)
                self.stats.dropped += 1
                batch.dropped.append(
                    scheduler_repo.SendRow(
                        new_send_key(d.enrollment_id, intent.seq),
                        d.enrollment_id,
                        d.journey_id,
                        d.version,
                        intent.step_id,
                        d.member_id,
                        step.channel,
                        step.template,
                        step.message_class,
                        journey.priority,
                        day,
                        "dropped",
                        "STALE",
                        result.variant,
                        now,
                    )
                )
            elif isinstance(intent, RewardIntent):
                batch.rewards.append(
                    (
                        new_send_key(d.enrollment_id, intent.seq),
                        d.enrollment_id,
                        d.member_id,
                        intent.kind,
                        intent.coupon,
                        intent.points,
                        now,
                    )
                )
            elif isinstance(intent, TagIntent):
                batch.tags.append((d.member_id, intent.tag))
            elif isinstance(intent, GuideTaskIntent):
                batch.guide_tasks.append(
                    events_pb2.GuideTaskRequested(
                        member_id=str(d.member_id),
                        journey_id=d.journey_id,
                        step_id=intent.step_id,
                        title=intent.title,
                        script=intent.script,
                        requested_at=timestamp(now),
                    )
                )
        if result.completed:
            batch.finished.append(d.enrollment_id)
            batch.enrollments.append(
                (d.enrollment_id, result.seq, result.variant, None, "completed", now)
            )
            return
        assert result.next_step is not None and result.due_at is not None
        if result.next_step == d.step_id and result.seq == d.seq:
            self.stats.deferred += 1  # held by quiet hours
        batch.moves.append((d.enrollment_id, result.next_step, result.due_at))
        batch.enrollments.append(
            (d.enrollment_id, result.seq, result.variant, result.waiting_step, "active", None)
        )

    async def _decide_sends(
        self, conn: Connection, batch: _Batch, facts: dict[str, MemberFacts], now: datetime
    ) -> None:
        if not batch.sends:
            return
        # Consent at send time: marketing needs an explicit grant on the
        # channel; anything explicitly refused (unsubscribe) is never sent.
        contested: dict[tuple[uuid.UUID, date, str], list[_Pending]] = defaultdict(list)
        for p in batch.sends:
            if not self._render(p, now):
                continue
            member = facts.get(str(p.due.member_id))
            consent = member.consents.get(p.intent.channel) if member else None
            # A mini-program subscription message carries its own consent: the
            # member's tap, spent below (one credit, one message).
            refusal = consent_refusal(p.intent.channel, p.intent.message_class, consent)
            if refusal is not None:
                p.status, p.reason = "suppressed", refusal
                continue
            if not p.intent.template:  # personalised, member chose none, no fallback
                p.status, p.reason = "suppressed", "NON_PERSONALISED"
                continue
            if p.intent.message_class in self._caps:
                contested[(p.due.member_id, p.day, p.intent.message_class)].append(p)
        wants = [
            (m, d, cls, len(items), self._caps[cls]) for (m, d, cls), items in contested.items()
        ]
        granted = await scheduler_repo.reserve_caps(conn, wants)
        losers: dict[tuple[uuid.UUID, date, str], list[_Pending]] = {}
        for (m, d, cls), items in contested.items():
            slots = granted.get((str(m), d, cls), 0)
            # The most valuable message wins the day's budget, then the oldest.
            items.sort(key=lambda p: (-p.journey.priority, p.due.due_at))
            for p in items[slots:]:
                p.status, p.reason = "capped", "DAILY_CAP"
            if items[slots:]:
                losers[(m, d, cls)] = items[slots:]
        # A budget spent earlier today by a less valuable, not yet delivered
        # send is taken back for the best loser here ("priority wins").
        freed = await scheduler_repo.preempt_holders(
            conn,
            [(m, d, cls, items[0].journey.priority) for (m, d, cls), items in losers.items()],
            now,
        )
        for (m, d, cls), items in losers.items():
            if (str(m), d, cls) in freed:
                items[0].status, items[0].reason = "pending", ""
        # Mini-program subscription messages spend one credit (one member tap)
        # each, taken last so a capped message does not burn a credit.
        for p in batch.sends:
            if p.status != "pending" or p.intent.channel != "miniprogram":
                continue
            p.credit_epoch = await facts_repo.take_subscription_credit(
                conn, p.due.member_id, p.intent.template
            )
            if p.credit_epoch is None:
                p.status, p.reason = "suppressed", "NO_SUBSCRIPTION_CREDIT"
                if p.intent.message_class in self._caps:
                    await scheduler_repo.release_cap(
                        conn, p.due.member_id, p.day, p.intent.message_class
                    )
        for p in batch.sends:
            if p.status == "pending":
                self.stats.sent += 1
            elif p.status == "failed":
                self.stats.failed += 1
            elif p.status == "capped":
                self.stats.capped += 1
            else:
                self.stats.suppressed += 1

    def _render(self, p: _Pending, now: datetime) -> bool:
        """Fill the step's template for this member now, so a send that cannot
        be filled (the event carried no such value) fails here, spending no cap
        slot or credit, and the dispatcher sends exactly what was decided."""
        if not p.intent.template:
            return True  # suppressed below (non-personalised, no fallback)
        step = p.journey.step(p.intent.step_id)
        member = p.member or MemberFacts(str(p.due.member_id))
        facts = {
            "tier": member.tier,
            "member_id": member.member_id,
            "nickname": member.nickname,
            "tz": member.tz,
        }
        try:
            p.payload = render(
                p.intent.channel,
                p.intent.template,
                step.content,
                p.due.entry_attributes,
                facts,
                now,
            )
        except RenderError as exc:
            p.status, p.reason, p.error_code = "failed", f"BAD_TEMPLATE_DATA: {exc}", exc.code
            return False
        if p.intent.channel == "wecom":
            # A 1-to-1 customer message goes from the member's exclusive guide
            # (their customer); WECOM_SENDER only for a member with no guide.
            sender = member.guide_userid or self._wecom_sender
            if not sender:
                p.status, p.error_code = "failed", "NO_WECOM_SENDER"
                p.reason = "NO_WECOM_SENDER: the member has no guide and WECOM_SENDER is empty"
                return False
            p.payload["sender"] = sender
        return True

    @staticmethod
    def _send_row(p: _Pending, now: datetime) -> scheduler_repo.SendRow:
        return scheduler_repo.SendRow(
            new_send_key(p.due.enrollment_id, p.intent.seq),
            p.due.enrollment_id,
            p.due.journey_id,
            p.due.version,
            p.intent.step_id,
            p.due.member_id,
            p.intent.channel,
            p.intent.template or p.journey.step(p.intent.step_id).template,
            p.intent.message_class,
            p.journey.priority,
            p.day,
            p.status,
            p.reason,
            p.variant,
            now,
            p.payload if p.status == "pending" else {},
            p.error_code,
            p.credit_epoch,
        )
