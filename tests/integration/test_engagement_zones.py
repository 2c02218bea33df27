"""A member's time zone reaches engagement: the member's profile zone (or
registration store) set at member is announced as MemberZoneSet over the bus
and becomes engagement's member_facts.tz, which quiet hours and caps read."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import grpc
import pytest

from loyalty.member.v1 import member_pb2 as pb
from loyalty.member.v1 import member_pb2_grpc
from servicekit.db import asyncpg_dsn
from servicekit.errors import error_info
from servicekit.server import ServiceApp
from services.engagement.ports import RewardsStoreZones
from tests.harness import Infra, eventually

from .test_member_oneid import CARD, ident, identify, tag


async def _facts(app: ServiceApp, member: str) -> Any:
    assert app.db is not None
    return await app.db.pool.fetchrow(
        "SELECT tz, profile_tz, store_id FROM engagement.member_facts WHERE member_id = $1",
        uuid.UUID(member),
    )


async def test_the_profile_zone_set_at_member_reaches_engagement(
    member_app: ServiceApp, engagement_app: ServiceApp, member_channel: grpc.aio.Channel
) -> None:
    stub = member_pb2_grpc.MemberServiceStub(member_channel)
    member = (await identify(stub, ident(CARD, f"tz-{tag()}"))).member.member_id

    async def update(**values: Any) -> pb.Profile:
        return await stub.UpdateProfile(
            pb.UpdateProfileRequest(
                member_id=member, source="mini-program", verified=True, **values
            )
        )

    profile = await update(time_zone="Europe/London", registration_store_id="SH001")
    assert profile.time_zone == "Europe/London"

    async def zone_is(tz: str, profile_tz: str) -> Any:
        row = await _facts(engagement_app, member)
        return (
            row if row is not None and (row["tz"], row["profile_tz"]) == (tz, profile_tz) else None
        )

    row = await eventually(lambda: zone_is("Europe/London", "Europe/London"), timeout=15)
    assert row["store_id"] == "SH001"
    # Cleared in the profile: the registration store's zone applies (the
    # session's engagement has no store zones: the default).
    await update(time_zone="")
    await eventually(lambda: zone_is("Asia/Shanghai", ""), timeout=15)
    # Member refuses what is not a zone; nothing changes.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await update(time_zone="Mars/Olympus")
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(info.value) == ("INVALID_TIME_ZONE", "time_zone")
    assert (await stub.GetProfile(pb.GetProfileRequest(member_id=member))).time_zone == ""


async def test_a_stores_zone_is_asked_of_rewards(
    infra: Infra, rewards_app: ServiceApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RewardsStoreZones reads the store's zone through rewards' real GetStore:
    a store rewards keeps in Europe/London answers Europe/London (not the
    default, not ""), an unknown store has no zone, and answers are kept (one
    call per store)."""
    store = f"TZ{tag()[:8]}"
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        await conn.execute(
            "INSERT INTO rewards.stores"
            " (store_id, name, city, address, latitude, longitude, time_zone)"
            " VALUES ($1, 'London Soho', 'London', '1 Soho Sq', 51.515, -0.132, 'Europe/London')",
            store,
        )
    finally:
        await conn.close()
    zones = RewardsStoreZones(f"127.0.0.1:{rewards_app.port}", 5.0)
    calls: list[str] = []
    real = zones._stub.GetStore

    async def counted(request: Any, **kw: Any) -> Any:
        calls.append(request.store_id)
        return await real(request, **kw)

    monkeypatch.setattr(zones._stub, "GetStore", counted)
    try:
        assert await zones.zone_of(store) == "Europe/London"
        assert await zones.zone_of("NO-SUCH-STORE") == ""
        assert await zones.zone_of(store) == "Europe/London"
        assert calls == [store, "NO-SUCH-STORE"]  # the second answer came from the cache
    finally:
        await zones.close()
