"""Use cases of the engagement service, each given a unit of work."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from servicekit.db import UnitOfWork
from servicekit.errors import FailedPrecondition, InvalidArgument, NotFound, parse_member_id

from . import facts_repository as facts_repo
from . import repository as repo
from . import scheduler_repository as scheduler_repo
from .domain import (
    DEFAULT_TZ,
    Clock,
    Lift,
    MemberFacts,
    QuietHours,
    birthday_month_key,
    bounding_box,
    bucket,
    is_zone,
    lift,
    local_day,
    parse_coordinates,
    schedule_time,
)
from .journey import CHANNELS, EVENTS, JOURNEY_ID, Journey, parse_journey
from .ports import ConsentRecorder, StoreZones
from .scheduler import JourneyCache

# Events the mini-program reports through the gateway: about members this
# service may not know yet (registration still in flight) -> parked, not lost.
INGESTED_EVENTS = frozenset(
    {
        "cart_abandoned",
        "page_view",
        "check_in",
        "subscription_tap",
        "birthday_month",
        "coupon_expiring_soon",
        "location_reported",
    }
)
log = logging.getLogger(__name__)
# The attribute whose value an event sets as the member's fact (repository.apply_event).
FACT_ATTRIBUTE = {
    "tier_changed": "to_tier",
    "segment_changed": "to_segment",
    "lifecycle_stage_changed": "to_stage",
}

# Member's consent channels (loyalty.events.v1.ConsentChanged) -> this service's
# channel names; "" in an event means every channel.
MEMBER_CHANNELS = {
    "wecom": "wecom",
    "sms": "sms",
    "mini_program": "miniprogram",
    "app_push": "app_push",
}
# Pages of parked events for operators; expiry bounds.
DEFAULT_PAGE = 100
MAX_PAGE = 500
MAX_PARKED_DAYS = 3650
# Where an unsubscribe through engagement says it came from (member's history).
UNSUBSCRIBE_SOURCE = "engagement:unsubscribe"
# A location older than this does not put a member in a store's audience.
LOCATION_FRESH_FOR = timedelta(days=7)
MAX_RADIUS_M = 50_000


@dataclass(frozen=True)
class Published:
    journey_id: str
    version: int


# A send counts as sent once written past the cap and consent checks, whatever
# the provider then made of it (docs/journeys.md, Channels).
SENT_STATUSES = ("pending", "sending", "delivered", "failed", "no_credit", "unknown")


@dataclass(frozen=True)
class StepMetrics:
    step_id: str
    counts: dict[str, int]


@dataclass(frozen=True)
class VariantMetrics:
    variant: str
    entered: int
    converted: int
    lift: Lift | None


@dataclass(frozen=True)
class JourneyMetrics:
    journey_id: str
    status: str
    live_version: int
    entered: int
    active: int
    treated: int
    holdout: int
    treated_converted: int
    holdout_converted: int
    sent: int
    capped: int
    suppressed: int
    dropped: int
    steps: list[StepMetrics]
    variants: list[VariantMetrics]
    lift: Lift | None


@dataclass(frozen=True)
class Ingested:
    parked: bool
    enrolled: list[str]


class EngagementHandlers:
    def __init__(
        self,
        clock: Clock,
        quiet: QuietHours,
        journeys: JourneyCache,
        consent: ConsentRecorder | None = None,
        stores: StoreZones | None = None,
    ) -> None:
        self.clock = clock
        self.quiet = quiet
        self.journeys = journeys
        # Where members' consent choices are recorded (member); None: not wired.
        self.consent = consent
        # Stores' time zones (rewards), the fallback of a member's zone.
        self.stores = stores

    # ---- operators ----------------------------------------------------------

    async def publish(self, uow: UnitOfWork, definition: str) -> Published:
        try:
            doc = json.loads(definition)
        except ValueError as exc:
            raise InvalidArgument(
                f"definition is not JSON: {exc}", code="INVALID_JSON", field="definition"
            ) from None
        journey = parse_journey(doc)
        version = await repo.next_version(uow.conn, journey.journey_id)
        await repo.insert_journey(
            uow.conn, journey.journey_id, version, doc, journey.priority, journey.entry_event
        )
        return Published(journey.journey_id, version)

    async def set_status(self, uow: UnitOfWork, journey_id: str, status: str) -> None:
        state = await repo.journey_state(uow.conn, journey_id, lock=True)
        if state is None:
            raise NotFound(
                f"journey {journey_id!r} does not exist", code="UNKNOWN_JOURNEY", field="journey_id"
            )
        await repo.set_journey_status(uow.conn, journey_id, status)

    async def metrics(self, uow: UnitOfWork, journey_id: str) -> JourneyMetrics:
        state = await repo.journey_state(uow.conn, journey_id)
        if state is None:
            raise NotFound(
                f"journey {journey_id!r} does not exist", code="UNKNOWN_JOURNEY", field="journey_id"
            )
        raw = await repo.journey_counts(uow.conn, journey_id)
        t = raw["totals"]
        per_step: dict[str, dict[str, int]] = {}
        totals = {
            "pending": 0,
            "delivered": 0,
            "failed": 0,
            "capped": 0,
            "suppressed": 0,
            "dropped": 0,
        }
        for step_id, status, n in raw["steps"]:
            per_step.setdefault(step_id, {})[status] = n
            totals[status] = totals.get(status, 0) + n
        return JourneyMetrics(
            journey_id=journey_id,
            status=state.status,
            live_version=state.live_version,
            entered=t["entered"],
            active=t["active"],
            treated=t["treated"],
            holdout=t["holdout"],
            treated_converted=t["treated_conv"],
            holdout_converted=t["holdout_conv"],
            # A send is "sent" once written past the cap and consent checks.
            sent=sum(totals.get(k, 0) for k in SENT_STATUSES),
            capped=totals["capped"],
            suppressed=totals["suppressed"],
            dropped=totals["dropped"],
            steps=[StepMetrics(s, c) for s, c in sorted(per_step.items())],
            variants=[
                VariantMetrics(v, n, c, lift(c, n, t["holdout_conv"], t["holdout"]))
                for v, n, c in raw["variants"]
            ],
            lift=lift(t["treated_conv"], t["treated"], t["holdout_conv"], t["holdout"]),
        )

    # ---- members' choices ------------------------------------------------------

    @staticmethod
    def _channels(member_id: str, channels: list[str]) -> uuid.UUID:
        mid = parse_member_id(member_id)
        for n, c in enumerate(channels):
            if c not in CHANNELS:
                raise InvalidArgument(
                    f"unknown channel {c!r}", code="UNKNOWN_CHANNEL", field=f"channels[{n}]"
                )
        if not channels:
            raise InvalidArgument("at least one channel", code="NO_CHANNEL", field="channels")
        return mid

    def _recorder(self) -> ConsentRecorder:
        if self.consent is None:
            raise FailedPrecondition(
                "consent is recorded by the member service, and MEMBER_ADDR is not set",
                code="MEMBER_NOT_CONFIGURED",
                field="member_id",
            )
        return self.consent

    async def set_consent(
        self, uow: UnitOfWork, member_id: str, channels: list[str], granted: bool, source: str
    ) -> None:
        """Write the local projection only (tests, bench, seeding): a member's
        real choice goes through record_consent, to member."""
        mid = self._channels(member_id, channels)
        await facts_repo.ensure_member(uow.conn, mid)
        await facts_repo.set_consent(uow.conn, mid, channels, granted, source, self.clock.now())

    async def record_consent(
        self, uow: UnitOfWork, member_id: str, channels: list[str], granted: bool, source: str
    ) -> None:
        """A member's marketing choice per channel: recorded at member (the one
        source of truth, with history), then applied here with member's
        recorded_at (the ConsentChanged that follows changes nothing)."""
        mid = self._channels(member_id, channels)
        recorder = self._recorder()
        await facts_repo.ensure_member(uow.conn, mid)
        for c in channels:
            at = await recorder.record(str(mid), "marketing", c, granted, source)
            await facts_repo.apply_consent(uow.conn, mid, [c], granted, f"member:{source}", at)

    async def unsubscribe(self, uow: UnitOfWork, member_id: str, channels: list[str]) -> None:
        """Refuse marketing on `channels` (empty: every channel), through member."""
        await self.record_consent(
            uow, member_id, channels or sorted(CHANNELS), False, UNSUBSCRIBE_SOURCE
        )

    async def set_non_personalised(self, uow: UnitOfWork, member_id: str, value: bool) -> None:
        """The local projection only (tests, bench); see record_non_personalised."""
        mid = parse_member_id(member_id)
        await facts_repo.ensure_member(uow.conn, mid)
        await facts_repo.set_non_personalised(uow.conn, mid, value, self.clock.now())

    async def record_non_personalised(
        self, uow: UnitOfWork, member_id: str, value: bool, source: str
    ) -> None:
        """The "no personalisation" choice is member's personalisation consent
        refused: recorded there, then applied here."""
        mid = parse_member_id(member_id)
        recorder = self._recorder()
        await facts_repo.ensure_member(uow.conn, mid)
        at = await recorder.record(str(mid), "personalisation", "", not value, source)
        await facts_repo.apply_non_personalised(uow.conn, mid, value, at)

    async def on_consent_changed(
        self,
        uow: UnitOfWork,
        member_id: str,
        purpose: str,
        channel: str,
        granted: bool,
        source: str,
        recorded_at: datetime,
    ) -> None:
        """Member's record of a choice (member owns consent): marketing per
        channel into the consent projection, personalisation into the
        non-personalised preference; the latest recorded_at wins."""
        mid = parse_member_id(member_id)
        if purpose == "marketing":
            if channel and channel not in MEMBER_CHANNELS:
                log.warning("consent for unknown channel %r ignored", channel)
                return
            channels = [MEMBER_CHANNELS[channel]] if channel else sorted(CHANNELS)
            await facts_repo.apply_consent(
                uow.conn, mid, channels, granted, f"member:{source}", recorded_at
            )
        elif purpose == "personalisation":
            await facts_repo.apply_non_personalised(uow.conn, mid, not granted, recorded_at)
        else:
            log.warning("consent for unknown purpose %r ignored", purpose)

    # ---- events ------------------------------------------------------------------

    async def ingest(
        self,
        uow: UnitOfWork,
        event: str,
        member_id: str,
        attributes: dict[str, str],
        occurred_at: datetime | None = None,
    ) -> Ingested:
        if event not in EVENTS:
            raise InvalidArgument(f"unknown event {event!r}", code="UNKNOWN_EVENT", field="event")
        mid = parse_member_id(member_id)
        # Validate before parking: a parked event must replay cleanly later.
        coords = _validate_attributes(event, attributes)
        now = self.clock.now()
        at = occurred_at or now
        conn = uow.conn
        if event in INGESTED_EVENTS and not await facts_repo.member_known(conn, mid):
            await facts_repo.park_event(conn, mid, event, attributes, at, "UNKNOWN_MEMBER", now)
            return Ingested(True, [])
        if event == "subscription_tap":
            # The credit is the member's consent to exactly one such message.
            await facts_repo.add_subscription_credit(conn, mid, attributes["template"])
            if attributes.get("openid"):
                await facts_repo.set_address(conn, mid, "miniprogram", attributes["openid"])
        elif event == "location_reported":
            # Kept only with the member's consent to its use; otherwise forgotten.
            if coords is None:
                await facts_repo.clear_location(conn, mid)
            else:
                await facts_repo.set_location(conn, mid, coords[0], coords[1], at)
        attributes = await self.with_store_name(attributes)
        # An event from a service that knows the member introduces it: the
        # events parked for it are taken in the event's own statement.
        enrolled = await self._on_event(
            uow, event, mid, attributes, now, introduce=event not in INGESTED_EVENTS
        )
        return Ingested(False, enrolled)

    async def with_store_name(self, attributes: dict[str, str]) -> dict[str, str]:
        """An event naming a store also carries the store's name as rewards
        knows it (`{store_name}`; the port caches it), when the event has none."""
        store_id = attributes.get("store_id", "")
        if not store_id or attributes.get("store_name") or self.stores is None:
            return attributes
        return {**attributes, "store_name": await self.stores.name_of(store_id)}

    async def _introduce(self, uow: UnitOfWork, mid: uuid.UUID) -> list[str]:
        """The member is known now (registration, or any event from a service
        that knows them): first replay what was parked for them, in order,
        since it happened before the introducing event."""
        enrolled: list[str] = []
        for parked, attrs, parked_at in await facts_repo.introduce(uow.conn, mid):
            enrolled += (await self.ingest(uow, parked, str(mid), attrs, parked_at)).enrolled
        return enrolled

    # ---- the member's time zone ---------------------------------------------------

    async def on_zone_set(
        self, uow: UnitOfWork, member_id: str, time_zone: str, store_id: str
    ) -> str:
        """Member's MemberZoneSet: the member's zone is the profile's, else the
        registration store's (asked of the store port), else DEFAULT_TZ. Quiet
        hours, the daily caps' local day and local-time waits use it. Returns
        the zone applied."""
        mid = parse_member_id(member_id)
        resolved = ""
        if time_zone:
            if is_zone(time_zone):
                resolved = time_zone
            else:  # member validates; an old or foreign value must not break delivery
                log.warning("member %s: time zone %r unknown, ignored", mid, time_zone)
        if not resolved and store_id and self.stores is not None:
            found = await self.stores.zone_of(store_id)
            resolved = found if found and is_zone(found) else ""
        resolved = resolved or DEFAULT_TZ
        await facts_repo.set_zone(uow.conn, mid, time_zone, store_id, resolved)
        await self._introduce(uow, mid)  # member knows this member
        return resolved

    # ---- parked events (operators) --------------------------------------------

    async def list_journeys(
        self, uow: UnitOfWork, page_size: int, page_token: str
    ) -> tuple[list[repo.JourneySummaryRow], str]:
        """A page of journeys by id and the next page's token (the last id)."""
        size = _page_size(page_size)
        if page_token and not JOURNEY_ID.match(page_token):
            raise _bad_page_token()
        rows = await repo.list_journeys(uow.conn, page_token, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return rows, (rows[-1].journey_id if more else "")

    async def list_parked(
        self, uow: UnitOfWork, member_id: str, page_size: int, page_token: str
    ) -> tuple[list[facts_repo.ParkedRow], str]:
        """A page of parked events (oldest first) and the next page's token."""
        mid = parse_member_id(member_id) if member_id else None
        size = _page_size(page_size)
        after = 0
        if page_token:
            try:
                after = int(page_token)
            except ValueError:
                after = -1
            if after < 0:
                raise _bad_page_token()
        rows = await facts_repo.list_parked(uow.conn, mid, after, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return rows, (str(rows[-1].id) if more else "")

    async def _known_journey(self, uow: UnitOfWork, journey_id: str) -> None:
        if await repo.journey_state(uow.conn, journey_id) is None:
            raise NotFound(
                f"journey {journey_id!r} does not exist", code="UNKNOWN_JOURNEY", field="journey_id"
            )

    async def journey_sends(
        self, uow: UnitOfWork, journey_id: str
    ) -> list[scheduler_repo.SendCount]:
        """Operators: the journey's sends by step, channel, status and provider code."""
        await self._known_journey(uow, journey_id)
        return await scheduler_repo.send_counts(uow.conn, journey_id)

    async def unknown_sends(
        self, uow: UnitOfWork, journey_id: str, page_size: int, page_token: str
    ) -> tuple[list[scheduler_repo.UnknownSend], str]:
        """Operators: a page of the journey's unknown sends and the next page's token."""
        size = _page_size(page_size)
        after: tuple[datetime, str] | None = None
        if page_token:
            at, _, key = page_token.partition("|")
            try:
                after = (datetime.fromisoformat(at), key)
            except ValueError:
                after = None
            if after is None or not key or after[0].tzinfo is None:
                raise _bad_page_token()
        await self._known_journey(uow, journey_id)
        rows = await scheduler_repo.unknown_sends(uow.conn, journey_id, after, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        token = f"{rows[-1].updated_at.isoformat()}|{rows[-1].send_key}" if more else ""
        return rows, token

    async def apply_sms_receipts(
        self, uow: UnitOfWork, receipts: list[scheduler_repo.Receipt]
    ) -> int:
        """Delivery reports (verified by the gateway): each settles its send once."""
        for r in receipts:
            if not r.send_key or not r.provider_ref:
                raise InvalidArgument(
                    "a receipt needs out_id and biz_id", code="INVALID_RECEIPT", field="receipts"
                )
        return await scheduler_repo.apply_receipts(uow.conn, receipts, self.clock.now())

    async def replay_parked(self, uow: UnitOfWork, member_id: str) -> tuple[int, list[str]]:
        """An operator vouches that the member exists: it becomes known here
        and its parked events are replayed in order, as on registration."""
        mid = parse_member_id(member_id)
        parked = await facts_repo.take_parked(uow.conn, mid)
        if not parked:
            raise NotFound(
                "no parked events for this member", code="NO_PARKED_EVENTS", field="member_id"
            )
        await facts_repo.ensure_member(uow.conn, mid)
        enrolled: list[str] = []
        for event, attrs, at in parked:
            enrolled += (await self.ingest(uow, event, str(mid), attrs, at)).enrolled
        return len(parked), enrolled

    async def expire_parked(
        self, uow: UnitOfWork, older_than: timedelta, limit: int = 10_000
    ) -> int:
        """Delete (a batch of) events parked longer than `older_than`: a member
        never introduced in that time is not coming (or was never real)."""
        if not timedelta(days=1) <= older_than <= timedelta(days=MAX_PARKED_DAYS):
            raise InvalidArgument(
                f"older_than_days must be 1..{MAX_PARKED_DAYS}",
                code="INVALID_AGE",
                field="older_than_days",
            )
        return await facts_repo.expire_parked(uow.conn, self.clock.now() - older_than, limit)

    async def near_store_audience(
        self, uow: UnitOfWork, journey_id: str, latitude: float, longitude: float, radius_m: int
    ) -> list[uuid.UUID]:
        """Members with a fresh, consented location within radius_m of a store."""
        state = await repo.journey_state(uow.conn, journey_id)
        if state is None:
            raise NotFound(
                f"journey {journey_id!r} does not exist", code="UNKNOWN_JOURNEY", field="journey_id"
            )
        journey = await self.journeys.get(uow.conn, journey_id, state.live_version)
        if journey.entry_event != "near_store":
            raise FailedPrecondition(
                "only a journey entered by near_store can be launched at a store",
                code="NOT_A_STORE_JOURNEY",
                field="journey_id",
            )
        if state.status != "active":
            raise FailedPrecondition(
                "the journey is paused", code="JOURNEY_PAUSED", field="journey_id"
            )
        if parse_coordinates(str(latitude), str(longitude)) is None:
            raise InvalidArgument(
                "store coordinates are not WGS-84 degrees",
                code="INVALID_LOCATION",
                field="latitude",
            )
        if not 0 < radius_m <= MAX_RADIUS_M:
            raise InvalidArgument(
                f"radius_m must be 1..{MAX_RADIUS_M}", code="INVALID_RADIUS", field="radius_m"
            )
        since = self.clock.now() - LOCATION_FRESH_FOR
        box = bounding_box(latitude, longitude, radius_m)
        return await facts_repo.members_near(uow.conn, box, latitude, longitude, radius_m, since)

    async def enter_near_store(
        self, uow: UnitOfWork, journey_id: str, store_id: str, members: list[uuid.UUID]
    ) -> int:
        """Enroll one chunk of a store's audience (re-entry and holdout rules apply)."""
        conn = uow.conn
        state = await repo.journey_state(conn, journey_id)
        if state is None or state.status != "active":
            return 0
        journey = await self.journeys.get(conn, journey_id, state.live_version)
        facts = await facts_repo.load_facts(conn, members)
        now = self.clock.now()
        entered = 0
        attributes = await self.with_store_name({"store_id": store_id})
        for mid in members:
            member = facts.get(str(mid)) or MemberFacts(str(mid))
            if await self._enroll(uow, journey, state.live_version, mid, attributes, member, now):
                entered += 1
        return entered

    async def _on_event(
        self,
        uow: UnitOfWork,
        event: str,
        mid: uuid.UUID,
        attrs: dict[str, str],
        now: datetime,
        introduce: bool = False,
    ) -> list[str]:
        conn = uow.conn
        order = event == "order_completed"
        asked = [event, "first_order"] if order else [event]
        value = attrs.get(FACT_ATTRIBUTE.get(event, ""), "")
        applied = await repo.apply_event(
            conn, mid, event, value, asked, introduce, attrs.get("store_id", "") if order else ""
        )
        # What was parked happened before this event: replayed before it is
        # applied to enrollments (the replay may have enrolled the member).
        replayed: list[str] = []
        for parked, parked_attrs, parked_at in applied.parked:
            got = await self.ingest(uow, parked, str(mid), parked_attrs, parked_at)
            replayed += got.enrolled
        events = [event]
        if order and applied.order_count == 1:
            events.append("first_order")
        live: list[repo.EnrollmentRow] = []
        if applied.enrolled or applied.parked:
            # Timer locks before the enrollments (the sweeper's order); a member
            # with no enrollment has no timer to lock and nothing to convert.
            await repo.lock_member_timers(conn, [mid])
            if order:
                await repo.mark_converted(conn, mid, now)
            live = await repo.live_enrollments(conn, mid)
        entries = [applied.entries[name] for name in events]
        if not live and not any(entries):
            return replayed  # most orders: nothing to move on, nothing to enter
        facts = (await facts_repo.load_facts(conn, [mid])).get(str(mid)) or MemberFacts(str(mid))
        # Live enrollments: a goal exits them, an awaited event moves them on.
        for enr in live:
            journey = await self.journeys.get(conn, enr.journey_id, enr.version)
            if journey.goal_event in events:
                await repo.end_enrollment(conn, enr.enrollment_id, "converted", now)
                continue
            if enr.waiting_step is not None:
                wait = journey.step(enr.waiting_step)
                if wait.event in events and wait.on_event is not None:
                    state = await repo.journey_state(conn, enr.journey_id)
                    due = schedule_time(journey, wait.on_event, now, facts, self.quiet)
                    await repo.upsert_timer(
                        conn,
                        enr.enrollment_id,
                        enr.journey_id,
                        wait.on_event,
                        due,
                        state is not None and state.status == "paused",
                        journey.priority,
                    )
                    await repo.set_waiting(conn, enr.enrollment_id, None)
        enrolled = replayed
        for journeys in entries:
            for journey_id, version in journeys:
                journey = await self.journeys.get(conn, journey_id, version)
                if await self._enroll(uow, journey, version, mid, attrs, facts, now):
                    enrolled.append(journey_id)
        return enrolled

    async def _enroll(
        self,
        uow: UnitOfWork,
        journey: Journey,
        version: int,
        mid: uuid.UUID,
        attrs: dict[str, str],
        facts: MemberFacts,
        now: datetime,
    ) -> bool:
        if any(attrs.get(k) != v for k, v in journey.entry_where.items()):
            return False
        conn = uow.conn
        last = await repo.last_enrollment(conn, journey.journey_id, mid)
        if last is not None:
            if last.status == "active" or journey.reentry == "never":
                return False
            if journey.reentry == "after_days":
                since = last.ended_at or last.entered_at
                if now - since < timedelta(days=journey.reentry_days):
                    return False
        holdout = bucket(str(mid), f"holdout:{journey.journey_id}") < journey.holdout_percent * 100
        enrollment_id = uuid.uuid4()
        # A holdout member is live like a treated one (one live enrollment per
        # member per journey, the same re-entry rules), for the goal's
        # measurement window: its timer ends it then, sending nothing.
        inserted = await repo.insert_enrollment(
            conn,
            enrollment_id,
            journey.journey_id,
            version,
            mid,
            "active",
            "holdout" if holdout else "treatment",
            journey.conversion_days,
            now,
            attrs,
        )
        if not inserted:
            return False
        if holdout:
            due = now + timedelta(days=journey.conversion_days)
        else:
            due = schedule_time(journey, journey.start, now, facts, self.quiet)
        await repo.upsert_timer(
            conn, enrollment_id, journey.journey_id, journey.start, due, False, journey.priority
        )
        return True

    # ---- birthday month ----------------------------------------------------------

    async def on_birthday_set(self, uow: UnitOfWork, member_id: str, month: int, day: int) -> None:
        mid = parse_member_id(member_id)
        if not (month == day == 0 or (1 <= month <= 12 and 1 <= day <= 31)):
            raise InvalidArgument(
                f"birthday month {month} day {day} is not a date",
                code="INVALID_BIRTHDAY",
                field="month",
            )
        await facts_repo.set_birthday(uow.conn, mid, month, day)

    async def enter_birthday_month(self, uow: UnitOfWork, limit: int = 500) -> int:
        """One batch of the daily birthday-month entry: members whose birthday
        month has started (local day, DEFAULT_TZ) and who have not entered for
        it yet. On the 1st that is the month's members; on other days only
        those whose birthday was set since. Returns how many entered."""
        today = local_day(self.clock.now(), DEFAULT_TZ)
        claimed = await facts_repo.claim_birthdays(
            uow.conn, today.month, birthday_month_key(today), limit
        )
        for mid, day in claimed:
            await self.ingest(
                uow, "birthday_month", str(mid), {"month": str(today.month), "day": str(day)}
            )
        return len(claimed)

    # ---- identity -----------------------------------------------------------------

    async def on_merged(self, uow: UnitOfWork, merge_id: str, survivor: str, absorbed: str) -> None:
        await repo.merge_member(
            uow.conn,
            merge_id,
            parse_member_id(survivor),
            parse_member_id(absorbed),
            self.clock.now(),
        )

    async def on_unmerged(
        self, uow: UnitOfWork, merge_id: str, survivor: str, restored: str
    ) -> None:
        await repo.unmerge_member(
            uow.conn, merge_id, parse_member_id(survivor), parse_member_id(restored)
        )

    async def on_erased(self, uow: UnitOfWork, member_ids: list[str]) -> None:
        for m in member_ids:
            await repo.erase_member(uow.conn, parse_member_id(m), self.clock.now())


def _validate_attributes(event: str, attributes: dict[str, str]) -> tuple[float, float] | None:
    """Check an event's attributes; for a consented location, its coordinates."""
    if event == "subscription_tap" and not attributes.get("template"):
        raise InvalidArgument(
            "a subscription tap names its template",
            code="MISSING_TEMPLATE",
            field="attributes.template",
        )
    if event == "location_reported" and attributes.get("consent") == "true":
        coords = parse_coordinates(attributes.get("latitude", ""), attributes.get("longitude", ""))
        if coords is None:
            raise InvalidArgument(
                "latitude and longitude must be WGS-84 degrees",
                code="INVALID_LOCATION",
                field="attributes.latitude",
            )
        return coords
    return None


def _page_size(page_size: int) -> int:
    """An operator list's page size: 0 means the default."""
    size = page_size or DEFAULT_PAGE
    if not 1 <= size <= MAX_PAGE:
        raise InvalidArgument(
            f"page_size must be 1..{MAX_PAGE}", code="INVALID_PAGE_SIZE", field="page_size"
        )
    return size


def _bad_page_token() -> InvalidArgument:
    return InvalidArgument(
        "page_token is not one this service gave", code="INVALID_PAGE_TOKEN", field="page_token"
    )
