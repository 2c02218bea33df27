"""Tiering against real PostgreSQL and Redis: programme publish/simulate, the
growth ledger, tier evaluation driven by order/refund events, overrides,
projection, merges."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from loyalty.events.v1 import events_pb2
from loyalty.tiering.v1 import tiering_pb2, tiering_pb2_grpc
from servicekit.db import asyncpg_dsn
from servicekit.errors import error_info
from servicekit.events import ENVELOPE_FIELD, make_envelope, stream_name
from servicekit.protos import timestamp as ts
from servicekit.server import ServiceApp
from services.tiering.seed import DEMO_PROGRAMME, seed_demo

from ..harness import Infra, eventually

NOW = datetime.now(UTC)
GOOD_LADDER = json.dumps(DEMO_PROGRAMME.ladder.to_json())
GOOD_RULES = json.dumps({"period": {"unit": "month", "length": 12}, "grace_days": 14})


@pytest.fixture
async def redis(infra: Infra) -> AsyncIterator[Redis]:
    client = Redis.from_url(infra.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def conn(infra: Infra) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    yield connection
    await connection.close()


@pytest.fixture
async def stub(
    tiering_app: ServiceApp, tiering_channel: grpc.aio.Channel, conn: asyncpg.Connection
) -> tiering_pb2_grpc.TieringServiceStub:
    await seed_demo(conn)
    return tiering_pb2_grpc.TieringServiceStub(tiering_channel)


async def publish(redis: Redis, infra: Infra, producer: str, payload: Any, member: str) -> str:
    envelope = make_envelope(producer, payload, member)
    await redis.xadd(
        stream_name(infra.namespace, producer), {ENVELOPE_FIELD: envelope.SerializeToString()}
    )
    return envelope.event_id


async def order(
    redis: Redis, infra: Infra, member: str, fen: int, at: datetime, order_id: str | None = None
) -> str:
    oid = order_id or str(uuid.uuid4())
    await publish(
        redis,
        infra,
        "rewards",
        events_pb2.OrderCompleted(
            order_id=oid,
            member_id=member,
            store_id="SH001",
            paid_amount_fen=fen,
            gross_amount_fen=fen,
            ordered_at=ts(at),
        ),
        member,
    )
    return oid


async def refund(
    redis: Redis, infra: Infra, member: str, order_id: str, fen: int, refund_id: str
) -> None:
    await publish(
        redis,
        infra,
        "rewards",
        events_pb2.OrderRefunded(
            refund_id=refund_id,
            order_id=order_id,
            member_id=member,
            store_id="SH001",
            refunded_amount_fen=fen,
            refunded_at=ts(datetime.now(UTC)),
        ),
        member,
    )


async def tier(stub: tiering_pb2_grpc.TieringServiceStub, member: str) -> tiering_pb2.MemberTier:
    return await stub.GetMemberTier(tiering_pb2.GetMemberTierRequest(member_id=member))


async def tier_is(
    stub: tiering_pb2_grpc.TieringServiceStub, member: str, code: str, metric: int | None = None
) -> tiering_pb2.MemberTier | None:
    reply = await tier(stub, member)
    if reply.tier.code != code or (metric is not None and reply.metric_value != metric):
        return None
    return reply


async def events_of(redis: Redis, infra: Infra, member: str, kind: str) -> list[bytes]:
    """Serialized payloads of one event type tiering published for a member."""
    found = []
    for _, fields in await redis.xrange(stream_name(infra.namespace, "tiering")):
        envelope = events_pb2.EventEnvelope.FromString(fields[ENVELOPE_FIELD])
        if envelope.member_id == member and envelope.event_type.endswith(kind):
            found.append(envelope.payload.value)
    return found


async def tier_events(redis: Redis, infra: Infra, member: str) -> list[events_pb2.TierChanged]:
    return [
        events_pb2.TierChanged.FromString(value)
        for value in await events_of(redis, infra, member, "TierChanged")
    ]


def draft(**changes: Any) -> tiering_pb2.Programme:
    values: dict[str, Any] = {
        "programme_id": f"p-{uuid.uuid4().hex[:8]}",
        "effective_from": ts(NOW + timedelta(days=30)),
        "qualifying_metric": "paid_spend",
        "window_months": 12,
        "ladder_json": GOOD_LADDER,
        "rules_json": GOOD_RULES,
    }
    values.update(changes)
    return tiering_pb2.Programme(**values)


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# ---- (1) programme as versioned configuration -----------------------------------------


def _ladder(**tier2: object) -> str:
    raw = DEMO_PROGRAMME.ladder.to_json()
    raw[2].update(tier2)
    return json.dumps(raw)


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"ladder_json": _ladder(threshold=40_000, retention=20_000)},
         "programme.ladder[2].threshold", "above"),
        ({"window_months": 0}, "programme.window_months", "between 1 and 36"),
        ({"qualifying_metric": "likes"}, "programme.qualifying_metric", "not one of"),
        ({"rules_json": '{"period": {"unit": "month", "length": 0}}'},
         "programme.rules.period.length", "never ends"),
        ({"rules_json": '{"period": {"unit": "never", "length": 1}}'},
         "programme.rules.period.unit", "must end"),
        ({"rules_json": '{"grace_days": 3}'}, "programme.rules.period", "must end"),
        ({"ladder_json": "[{"}, "programme.ladder_json", "not JSON"),
        ({"effective_from": ts(NOW - timedelta(days=1))}, "programme.effective_from", "past"),
    ],
)  # fmt: skip
async def test_bad_programme_is_rejected_and_the_running_version_untouched(
    stub: tiering_pb2_grpc.TieringServiceStub, changes: dict[str, Any], field: str, words: str
) -> None:
    good = draft()
    await stub.PublishProgramme(
        tiering_pb2.PublishProgrammeRequest(
            programme=draft(programme_id=good.programme_id, effective_from=ts(datetime.now(UTC)))
        )
    )
    bad = draft(programme_id=good.programme_id, **changes)
    calls = [stub.PublishProgramme(tiering_pb2.PublishProgrammeRequest(programme=bad))]
    if "effective_from" not in changes:  # a simulation may be dated anywhere
        calls.append(stub.SimulateProgramme(tiering_pb2.SimulateProgrammeRequest(programme=bad)))
    for call in calls:
        err = await rpc_error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(err) == ("INVALID_PROGRAMME", field)
        assert words in (err.details() or "")
    running = await stub.GetProgramme(
        tiering_pb2.GetProgrammeRequest(
            programme_id=good.programme_id, at=ts(NOW + timedelta(days=400))
        )
    )
    assert running.version == 1


async def test_published_version_applies_from_its_date(
    stub: tiering_pb2_grpc.TieringServiceStub,
) -> None:
    pid = f"p-{uuid.uuid4().hex[:8]}"
    v1 = await stub.PublishProgramme(
        tiering_pb2.PublishProgrammeRequest(
            programme=draft(programme_id=pid, effective_from=ts(datetime.now(UTC)))
        )
    )
    start = NOW + timedelta(days=10)
    v2 = await stub.PublishProgramme(
        tiering_pb2.PublishProgrammeRequest(
            programme=draft(
                programme_id=pid,
                effective_from=ts(start),
                qualifying_metric="growth_value",
                note="growth from next month",
            )
        )
    )
    assert (v1.version, v2.version) == (1, 2)
    assert json.loads(v2.rules_json)["grace_days"] == 14
    now = await stub.GetProgramme(tiering_pb2.GetProgrammeRequest(programme_id=pid))
    later = await stub.GetProgramme(
        tiering_pb2.GetProgrammeRequest(programme_id=pid, at=ts(start + timedelta(seconds=1)))
    )
    assert (now.version, now.qualifying_metric) == (1, "paid_spend")
    assert (later.version, later.qualifying_metric, later.note) == (
        2,
        "growth_value",
        "growth from next month",
    )


async def test_simulation_says_what_would_change(
    stub: tiering_pb2_grpc.TieringServiceStub, redis: Redis, infra: Infra
) -> None:
    # A draft with SVIP at ¥100: members spending ¥100-¥499 would move up.
    cheap = json.loads(GOOD_LADDER)
    cheap[1]["threshold"], cheap[1]["retention"] = 10_000, 10_000
    request = tiering_pb2.SimulateProgrammeRequest(
        programme=draft(programme_id="default", ladder_json=json.dumps(cheap))
    )
    before = await stub.SimulateProgramme(request)
    members = [str(uuid.uuid4()) for _ in range(3)]
    for m in members:
        await order(redis, infra, m, 20_000, NOW - timedelta(days=1))
    for m in members:
        await eventually(lambda m=m: tier_is(stub, m, "regular", 20_000))
    after = await stub.SimulateProgramme(request)

    def moved(report: tiering_pb2.SimulationReport) -> int:
        return sum(
            x.members for x in report.movements if (x.from_tier, x.to_tier) == ("regular", "svip")
        )

    assert after.members - before.members == 3
    assert after.upgrades - before.upgrades == 3
    assert moved(after) - moved(before) == 3
    # Nothing was stored: the members are still regular.
    assert (await tier(stub, members[0])).tier.code == "regular"


# ---- (2) growth value ledger ---------------------------------------------------------


async def test_growth_from_orders_actions_with_caps_and_refunds(
    stub: tiering_pb2_grpc.TieringServiceStub, redis: Redis, infra: Infra
) -> None:
    member = str(uuid.uuid4())
    oid = await order(redis, infra, member, 2_680, NOW - timedelta(hours=1))
    reply = await eventually(lambda: tier_is(stub, member, "regular", 2_680))
    assert reply.growth_value == 26  # 1 per yuan

    def action(kind: str, ref: str) -> Any:
        return stub.RecordGrowthAction(
            tiering_pb2.RecordGrowthActionRequest(member_id=member, action=kind, reference_id=ref)
        )

    first = await action("check_in", "c1")
    assert (first.awarded, first.capped, first.replayed) == (5, False, False)
    again = await action("check_in", "c1")
    assert (again.awarded, again.replayed) == (0, True)
    capped = await action("check_in", "c2")  # one check-in a day
    assert (capped.awarded, capped.capped) == (0, True)
    for n in range(3):
        assert (await action("review", f"r{n}")).awarded == 10
    assert (await action("review", "r4")).capped  # three reviews a day
    assert (await tier(stub, member)).growth_value == 26 + 5 + 30

    await refund(redis, infra, member, oid, 1_000, f"rf-{uuid.uuid4()}")
    reply = await eventually(lambda: tier_is(stub, member, "regular", 1_680))
    assert reply.growth_value == 16 + 5 + 30

    err = await rpc_error(action("likes", "x"))
    assert error_info(err) == ("INVALID_ACTION", "action")
    err = await rpc_error(action("review", " "))
    assert error_info(err) == ("REFERENCE_ID_REQUIRED", "reference_id")


async def test_growth_action_older_than_a_day_is_refused_and_writes_nothing(
    stub: tiering_pb2_grpc.TieringServiceStub,
) -> None:
    member = str(uuid.uuid4())
    backfill = tiering_pb2.RecordGrowthActionRequest(
        member_id=member,
        action="check_in",
        reference_id="backfill",
        occurred_at=ts(datetime.now(UTC) - timedelta(days=3)),
    )
    err = await rpc_error(stub.RecordGrowthAction(backfill))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err) == ("OCCURRED_AT_TOO_OLD", "occurred_at")
    assert "24 hours" in (err.details() or "")
    # Nothing was recorded under that reference: a timely report of it is awarded.
    backfill.occurred_at.CopyFrom(ts(datetime.now(UTC) - timedelta(hours=1)))
    first = await stub.RecordGrowthAction(backfill)
    assert (first.awarded, first.replayed) == (5, False)


# ---- (3) evaluation through events ---------------------------------------------------


async def test_crossing_order_upgrades_and_its_refund_undoes_it(
    stub: tiering_pb2_grpc.TieringServiceStub,
    redis: Redis,
    infra: Infra,
    conn: asyncpg.Connection,
) -> None:
    member = str(uuid.uuid4())
    await order(redis, infra, member, 40_000, NOW - timedelta(days=2))
    await eventually(lambda: tier_is(stub, member, "regular", 40_000))
    crossing = await order(redis, infra, member, 12_000, NOW - timedelta(days=1))
    reply = await eventually(lambda: tier_is(stub, member, "svip"))
    assert reply.tier.benefits.points_multiplier_bp == 12_000
    refund_id = f"rf-{uuid.uuid4()}"
    await refund(redis, infra, member, crossing, 12_000, refund_id)
    await refund(redis, infra, member, crossing, 12_000, refund_id)  # redelivered refund
    await eventually(lambda: tier_is(stub, member, "regular", 40_000))

    history = await stub.GetTierHistory(tiering_pb2.GetTierHistoryRequest(member_id=member))
    assert [(e.from_tier, e.to_tier, e.reason) for e in history.entries] == [
        ("svip", "regular", "refund"),
        ("regular", "svip", "upgrade"),
    ]
    figures = json.loads(history.entries[1].figures_json)
    assert (figures["metric"], figures["threshold"]) == (52_000, 50_000)

    async def both_events() -> list[events_pb2.TierChanged] | None:
        found = await tier_events(redis, infra, member)
        return found if len(found) == 2 else None

    events = await eventually(both_events)
    assert [(e.from_tier, e.to_tier, e.reason) for e in events] == [
        ("regular", "svip", "upgrade"),
        ("svip", "regular", "downgrade"),
    ]
    assert events[0].programme_id == "default" and events[0].programme_version >= 1
    # The new tier's multiplier from the deciding version: SVIP 1.2x, back to 1.0x.
    assert [e.points_multiplier_bp for e in events] == [12_000, 10_000]
    spend = await stub.GetMemberSpend(tiering_pb2.GetMemberSpendRequest(member_id=member))
    assert (spend.total_paid_fen, spend.order_count) == (40_000, 1)


async def test_override_floor_with_expiry_and_reason(
    stub: tiering_pb2_grpc.TieringServiceStub, redis: Redis, infra: Infra
) -> None:
    member = str(uuid.uuid4())
    until = NOW + timedelta(days=30)
    reply = await stub.SetTierOverride(
        tiering_pb2.SetTierOverrideRequest(
            member_id=member, tier_code="vip", until=ts(until), reason="store opening guest"
        )
    )
    assert (reply.tier.code, reply.earned_tier, reply.override_reason) == (
        "vip",
        "regular",
        "store opening guest",
    )
    # PostgreSQL and protobuf both keep microseconds: the expiry comes back exactly.
    assert reply.override_until.ToDatetime(tzinfo=UTC) == until
    history = await stub.GetTierHistory(tiering_pb2.GetTierHistoryRequest(member_id=member))
    assert [(e.from_tier, e.to_tier, e.reason) for e in history.entries] == [
        ("regular", "vip", "override")
    ]
    for bad, field, code in (
        ({"tier_code": "gold"}, "tier_code", "UNKNOWN_TIER"),
        ({"reason": " "}, "reason", "REASON_REQUIRED"),
        ({"until": ts(NOW - timedelta(days=1))}, "until", "INVALID_UNTIL"),
    ):
        values: dict[str, Any] = {
            "member_id": member, "tier_code": "svip", "until": ts(until), "reason": "x",
        }  # fmt: skip
        values.update(bad)
        err = await rpc_error(stub.SetTierOverride(tiering_pb2.SetTierOverrideRequest(**values)))
        assert error_info(err) == (code, field)
    lifted = await stub.SetTierOverride(
        tiering_pb2.SetTierOverrideRequest(member_id=member, tier_code="", reason="mistake")
    )
    assert (lifted.tier.code, lifted.override_tier) == ("regular", "")


# ---- (4) projection --------------------------------------------------------------------


async def test_projection_for_the_member_centre(
    stub: tiering_pb2_grpc.TieringServiceStub, redis: Redis, infra: Infra
) -> None:
    member = str(uuid.uuid4())
    await order(redis, infra, member, 52_000, NOW - timedelta(hours=2))
    reply = await eventually(lambda: tier_is(stub, member, "svip"))
    assert (reply.keep_needed, reply.next_tier.code, reply.next_needed) == (0, "vip", 98_000)
    assert reply.period_last_day.endswith("-12-31")
    assert reply.projection == "SVIP is kept through 31 Dec; ¥980 more reaches VIP"
    assert reply.progress_bp == 2_000 * 10_000 // 100_000
    assert reply.tier.retention == 30_000


# ---- (7) merges --------------------------------------------------------------------------


async def test_merge_takes_the_higher_tier_and_unmerge_gives_history_back(
    stub: tiering_pb2_grpc.TieringServiceStub, redis: Redis, infra: Infra
) -> None:
    survivor, absorbed = str(uuid.uuid4()), str(uuid.uuid4())
    await order(redis, infra, survivor, 10_000, NOW - timedelta(days=3))
    await order(redis, infra, absorbed, 60_000, NOW - timedelta(days=3))
    await eventually(lambda: tier_is(stub, absorbed, "svip"))
    await eventually(lambda: tier_is(stub, survivor, "regular", 10_000))
    merge_id = str(uuid.uuid4())
    merged = events_pb2.MemberMerged(
        merge_id=merge_id,
        survivor_member_id=survivor,
        absorbed_member_id=absorbed,
        rule="verified_phone",
        merged_at=ts(datetime.now(UTC)),
    )
    await publish(redis, infra, "member", merged, survivor)
    await publish(redis, infra, "member", merged, survivor)  # a second event, same merge
    reply = await eventually(lambda: tier_is(stub, survivor, "svip", 70_000))
    assert reply.metric_value == 70_000
    spend = await stub.GetMemberSpend(tiering_pb2.GetMemberSpendRequest(member_id=survivor))
    assert (spend.total_paid_fen, spend.order_count) == (70_000, 2)
    history = await stub.GetTierHistory(tiering_pb2.GetTierHistoryRequest(member_id=survivor))
    reasons = [e.reason for e in history.entries]
    assert reasons.count("merge") == 1 and "upgrade" in reasons  # absorbed's history came along

    unmerged = events_pb2.MemberUnmerged(
        merge_id=merge_id,
        survivor_member_id=survivor,
        restored_member_id=absorbed,
        unmerged_at=ts(datetime.now(UTC)),
    )
    await publish(redis, infra, "member", unmerged, survivor)
    await publish(redis, infra, "member", unmerged, survivor)
    await eventually(lambda: tier_is(stub, survivor, "regular", 10_000))
    back = await eventually(lambda: tier_is(stub, absorbed, "svip", 60_000))
    assert back.earned_tier == "svip"
    restored = await stub.GetTierHistory(tiering_pb2.GetTierHistoryRequest(member_id=absorbed))
    assert ("regular", "svip", "upgrade") in [
        (e.from_tier, e.to_tier, e.reason) for e in restored.entries
    ]
    left = await stub.GetTierHistory(tiering_pb2.GetTierHistoryRequest(member_id=survivor))
    assert [e.reason for e in left.entries] == ["unmerge", "merge"]
