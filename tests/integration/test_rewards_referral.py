"""Referral against real PostgreSQL: stable unique invite codes, an invitee
linked once under concurrent accepts, every abuse rule refusing with its code
and writing nothing, the inviter's cap under concurrency, the first-order
step granted exactly once however often the order event is redelivered, and
the fission report.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from loyalty.events.v1 import events_pb2
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from servicekit.db import Connection, Database, asyncpg_dsn, create_pool
from servicekit.errors import Conflict, DomainError, FailedPrecondition, NotFound, error_info
from servicekit.events import ENVELOPE_FIELD, ReceivedEvent, make_envelope, stream_name
from servicekit.protos import timestamp
from services.rewards.consumers import OrderEvents
from services.rewards.coupons.handlers import issue_coupon
from services.rewards.kernel import Channel, OrderRequest
from services.rewards.orders.handlers import RewardsHandlers
from services.rewards.points.handlers import PointsLedger
from services.rewards.referral.domain import ReferralRules, RewardSpec, StepRewards
from services.rewards.referral.handlers import Referrals, ReferralView
from services.rewards.seed import seed_demo

from ..harness import Infra, eventually, own_database

NOW = datetime(2026, 6, 1, 4, 0, tzinfo=UTC)
# Invitee gets a coupon on registration; on the first order both sides get the
# "referral" action's points (100 by default) and the inviter a coupon too.
RULES = ReferralRules(
    registration=StepRewards(invitee=RewardSpec(coupon_template_id="NEW-MEMBER-20")),
    first_order=StepRewards(
        inviter=RewardSpec(coupon_template_id="INVITE-20", points_action="referral"),
        invitee=RewardSpec(points_action="referral"),
    ),
)


class Coupons:
    """Records what referral asked coupon_service for (one coupon per issue key)."""

    def __init__(self) -> None:
        self.issued: dict[str, str] = {}

    async def __call__(self, conn: Connection, **kw: Any) -> Any:
        if kw["template_id"] == "SOLD-OUT":
            raise FailedPrecondition("out of stock", code="OUT_OF_STOCK", field="template_id")
        coupon_id = self.issued.setdefault(kw["issue_key"], str(uuid.uuid4()))

        class Issued:
            pass

        issued = Issued()
        issued.coupon_id = coupon_id  # type: ignore[attr-defined]
        return issued


class Programme:
    def __init__(self, db: Database, rules: ReferralRules = RULES) -> None:
        self.db = db
        self.coupons = Coupons()
        self.points = PointsLedger()
        self.referrals = Referrals(self.points, rules, self.coupons)
        self.handlers = RewardsHandlers(points=self.points)

    async def code(self, member: str, device: str = "") -> str:
        async with self.db.unit_of_work() as uow:
            return (await self.referrals.invite_code(uow, member, device)).code

    async def accept(
        self,
        invitee: str,
        code: str,
        *,
        device: str = "",
        registered: datetime | None = None,
        now: datetime = NOW,
    ) -> ReferralView:
        async with self.db.unit_of_work() as uow:
            return await self.referrals.accept(
                uow,
                invitee,
                code,
                invitee_registered_at=registered or now - timedelta(minutes=3),
                device_id=device,
                identifier_hashes=[],
                now=now,
            )

    async def order(self, member: str) -> str:
        settlement = self.handlers.prepare_order(
            OrderRequest(
                store_id="SH001",
                pos_transaction_id=f"R-{uuid.uuid4().hex[:16]}",
                member_id=member,
                channel=Channel.STORE,
                paid_amount_fen=3_200,
                ordered_at=NOW,
            )
        )
        async with self.db.unit_of_work() as uow:
            return (await self.handlers.complete_order(uow, settlement, NOW)).unwrap().order_id

    async def order_event(self, member: str, order_id: str) -> ReferralView | None:
        async with self.db.unit_of_work() as uow:
            return await self.referrals.on_order_completed(uow, member, order_id, NOW, NOW)


def new_member() -> str:
    return str(uuid.uuid4())


async def rows(conn: asyncpg.Connection, table: str, column: str, member: str) -> int:
    return int(
        await conn.fetchval(
            f"SELECT count(*) FROM rewards.{table} WHERE {column} = $1", uuid.UUID(member)
        )
    )


async def test_invite_code_is_made_once_and_stays(db: Database) -> None:
    p, member = Programme(db), new_member()
    codes = await asyncio.gather(*(p.code(member) for _ in range(16)))
    assert len(set(codes)) == 1
    assert await p.code(member) == codes[0]
    assert await p.code(new_member()) != codes[0]


async def test_an_invitee_is_linked_once_with_registration_rewards(
    db: Database, conn: asyncpg.Connection
) -> None:
    p, inviter, invitee = Programme(db), new_member(), new_member()
    code = await p.code(inviter)
    views = await asyncio.gather(*(p.accept(invitee, code.lower()) for _ in range(32)))
    assert len({v.referral_id for v in views}) == 1
    assert sum(not v.replayed for v in views) == 1
    assert await rows(conn, "referrals", "invitee_id", invitee) == 1
    (reward,) = views[0].rewards
    assert (reward.step, reward.role, reward.status) == ("registration", "invitee", "granted")
    assert len(p.coupons.issued) == 1
    # Another inviter's code afterwards: a clear conflict, nothing changes.
    other = await p.code(new_member())
    with pytest.raises(Conflict) as caught:
        await p.accept(invitee, other)
    assert caught.value.code == "ALREADY_REFERRED"


@pytest.mark.parametrize(
    "case", ["own_code", "inviter_device", "registered_long_ago", "has_ordered", "cycle", "unknown"]
)
async def test_abuse_is_refused_and_writes_nothing(
    db: Database, conn: asyncpg.Connection, case: str
) -> None:
    p, inviter, invitee = Programme(db), new_member(), new_member()
    code = await p.code(inviter, device="phone-of-inviter")
    kwargs: dict[str, Any] = {}
    expected = {
        "own_code": "SELF_REFERRAL",
        "inviter_device": "SELF_REFERRAL",
        "registered_long_ago": "INVITEE_ALREADY_MEMBER",
        "has_ordered": "INVITEE_ALREADY_MEMBER",
        "cycle": "REFERRAL_CYCLE",
        "unknown": "UNKNOWN_INVITE_CODE",
    }[case]
    if case == "own_code":
        invitee = inviter
    elif case == "inviter_device":
        kwargs["device"] = "phone-of-inviter"
    elif case == "registered_long_ago":
        kwargs["registered"] = NOW - timedelta(days=30)
    elif case == "has_ordered":
        await p.order(invitee)
    elif case == "cycle":
        # The invitee had invited the inviter: B invited A, now A invites B.
        await p.accept(inviter, await p.code(invitee))
    elif case == "unknown":
        code = "22222222"
    coupons_before = len(p.coupons.issued)
    with pytest.raises(DomainError) as caught:
        await p.accept(invitee, code, **kwargs)
    assert caught.value.code == expected
    assert isinstance(caught.value, NotFound if case == "unknown" else FailedPrecondition)
    assert await rows(conn, "referrals", "invitee_id", invitee) == 0
    assert await rows(conn, "referral_fingerprints", "member_id", invitee) == (
        1 if case == "own_code" else 0
    )
    assert len(p.coupons.issued) == coupons_before


async def test_one_device_behind_many_invitees_links_one(
    db: Database, conn: asyncpg.Connection
) -> None:
    p, inviter = Programme(db), new_member()
    code = await p.code(inviter)
    invitees = [new_member() for _ in range(16)]
    results = await asyncio.gather(
        *(p.accept(m, code, device="farm-device-7") for m in invitees), return_exceptions=True
    )
    assert sum(isinstance(r, ReferralView) for r in results) == 1
    assert {r.code for r in results if isinstance(r, DomainError)} == {"FINGERPRINT_ALREADY_USED"}
    linked = await conn.fetchval(
        "SELECT count(*) FROM rewards.referrals WHERE inviter_id = $1", uuid.UUID(inviter)
    )
    assert linked == 1


async def test_inviter_cap_holds_under_concurrent_accepts(
    db: Database, conn: asyncpg.Connection
) -> None:
    rules = ReferralRules(
        registration=StepRewards(inviter=RewardSpec(coupon_template_id="INVITE-20")),
        first_order=StepRewards(),
        max_rewarded_per_inviter=3,
    )
    p, inviter = Programme(db, rules), new_member()
    code = await p.code(inviter)
    views = await asyncio.gather(*(p.accept(new_member(), code) for _ in range(12)))
    statuses = [v.rewards[0].status for v in views]
    assert statuses.count("granted") == 3 and statuses.count("refused") == 9
    refused = [v.rewards[0] for v in views if v.rewards[0].status == "refused"]
    assert {r.refusals[0]["code"] for r in refused} == {"INVITER_REWARD_CAP_REACHED"}
    assert len(p.coupons.issued) == 3
    counter = await conn.fetchval(
        "SELECT rewarded FROM rewards.referral_counters WHERE inviter_id = $1", uuid.UUID(inviter)
    )
    assert counter == 3


async def test_first_order_rewards_once_under_redelivery(
    db: Database, conn: asyncpg.Connection
) -> None:
    p, inviter, invitee = Programme(db), new_member(), new_member()
    await p.accept(invitee, await p.code(inviter))
    order_id = await p.order(invitee)
    # The same OrderCompleted delivered 16 times at once, then a later order.
    results = await asyncio.gather(*(p.order_event(invitee, order_id) for _ in range(16)))
    granted = [r for r in results if r is not None]
    assert len(granted) == 1
    assert await p.order_event(invitee, await p.order(invitee)) is None
    view = granted[0]
    by_side = {(r.step, r.role): r for r in view.rewards}
    assert by_side[("first_order", "inviter")].status == "granted"
    assert by_side[("first_order", "inviter")].points == 100
    assert by_side[("first_order", "inviter")].coupon_id
    assert by_side[("first_order", "invitee")].points == 100
    earned = await conn.fetchval(
        "SELECT count(*) FROM rewards.points_transactions WHERE member_id = $1 AND kind = 'earn'"
        " AND reference = 'referral'",
        uuid.UUID(inviter),
    )
    assert earned == 1
    # A member who was never invited: nothing happens.
    stranger = new_member()
    assert await p.order_event(stranger, await p.order(stranger)) is None


async def test_a_refused_coupon_keeps_the_points_part(db: Database) -> None:
    rules = ReferralRules(
        registration=StepRewards(
            invitee=RewardSpec(coupon_template_id="SOLD-OUT", points_action="referral")
        ),
        first_order=StepRewards(),
    )
    p = Programme(db, rules)
    view = await p.accept(new_member(), await p.code(new_member()))
    (reward,) = view.rewards
    assert reward.status == "partial" and reward.points == 100
    assert reward.refusals == [{"code": "OUT_OF_STOCK", "message": "out of stock"}]


async def test_fission_report_counts_two_generations(db: Database) -> None:
    # A far-away period, so other tests' referrals do not count.
    at = datetime(2031, 3, 10, 4, 0, tzinfo=UTC)
    p = Programme(db, ReferralRules(registration=StepRewards(), first_order=StepRewards()))
    seeds = [new_member() for _ in range(2)]
    first = [new_member() for _ in range(4)]
    for i, m in enumerate(first):
        await p.accept(m, await p.code(seeds[i % 2]), now=at)
    # Two of the invitees bring in three more; one arrives after the period.
    second = [new_member() for _ in range(3)]
    await p.accept(second[0], await p.code(first[0]), now=at + timedelta(days=1))
    await p.accept(second[1], await p.code(first[0]), now=at + timedelta(days=2))
    await p.accept(second[2], await p.code(first[1]), now=at + timedelta(days=40))
    async with db.unit_of_work() as uow:
        report = await p.referrals.fission(uow, at - timedelta(days=1), at + timedelta(days=30))
    # Inviters in the period: the 2 seeds and first[0]; invitees: 4 + 2.
    assert (report.inviters, report.invitees, report.second_generation) == (3, 6, 2)
    assert report.coefficient == pytest.approx(2.0)
    # Seeds: the two members nobody invited, with their 4 invitees (first[0] was invited).
    assert (report.seed_inviters, report.seed_invitees) == (2, 4)
    assert report.seed_spread == pytest.approx(2.0)


async def test_coupons_come_from_coupon_service_once(
    db: Database, conn: asyncpg.Connection
) -> None:
    # The demo "first cup half price" (new members only, one per member) for
    # the invitee on registration, through the real issue_coupon.
    rules = ReferralRules(
        registration=StepRewards(invitee=RewardSpec(coupon_template_id="FIRST-CUP-HALF")),
        first_order=StepRewards(),
    )
    p, invitee = Programme(db, rules), new_member()
    p.referrals = Referrals(p.points, rules, issue_coupon)
    code = await p.code(new_member())
    views = await asyncio.gather(*(p.accept(invitee, code) for _ in range(8)))
    (reward,) = views[0].rewards
    assert reward.status == "granted" and reward.coupon_id
    coupons = await conn.fetch(
        "SELECT id::text, reason, template_id FROM rewards.coupons WHERE member_id = $1",
        uuid.UUID(invitee),
    )
    assert [(c["id"], c["reason"], c["template_id"]) for c in coupons] == [
        (reward.coupon_id, "referral", "FIRST-CUP-HALF")
    ]


async def test_through_grpc_erasure_forgets_fingerprints(
    infra: Infra, rewards_channel: grpc.aio.Channel, conn: asyncpg.Connection
) -> None:
    stub = rewards_pb2_grpc.RewardsServiceStub(rewards_channel)
    inviter, invitee = new_member(), new_member()
    code = await stub.GetInviteCode(
        rewards_pb2.GetInviteCodeRequest(member_id=inviter, device_id="inviter-phone")
    )
    registered = timestamp(datetime.now(UTC) - timedelta(minutes=1))
    accept = rewards_pb2.AcceptReferralRequest(
        invitee_member_id=invitee,
        invite_code=code.code,
        device_id="invitee-phone",
        invitee_registered_at=registered,
    )
    referral = await stub.AcceptReferral(accept)
    assert referral.inviter_member_id == inviter and not referral.replayed
    listed = await stub.ListReferrals(rewards_pb2.ListReferralsRequest(inviter_member_id=inviter))
    assert [r.referral_id for r in listed.referrals] == [referral.referral_id]
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.AcceptReferral(
            rewards_pb2.AcceptReferralRequest(invitee_member_id=new_member(), invite_code=code.code)
        )
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(missing.value) == ("REGISTERED_AT_REQUIRED", "invitee_registered_at")

    async with Redis.from_url(infra.redis_url) as redis:
        erased = events_pb2.MemberErased(member_ids=[invitee, inviter])
        envelope = make_envelope("member", erased, invitee)
        await redis.xadd(
            stream_name(infra.namespace, "member"), {ENVELOPE_FIELD: envelope.SerializeToString()}
        )

    async def forgotten() -> bool:
        left = await conn.fetchval(
            "SELECT count(*) FROM rewards.referral_fingerprints WHERE member_id = ANY($1::uuid[])",
            [uuid.UUID(inviter), uuid.UUID(invitee)],
        )
        return bool(left == 0)

    await eventually(forgotten)
    # The referral itself (what was granted) stays; new writes are refused.
    assert await rows(conn, "referrals", "invitee_id", invitee) == 1
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetInviteCode(rewards_pb2.GetInviteCodeRequest(member_id=inviter))
    assert error_info(refused.value)[0] == "MEMBER_ERASED"


def _completed(member: str, order_id: str, store: str) -> Any:
    payload = events_pb2.OrderCompleted(
        order_id=order_id, member_id=member, store_id=store, ordered_at=timestamp(NOW)
    )
    return ReceivedEvent("rewards", "0-1", make_envelope("rewards", payload, member), payload)


@pytest.fixture
async def own_db(infra: Infra) -> AsyncIterator[tuple[Database, asyncpg.Connection]]:
    """Rewards in a database of its own: the session's rewards service, once a
    test started it, relays and consumes the orders' own OrderCompleted in the
    shared one at its own pace, running the referral step under its own rules
    and writing the order's store (seen as a flake: the invitee's points, and
    the store, differed between the twins)."""
    async with own_database(infra, "rewards", prefix="referral_batch") as url:
        pool = await create_pool(url, 1, 4)
        async with pool.acquire() as c:
            await seed_demo(c)
        database = Database(pool, "rewards", "rewards")
        c = await asyncpg.connect(asyncpg_dsn(url))
        try:
            yield database, c
        finally:
            await c.close()
            await database.close()


async def test_a_read_of_orders_in_one_batch_equals_them_one_by_one(
    own_db: tuple[Database, asyncpg.Connection],
) -> None:
    """Rewards' own OrderCompleted as the consumer's batch handler: the order
    stores in one statement, the referral step only for members whose
    invitation still waits for a first order. Twins: invited, invited whose
    first order was rewarded already, never invited; one by one and as one
    run, the same rewards, first orders and stores."""
    db, conn = own_db
    p = Programme(db)
    events = OrderEvents(p.referrals)
    outcome = []
    for batch in (False, True):
        inviter, invited, done, stranger = (new_member() for _ in range(4))
        code = await p.code(inviter)
        await p.accept(invited, code)
        await p.accept(done, code)
        await p.order_event(done, await p.order(done))  # its first order, rewarded
        run = [
            _completed(m, await p.order(m), store)
            for m, store in ((invited, "SH001"), (done, "SH002"), (stranger, ""))
        ]
        async with db.unit_of_work() as uow:
            if batch:
                await events.on_orders_completed(uow, run)
            else:
                for e in run:
                    await events.on_order_completed(uow, e)
        seen = []
        for m in (inviter, invited, done, stranger):
            seen.append(
                (
                    await rows(conn, "points_transactions", "member_id", m),
                    await conn.fetchval(
                        "SELECT first_order_id IS NOT NULL FROM rewards.referrals"
                        " WHERE invitee_id = $1",
                        uuid.UUID(m),
                    ),
                    await conn.fetchval(
                        "SELECT order_store_id FROM rewards.member_stores WHERE member_id = $1",
                        uuid.UUID(m),
                    ),
                )
            )
        outcome.append(seen)
    assert outcome[0] == outcome[1]
    assert outcome[1][1][1] is True  # the invited member's first order counted
