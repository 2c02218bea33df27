"""Use cases of the tiering service, each given a unit of work."""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from loyalty.events.v1 import events_pb2
from servicekit.db import UnitOfWork
from servicekit.errors import FailedPrecondition, InvalidArgument, NotFound, parse_member_id
from servicekit.events import ReceivedEvent
from servicekit.protos import timestamp, to_datetime

from . import repository as repo
from .benefits import grant_upgrade_gifts
from .domain import (
    DEFAULT_RULES,
    CapPer,
    GrowthAction,
    LadderError,
    QualifyingMetric,
    Tier,
    TierProgramme,
    parse_ladder,
    parse_metric,
    parse_rules,
)
from .evaluation import (
    EVENT_REASON,
    Change,
    Evaluation,
    Projection,
    TierState,
    advance,
    advance_versions,
    facts_for,
    facts_metric,
    fresh_state,
    in_force,
    keep_deadline,
    metric_from_facts,
    order_growth,
    project,
    quiet_tier,
    reconcile,
    replay,
    set_override,
    window_start,
)
from .repository import SpendRecord

log = logging.getLogger(__name__)

# The brand's programme unless TIERING_PROGRAMME_ID names another (settings.py).
DEFAULT_PROGRAMME_ID = "default"
# How late a growth action may be reported unless configured (settings.py).
DEFAULT_GROWTH_MAX_AGE = timedelta(hours=24)
# A programme version may start a little in the past (operator clock skew),
# never earlier: that would rewrite decisions already taken.
PUBLISH_SKEW = timedelta(minutes=5)
HISTORY_LIMIT_MAX = 500

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class MemberSpendView:
    spend: SpendRecord
    # The member's current tier; None when no programme exists.
    tier: Tier | None


@dataclass(frozen=True)
class MemberTierView:
    member_id: str
    programme: TierProgramme
    state: TierState
    effective: Tier
    metric: int
    growth_value: int
    projection: Projection

    @property
    def progress_bp(self) -> int:
        nxt = self.projection.next_tier
        if nxt is None:
            return 10_000
        span = nxt.threshold - self.effective.threshold
        done = self.metric - self.effective.threshold
        return max(0, min(10_000, done * 10_000 // span)) if span > 0 else 10_000


@dataclass(frozen=True)
class TierBadge:
    member_id: str
    tier: Tier
    programme_version: int
    # True when answered from the tier row and M(now), without the facts.
    quick: bool


@dataclass(frozen=True)
class GrowthAward:
    awarded: int
    capped: bool
    replayed: bool


@dataclass(frozen=True)
class Simulation:
    members: int
    upgrades: int
    kept_by_retention: int
    at_risk: int
    movements: list[tuple[str, str, int]]


def _event_member(value: str, what: str) -> uuid.UUID | None:
    """A member id from an event; None when empty; ValueError (retry, then
    dead-letter with the reason) when malformed."""
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ValueError(f"{what}: member_id {value!r} is not a UUID") from None


def metric_value(programme: TierProgramme, spend: SpendRecord) -> int | None:
    """Lifetime totals as a metric (kept for callers of the old spend preview)."""
    if programme.qualifying_metric is QualifyingMetric.PAID_SPEND:
        return spend.total_paid_fen
    if programme.qualifying_metric is QualifyingMetric.ORDER_COUNT:
        return spend.order_count
    return None


def build_programme(
    programme_id: str,
    version: int,
    effective_from: datetime | None,
    qualifying_metric: str,
    window_months: int,
    ladder_json: str,
    rules_json: str,
    field_prefix: str = "programme",
) -> TierProgramme:
    """Validate an operator's programme; InvalidArgument names the entry at fault."""

    def bad(message: str, field: str) -> InvalidArgument:
        return InvalidArgument(
            message,
            code="INVALID_PROGRAMME",
            field=f"{field_prefix}.{field}" if field else field_prefix,
        )

    if not programme_id.strip():
        raise bad("programme_id is required", "programme_id")
    if effective_from is None:
        raise bad("effective_from is required", "effective_from")
    try:
        ladder_raw = json.loads(ladder_json or "null")
    except json.JSONDecodeError as exc:
        raise bad(f"ladder_json is not JSON: {exc}", "ladder_json") from None
    try:
        rules_raw = json.loads(rules_json) if rules_json.strip() else None
    except json.JSONDecodeError as exc:
        raise bad(f"rules_json is not JSON: {exc}", "rules_json") from None
    try:
        metric = parse_metric(qualifying_metric)
        return TierProgramme(
            programme_id.strip(),
            version,
            effective_from,
            metric,
            window_months,
            parse_ladder(ladder_raw),
            parse_rules(rules_raw) if rules_raw is not None else DEFAULT_RULES,
        )
    except LadderError as exc:
        raise bad(str(exc), exc.field) from None


class TieringHandlers:
    def __init__(
        self,
        clock: Clock | None = None,
        programme_id: str = DEFAULT_PROGRAMME_ID,
        growth_max_age: timedelta = DEFAULT_GROWTH_MAX_AGE,
    ) -> None:
        self._clock: Clock = clock or (lambda: datetime.now(UTC))
        # Every member is evaluated on this one programme (one per brand).
        self.programme_id = programme_id
        self._growth_max_age = growth_max_age
        # Every stored version of the programme, for the POS badge: versions are
        # only ever added (numbered up), so the newest number, read in the
        # badge's one statement, says whether this copy is still whole.
        self._badge_versions: tuple[int, list[TierProgramme]] | None = None

    def now(self) -> datetime:
        return self._clock()

    async def _erased(self, uow: UnitOfWork, *members: uuid.UUID) -> bool:
        """True when any of the members is erased. Takes the members' erasure
        locks for the rest of the transaction, so an erasure never interleaves
        with what the caller writes next."""
        await repo.lock_members(uow.conn, members)
        return bool(await repo.erased(uow.conn, members))

    async def _not_erased(self, uow: UnitOfWork, member_id: uuid.UUID) -> None:
        if await self._erased(uow, member_id):
            raise FailedPrecondition(
                "the member was erased", code="MEMBER_ERASED", field="member_id"
            )

    async def _versions(self, uow: UnitOfWork, at: datetime) -> list[TierProgramme]:
        """The programme's versions in force by `at`, oldest first (as
        repo.programme_versions), read once per transaction: the consumer
        applies a whole read of orders in one, and each order asked for them
        two or three times."""
        key = ("tiering.programme_versions", self.programme_id)
        every = uow.memo.get(key)
        if every is None:
            every = uow.memo[key] = await repo.programme_versions(uow.conn, self.programme_id, None)
        return [p for p in every if p.effective_from <= at]

    # ---- evaluation core ----------------------------------------------------------

    async def evaluate(
        self,
        uow: UnitOfWork,
        member_id: uuid.UUID,
        at: datetime,
        reason: str | None = None,
    ) -> tuple[TierProgramme, TierState] | None:
        """Bring one member's tier up to date after a fact dated `at`.

        In-order facts advance the stored state; a fact dated before the last
        evaluation (an offline order replayed late) or a refund (`reason`)
        replays the member from facts. History rows and TierChanged events are
        written in the caller's transaction."""
        conn = uow.conn
        versions = await self._versions(uow, max(at, self.now()))
        if not versions:
            return None
        # A row decided under another programme (the brand switched) starts afresh.
        locked = await repo.lock_tier_state(conn, member_id, self.programme_id)
        state, evaluated_at = locked if locked else (None, None)
        if state is not None and evaluated_at is not None and (reason or at < evaluated_at):
            now = max(at, evaluated_at)
            orders, growth = await repo.load_facts(conn, member_id)
            ev = reconcile(versions, state, orders, growth, now, reason or "late_order")
        elif state is None:
            # A first fact, or a row decided under another programme (the brand
            # switched): from the facts, under the versions in force at each.
            now = at
            orders, growth = await repo.load_facts(conn, member_id)
            ev = replay(versions, orders, growth, at)
        else:
            now = at
            start = state
            pending = start.programme_version != in_force(versions, at).version
            # A version change to cross: its metric may differ, read every fact.
            since = (
                None
                if pending
                else window_start(in_force(versions, at), min(start.period_start, at))
            )
            orders, growth = await repo.load_facts(conn, member_id, since)
            ev = advance_versions(versions, start, at, lambda p: facts_metric(p, orders, growth))
        programme = in_force(versions, now)
        await self._store(uow, member_id, programme, ev, now, versions)
        return programme, ev.state

    async def _store(
        self,
        uow: UnitOfWork,
        member_id: uuid.UUID,
        programme: TierProgramme,
        ev: Evaluation,
        now: datetime,
        versions: list[TierProgramme] | None = None,
    ) -> None:
        await repo.save_tier_state(
            uow.conn, member_id, programme, ev.state, ev.state.effective(programme, now), now
        )
        await repo.insert_history(uow.conn, member_id, programme, ev.changes)
        # Each event carries the benefits of the version that decided it.
        by_version = {p.version: p for p in versions or ()}
        for change in ev.moved:
            decided = by_version.get(change.version, programme)
            await emit_tier_changed(uow, member_id, decided, change)
        await grant_upgrade_gifts(
            uow.conn, member_id, programme, ev.changes, ev.state.period_start, by_version
        )

    async def on_birthday_set(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        """The member's birthday (month and day), for the tier's birthday coupon."""
        birthday = event.payload
        assert isinstance(birthday, events_pb2.BirthdaySet)
        member_id = _event_member(birthday.member_id, "BirthdaySet")
        if member_id is None or await self._erased(uow, member_id):
            return
        month, day = (birthday.month, birthday.day) if birthday.month else (None, None)
        await uow.conn.execute(
            "INSERT INTO tiering.member_profiles AS p (member_id, birth_month, birth_day)"
            " VALUES ($1, $2, $3) ON CONFLICT (member_id) DO UPDATE SET"
            " birth_month = excluded.birth_month, birth_day = excluded.birth_day,"
            " updated_at = now()",
            member_id,
            month,
            day,
        )

    # ---- events ---------------------------------------------------------------------

    async def on_order_completed(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        """Record the order (spend, growth value) and re-evaluate the member's tier.

        Runs in the consumer's transaction that records the event id, so a
        redelivered event never counts twice; the order id makes a second event
        for the same order harmless too. A malformed event raises: it is
        retried, then dead-lettered with the reason."""
        await self.on_orders_completed(uow, [event])

    async def on_orders_completed(self, uow: UnitOfWork, events: list[ReceivedEvent]) -> None:
        """`on_order_completed` for a read's run of orders of distinct members
        (the consumer's batch handler): one erasure lock and check, one
        statement counting the new orders, then each new order's evaluation
        in the read's order. The members are distinct, so this is what the
        orders one by one would do."""
        orders: list[tuple[events_pb2.OrderCompleted, uuid.UUID, datetime, str]] = []
        for event in events:
            order = event.payload
            assert isinstance(order, events_pb2.OrderCompleted)
            member_id = _event_member(order.member_id, f"OrderCompleted {order.order_id}")
            if member_id is None:
                log.debug("order %s has no member; nothing to track", order.order_id)
                continue
            if order.paid_amount_fen < 0:
                raise ValueError(
                    f"OrderCompleted {order.order_id}: paid_amount_fen {order.paid_amount_fen} < 0"
                )
            ordered_at = (
                to_datetime(order.ordered_at)
                or to_datetime(event.envelope.occurred_at)
                or self.now()
            )
            orders.append((order, member_id, ordered_at, order.order_id or event.envelope.event_id))
        members = [m for _, m, _, _ in orders]
        if len(set(members)) < len(members):
            raise ValueError("a batch of OrderCompleted names a member twice")
        if not orders:
            return
        await repo.lock_members(uow.conn, members)
        erased = await repo.erased(uow.conn, members)
        rows: list[repo.NewOrder] = []
        for order, member_id, ordered_at, order_id in orders:
            if member_id in erased:
                log.info("order %s: member erased; nothing to track", order.order_id)
                continue
            programme = _latest(await self._versions(uow, ordered_at))
            rules_programme = programme or _latest(await self._versions(uow, self.now()))
            growth = (
                order_growth(rules_programme, order.paid_amount_fen)
                if rules_programme
                else order.paid_amount_fen // DEFAULT_RULES.order_fen_per_point
            )
            tz = (rules_programme.rules if rules_programme else DEFAULT_RULES).tz
            rows.append(
                repo.NewOrder(
                    order_id,
                    member_id,
                    ordered_at,
                    order.paid_amount_fen,
                    growth,
                    ordered_at.astimezone(tz).date(),
                    order.store_id,
                )
            )
        counted = await repo.record_orders(uow.conn, rows)
        for row in rows:
            if (row.order_id, row.member_id) not in counted:
                log.debug("order %s already counted (a redelivery)", row.order_id)
                continue
            await self.evaluate(uow, row.member_id, row.ordered_at)

    async def on_order_refunded(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        """Undo what a refund takes back: net spend, the order's growth value
        (dated at the order, so the metric drops retroactively) and any upgrade
        the order caused. Idempotent on refund_id."""
        refund = event.payload
        assert isinstance(refund, events_pb2.OrderRefunded)
        what = f"OrderRefunded {refund.refund_id}"
        member_id = _event_member(refund.member_id, what)
        if member_id is None or await self._erased(uow, member_id):
            return
        if refund.refunded_amount_fen <= 0:
            raise ValueError(f"{what}: refunded_amount_fen {refund.refunded_amount_fen} <= 0")
        refund_id = refund.refund_id or event.envelope.event_id
        conn = uow.conn
        if await repo.growth_exists(conn, "refund", refund_id):
            return
        order = await repo.lock_order(conn, refund.order_id)
        if order is None:
            # OrderCompleted travels on the same stream first; an unknown order
            # is retried and then dead-lettered with this reason.
            raise ValueError(f"{what}: order {refund.order_id!r} is not known to tiering")
        if order.member_id is None or (
            order.member_id != member_id and await self._erased(uow, order.member_id)
        ):
            return  # the order's member was erased (a merge may have moved the order)
        owner = order.member_id
        refunded = min(order.paid_fen, order.refunded_fen + refund.refunded_amount_fen)
        programme = _latest(await self._versions(uow, order.ordered_at))
        programme = programme or _latest(await self._versions(uow, self.now()))
        net = order.paid_fen - refunded
        growth = (
            order_growth(programme, net) if programme else net // DEFAULT_RULES.order_fen_per_point
        )
        await repo.set_order_refund(conn, order.order_id, refunded, growth)
        tz = (programme.rules if programme else DEFAULT_RULES).tz
        refunded_at = to_datetime(refund.refunded_at) or self.now()
        await repo.insert_growth(
            conn,
            owner,
            "refund",
            refund_id,
            growth - order.growth,
            order.ordered_at,
            refunded_at.astimezone(tz).date(),
        )
        wholly = refunded == order.paid_fen and order.refunded_fen < order.paid_fen
        await repo.subtract_spend(conn, owner, refunded - order.refunded_fen, 1 if wholly else 0)
        await self.evaluate(uow, owner, refunded_at, reason="refund")

    async def on_member_registered(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        """Registration date, for lifecycle stages (new, growing)."""
        registered = event.payload
        assert isinstance(registered, events_pb2.MemberRegistered)
        member_id = _event_member(registered.member_id, "MemberRegistered")
        if member_id is None or await self._erased(uow, member_id):
            return
        at = to_datetime(registered.registered_at) or to_datetime(event.envelope.occurred_at)
        await repo.set_registered(uow.conn, member_id, at)

    async def on_zone_set(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        """The member's registration store, the store the dashboards filter
        the member's figures by (metrics_definitions.MEMBER_STORE)."""
        zone = event.payload
        assert isinstance(zone, events_pb2.MemberZoneSet)
        member_id = _event_member(zone.member_id, "MemberZoneSet")
        if member_id is None or await self._erased(uow, member_id):
            return
        await repo.set_registration_store(uow.conn, member_id, zone.registration_store_id)

    async def on_member_merged(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        """The absorbed member's orders, growth and tier history move to the
        survivor; the survivor keeps the higher tier. Idempotent on merge_id."""
        merged = event.payload
        assert isinstance(merged, events_pb2.MemberMerged)
        what = f"MemberMerged {merged.merge_id}"
        survivor = _event_member(merged.survivor_member_id, what)
        absorbed = _event_member(merged.absorbed_member_id, what)
        if survivor is None or absorbed is None or survivor == absorbed:
            raise ValueError(f"{what}: needs two different member ids")
        conn = uow.conn
        if not merged.merge_id or await repo.merge_exists(conn, merged.merge_id):
            return
        if await self._erased(uow, survivor, absorbed):
            log.info("%s: a side was erased; nothing to merge", what)
            return
        now = max(self.now(), to_datetime(merged.merged_at) or self.now())
        versions = await repo.programme_versions(conn, self.programme_id, now)
        programme = in_force(versions, now) if versions else None
        # Survivor first, then absorbed: a fixed lock order between the two.
        kept = await repo.lock_tier_state(conn, survivor, self.programme_id)
        gone = await repo.lock_tier_state(conn, absorbed, self.programme_id)
        caught_up: list[Change] = []
        if programme is not None:
            # A side last decided under an earlier version is brought up to now
            # first (each period under its own version), on its own facts.
            for side, member in ((kept, survivor), (gone, absorbed)):
                if side is not None and side[0].programme_version != programme.version:
                    orders, growth = await repo.load_facts(conn, member)
                    ev = advance_versions(
                        versions,
                        side[0],
                        max(now, side[1]),
                        functools.partial(facts_for, orders, growth),
                    )
                    if member == survivor:
                        kept = (ev.state, max(now, side[1]))
                        caught_up = ev.changes
                    else:
                        gone = (ev.state, max(now, side[1]))
        await repo.insert_merge(
            conn,
            merged.merge_id,
            survivor,
            absorbed,
            await repo.member_snapshot(conn, survivor),
            await repo.member_snapshot(conn, absorbed),
            now,
        )
        registered = await conn.fetchval(
            "SELECT registered_at FROM tiering.member_profiles WHERE member_id = $1", absorbed
        )
        await repo.move_facts(conn, absorbed, survivor)
        await repo.delete_member_rows(conn, absorbed)
        await repo.rebuild_spend(conn, survivor)
        if registered is not None:
            await repo.set_registered(conn, survivor, registered)
        if programme is None:
            return
        ladder = programme.ladder
        candidates = [
            x for x in (kept, gone) if x is not None and x[0].programme_version == programme.version
        ]
        before = (
            kept[0].effective(programme, now)
            if kept and kept in candidates
            else ladder.tiers[0].code
        )
        if candidates:
            # Survivorship: the tier = the higher of the two.
            chosen = max(candidates, key=lambda x: ladder.rank(x[0].effective(programme, now)))[0]
            at = max(now, *(x[1] for x in candidates))
        else:
            chosen, at = fresh_state(programme, now), now
        orders, growth = await repo.load_facts(
            conn, survivor, window_start(programme, min(chosen.period_start, at))
        )
        ev = advance(programme, chosen, at, facts_metric(programme, orders, growth))
        after = ev.state.effective(programme, at)
        merge_change = Change(
            before,
            chosen.effective(programme, at),
            "merge",
            at,
            {"merge_id": merged.merge_id, "absorbed_member_id": str(absorbed)},
        )
        await self._store(
            uow,
            survivor,
            programme,
            Evaluation(ev.state, [*caught_up, merge_change, *ev.changes]),
            at,
            versions,
        )
        log.info("merge %s: survivor %s now %s", merged.merge_id, survivor, after)

    async def on_member_unmerged(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        """Reverse a merge: facts and tier history go back to the restored member,
        each side's tier state is restored and brought up to date."""
        unmerged = event.payload
        assert isinstance(unmerged, events_pb2.MemberUnmerged)
        conn = uow.conn
        merge = await repo.lock_merge(conn, unmerged.merge_id)
        if merge is None:
            log.info("unmerge of %s: tiering never applied that merge", unmerged.merge_id)
            return
        if merge["unmerged_at"] is not None:
            return
        survivor, restored = merge["survivor_id"], merge["absorbed_id"]
        if await self._erased(uow, survivor, restored):
            return
        now = max(self.now(), to_datetime(unmerged.unmerged_at) or self.now())
        survivor_state = await repo.lock_tier_state(conn, survivor)
        await repo.move_facts_back(conn, survivor, restored)
        await repo.rebuild_spend(conn, survivor)
        await repo.rebuild_spend(conn, restored)
        snapshot = merge["absorbed_before"]
        if snapshot.get("registered_at"):
            await repo.set_registered(
                conn, restored, datetime.fromisoformat(snapshot["registered_at"])
            )
        await repo.mark_unmerged(conn, unmerged.merge_id, now)
        versions = await repo.programme_versions(conn, self.programme_id, now)
        if not versions:
            return
        programme = in_force(versions, now)
        for member_id, before_json, current in (
            (restored, snapshot, None),
            (survivor, merge["survivor_before"], survivor_state),
        ):
            state = _state_from_snapshot(before_json, versions)
            orders, growth = await repo.load_facts(conn, member_id)
            if state is not None:
                # Back where it was, then what time and its own facts changed since
                # (each period under the version in force then).
                ev = advance_versions(
                    versions, state, now, functools.partial(facts_for, orders, growth)
                )
            else:
                ev = replay(versions, orders, growth, now)
            from_tier = (
                current[0].effective(programme, now)
                if current and current[0].programme_version == programme.version
                else current[0].earned_tier
                if current
                else programme.ladder.tiers[0].code
            )
            change = Change(
                from_tier,
                ev.state.effective(programme, now),
                "unmerge",
                now,
                {"merge_id": unmerged.merge_id},
            )
            await self._store(
                uow, member_id, programme, Evaluation(ev.state, [change]), now, versions
            )

    async def on_member_erased(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        """Forget the members of an erased cluster: per-member rows go, facts stay
        anonymised (totals for reports still add up), the ids are recorded so
        later events naming them change nothing. Idempotent."""
        erased = event.payload
        assert isinstance(erased, events_pb2.MemberErased)
        members = {
            m for v in erased.member_ids if (m := _event_member(v, "MemberErased")) is not None
        }
        if not members:
            raise ValueError("MemberErased: no member_ids")
        at = to_datetime(erased.erased_at) or self.now()
        await repo.lock_members(uow.conn, members)
        recorded = await repo.erase_members(uow.conn, sorted(members), at)
        log.info("erased %d member(s), %d newly", len(members), recorded)

    # ---- queries --------------------------------------------------------------------

    async def member_spend(self, uow: UnitOfWork, member_id: str) -> MemberSpendView:
        key = parse_member_id(member_id)
        spend = await repo.get_spend(uow.conn, key) or SpendRecord(str(key), 0, 0, None)
        view = await self._tier_view(uow, key)
        return MemberSpendView(spend, view.effective if view else None)

    async def member_tier(self, uow: UnitOfWork, member_id: str) -> MemberTierView:
        key = parse_member_id(member_id)
        view = await self._tier_view(uow, key)
        if view is None:
            raise NotFound(
                f"no tier programme {self.programme_id!r} is in force",
                code="NO_PROGRAMME",
            )
        return view

    async def member_tier_badge(self, uow: UnitOfWork, member_id: str) -> TierBadge:
        """The effective tier GetMemberTier would answer, for the POS identify:
        from the tier row and M(now) in one statement when no boundary has
        passed since the member was evaluated (evaluation.quiet_tier), else
        the full view."""
        key = parse_member_id(member_id)
        now = self.now()
        cached = self._badge_versions
        if cached is None:
            every = await repo.programme_versions(uow.conn, self.programme_id, None)
            cached = self._badge_versions = (max((p.version for p in every), default=0), every)
        versions = [p for p in cached[1] if p.effective_from <= now]
        if versions:
            programme = in_force(versions, now)
            row = await repo.badge_row(uow.conn, key, programme, window_start(programme, now), now)
            fresh = row.latest_version == cached[0]
            if not fresh:
                self._badge_versions = None  # a version was published: reload next time
            else:
                state = row.state if row.programme_id == self.programme_id else None
                if row.state is None and not row.has_facts:
                    # Never evaluated and nothing to evaluate: replay from no
                    # facts is the fresh state advanced to now.
                    state = fresh_state(programme, now)
                tier = None if state is None else quiet_tier(versions, state, now, row.metric)
                if tier is not None:
                    return TierBadge(str(key), tier, programme.version, True)
        else:
            self._badge_versions = None  # none in force yet: look again next time
        view = await self.member_tier(uow, member_id)
        return TierBadge(str(key), view.effective, view.programme.version, False)

    async def _tier_view(self, uow: UnitOfWork, member_id: uuid.UUID) -> MemberTierView | None:
        """The member's tier as of now, computed without writing (the batch and
        the next event persist what time alone changes)."""
        conn = uow.conn
        now = self.now()
        versions = await repo.programme_versions(conn, self.programme_id, now)
        if not versions:
            return None
        programme = in_force(versions, now)
        row = await repo.tier_row(conn, member_id)
        if row is not None and row["programme_id"] == self.programme_id:
            state = TierState(*(row[c.strip()] for c in repo.STATE_COLUMNS.split(",")))
            pending = state.programme_version != programme.version
            since = None if pending else window_start(programme, min(state.period_start, now))
            orders, growth = await repo.load_facts(conn, member_id, since)
            ev = advance_versions(versions, state, now, lambda p: facts_metric(p, orders, growth))
        else:
            # Never evaluated, or decided under another programme: from the facts.
            orders, growth = await repo.load_facts(conn, member_id)
            ev = replay(versions, orders, growth, now)
        metric = metric_from_facts(programme, orders, growth, now)
        # What already counts and will still be inside the window when the tier
        # is next judged: the period end, or the grace's end while in grace.
        deadline = keep_deadline(ev.state)
        kept = metric_from_facts(
            programme,
            [o for o in orders if o.at > window_start(programme, deadline)],
            [g for g in growth if g.at > window_start(programme, deadline)],
            now,
        )
        lo = window_start(programme, now)
        growth_value = sum(g.points for g in growth if lo < g.at <= now)
        effective = programme.tier(ev.state.effective(programme, now))
        projection = project(programme, ev.state, metric, kept, now)
        return MemberTierView(
            str(member_id), programme, ev.state, effective, metric, growth_value, projection
        )

    async def tier_history(
        self, uow: UnitOfWork, member_id: str, limit: int
    ) -> list[repo.HistoryRow]:
        key = parse_member_id(member_id)
        if limit < 0 or limit > HISTORY_LIMIT_MAX:
            raise InvalidArgument(
                f"limit must be between 1 and {HISTORY_LIMIT_MAX}",
                code="INVALID_LIMIT",
                field="limit",
            )
        return await repo.history(uow.conn, key, limit or 50)

    # ---- growth actions -------------------------------------------------------------

    async def record_growth_action(
        self,
        uow: UnitOfWork,
        member_id: str,
        action: str,
        reference_id: str,
        occurred_at: datetime | None,
    ) -> GrowthAward:
        key = parse_member_id(member_id)
        try:
            kind = GrowthAction(action)
        except ValueError:
            allowed = ", ".join(a.value for a in GrowthAction)
            raise InvalidArgument(
                f"action {action!r} is not one of {allowed}", code="INVALID_ACTION", field="action"
            ) from None
        ref = reference_id.strip()
        if not ref or len(ref) > 128:
            raise InvalidArgument(
                "reference_id is required (at most 128 characters)",
                code="REFERENCE_ID_REQUIRED",
                field="reference_id",
            )
        now = self.now()
        at = occurred_at or now
        if at > now + PUBLISH_SKEW:
            raise InvalidArgument(
                "occurred_at is in the future", code="INVALID_OCCURRED_AT", field="occurred_at"
            )
        if at < now - self._growth_max_age:
            # Caps are per local day: an unbounded past would let a client
            # backfill a check-in for every past day.
            hours = self._growth_max_age.total_seconds() / 3600
            raise InvalidArgument(
                f"occurred_at {at.isoformat()} is more than {hours:g} hours ago; growth actions"
                f" are accepted up to {hours:g} hours after they happen",
                code="OCCURRED_AT_TOO_OLD",
                field="occurred_at",
            )
        conn = uow.conn
        await self._not_erased(uow, key)
        programme = await repo.programme_at(conn, self.programme_id, now)
        rules = programme.rules if programme else DEFAULT_RULES
        rule = rules.actions[kind]
        # Scoped per (member, action) so a cap check and its insert are atomic.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('tiering.growth:' || $1))", f"{key}:{kind}"
        )
        scoped_ref = f"{key}:{ref}"
        if await repo.growth_exists(conn, kind.value, scoped_ref):
            return GrowthAward(0, False, True)
        day = at.astimezone(rules.tz).date()
        first, last = (day, day) if rule.per is CapPer.DAY else _month_of(day)
        if (
            rule.points <= 0
            or await repo.count_awards(conn, key, kind.value, first, last) >= rule.cap
        ):
            return GrowthAward(0, True, False)
        await repo.insert_growth(conn, key, kind.value, scoped_ref, rule.points, at, day)
        if programme is not None and programme.qualifying_metric is QualifyingMetric.GROWTH_VALUE:
            await self.evaluate(uow, key, at)
        return GrowthAward(rule.points, False, False)

    # ---- operators ------------------------------------------------------------------

    async def programme(
        self, uow: UnitOfWork, programme_id: str, at: datetime | None
    ) -> tuple[TierProgramme, str]:
        pid = programme_id.strip() or self.programme_id
        found = await repo.programme_at(uow.conn, pid, at or self.now())
        if found is None:
            raise NotFound(
                f"programme {pid!r} has no version in force",
                code="UNKNOWN_PROGRAMME",
                field="programme_id",
            )
        return found, await repo.programme_note(uow.conn, pid, found.version)

    async def publish_programme(
        self, uow: UnitOfWork, draft: TierProgramme, note: str
    ) -> TierProgramme:
        """Store `draft` as the next version. The running version is untouched
        until the new one's effective_from; a bad draft never gets here."""
        if draft.effective_from < self.now() - PUBLISH_SKEW:
            raise InvalidArgument(
                "effective_from is in the past: a new version applies from now or later,"
                " history is not rewritten",
                code="INVALID_PROGRAMME",
                field="programme.effective_from",
            )
        version = await repo.latest_version(uow.conn, draft.programme_id, lock=True) + 1
        stored = TierProgramme(
            draft.programme_id,
            version,
            draft.effective_from,
            draft.qualifying_metric,
            draft.window_months,
            draft.ladder,
            draft.rules,
        )
        await repo.insert_programme(uow.conn, stored, note)
        return stored

    async def simulate(self, uow: UnitOfWork, draft: TierProgramme) -> Simulation:
        now = self.now()
        base = (await repo.programme_at(uow.conn, draft.programme_id, now)) or draft
        rows = await repo.simulate(
            uow.conn, draft, window_start(draft, now), now, base.ladder.tiers[0].code
        )
        codes = [t.code for t in draft.ladder.tiers]
        upgrades = kept = at_risk = members = 0
        movements: dict[tuple[str, str], int] = {}
        for current, draft_rank, above_retention, count in rows:
            members += count
            target = codes[draft_rank]
            movements[(current, target)] = movements.get((current, target), 0) + count
            if current not in codes:
                continue  # re-evaluated on the metric when the version starts
            rank = codes.index(current)
            if draft_rank > rank:
                upgrades += count
            elif draft_rank < rank:
                if above_retention:
                    kept += count
                else:
                    at_risk += count
        return Simulation(
            members,
            upgrades,
            kept,
            at_risk,
            sorted((f, t, n) for (f, t), n in movements.items()),
        )

    async def set_override(
        self,
        uow: UnitOfWork,
        member_id: str,
        tier_code: str,
        until: datetime | None,
        reason: str,
    ) -> MemberTierView:
        key = parse_member_id(member_id)
        now = self.now()
        conn = uow.conn
        programme = await repo.programme_at(conn, self.programme_id, now)
        if programme is None:
            raise NotFound("no tier programme is in force", code="NO_PROGRAMME")
        code = tier_code.strip()
        if not reason.strip():
            raise InvalidArgument("reason is required", code="REASON_REQUIRED", field="reason")
        if code:
            if code not in {t.code for t in programme.ladder.tiers}:
                raise InvalidArgument(
                    f"tier_code {code!r} is not on the ladder",
                    code="UNKNOWN_TIER",
                    field="tier_code",
                )
            if until is None or until <= now:
                raise InvalidArgument(
                    "until is required and must be in the future",
                    code="INVALID_UNTIL",
                    field="until",
                )
        await self._not_erased(uow, key)
        # Up to date first, so the override row follows the changes time made.
        await self.evaluate(uow, key, now)
        locked = await repo.lock_tier_state(conn, key)
        assert locked is not None
        ev = set_override(
            programme, locked[0], code or None, until if code else None, reason.strip(), now
        )
        await self._store(uow, key, programme, ev, now)
        view = await self._tier_view(uow, key)
        assert view is not None
        return view


def _state_from_snapshot(
    snapshot: dict[str, object], versions: list[TierProgramme]
) -> TierState | None:
    """The tier state a merge snapshot kept, when it was decided under a stored
    version of the brand's programme (else None: replayed from the facts)."""
    tier = snapshot.get("tier")
    known = {p.version for p in versions}
    if (
        not isinstance(tier, dict)
        or tier.get("programme_version") not in known
        or tier.get("programme_id") != versions[0].programme_id
    ):
        return None

    def ts(key: str) -> datetime | None:
        value = tier.get(key)
        return datetime.fromisoformat(value) if isinstance(value, str) else None

    start, end = ts("period_start"), ts("period_end")
    assert start is not None and end is not None
    return TierState(
        int(tier["programme_version"]),
        str(tier["base_tier"]),
        str(tier["earned_tier"]),
        start,
        end,
        int(tier["peak"]),
        ts("grace_until"),
        tier.get("override_tier"),
        ts("override_until"),
        tier.get("override_reason"),
    )


def _month_of(day: date) -> tuple[date, date]:
    first = day.replace(day=1)
    nxt = (first + timedelta(days=32)).replace(day=1)
    return first, nxt - timedelta(days=1)


def tier_changed(
    member_id: uuid.UUID, programme: TierProgramme, change: Change
) -> events_pb2.TierChanged:
    """The event for one change, with the new tier's multiplier from the programme
    version that decided it (rewards keeps no copy of the ladder)."""
    return events_pb2.TierChanged(
        member_id=str(member_id),
        from_tier=change.from_tier,
        to_tier=change.to_tier,
        reason=EVENT_REASON.get(change.reason, change.reason),
        programme_id=programme.programme_id,
        programme_version=programme.version,
        changed_at=timestamp(change.at),
        points_multiplier_bp=programme.tier(change.to_tier).benefits.points_multiplier_bp,
    )


async def emit_tier_changed(
    uow: UnitOfWork, member_id: uuid.UUID, programme: TierProgramme, change: Change
) -> None:
    await uow.emit(tier_changed(member_id, programme, change), member_id=str(member_id))


def _latest(versions: list[TierProgramme]) -> TierProgramme | None:
    """The version in force at the bound `versions` was read to (as
    repo.programme_at: the latest effective_from, then the highest version)."""
    return versions[-1] if versions else None
