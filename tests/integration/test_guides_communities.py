"""Tiered communities: operators define WeCom group chats by store and audience;
the sync records joins and leaves (and publishes them); the invitation list
names eligible members not yet in their group, and misfits; a group's report
counts its members, joins, leaves and orders by its members."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from loyalty.common.v1 import common_pb2
from loyalty.events.v1 import events_pb2
from loyalty.guides.v1 import guides_pb2, guides_pb2_grpc
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from servicekit.db import asyncpg_dsn
from servicekit.events import ENVELOPE_FIELD, make_envelope, stream_name
from services.guides.wecom import FakeWeCom

from ..harness import Infra, ServiceClock, eventually
from .guides_support import add_customer, new_staff, rpc_reason, uid, wecom_crypto

# The shared `db` fixture seeds the demo stores the order needs; a small pool.
DB_POOL_MAX = 2


async def test_group_sync_invitations_misfits_and_report(
    db: object,
    guides_channel: grpc.aio.Channel,
    rewards_channel: grpc.aio.Channel,
    fake_wecom: FakeWeCom,
    guides_clock: ServiceClock,
    infra: Infra,
) -> None:
    stub = guides_pb2_grpc.GuidesServiceStub(guides_channel)
    crypto = wecom_crypto(fake_wecom.corp_id)
    store = uid("CS")
    guide = await new_staff(stub, store)
    exts = [uid("wm") for _ in range(3)]
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    redis = Redis.from_url(infra.redis_url)
    try:
        ids = []
        for ext in exts:
            fake_wecom.add_contact(ext, "顾客")
            await add_customer(stub, crypto, guides_clock, guide.staff_id, ext)
            ids.append(
                str(
                    await eventually(
                        lambda e=ext: conn.fetchval(
                            "SELECT member_id FROM guides.contacts WHERE external_userid = $1", e
                        )
                    )
                )
            )
        # Tiering says: the first and third are VIP, the second is not.
        for member_id, tier in zip(ids, ("VIP", "普通会员", "VIP"), strict=True):
            envelope = make_envelope(
                "tiering", events_pb2.TierChanged(member_id=member_id, to_tier=tier), member_id
            )
            await redis.xadd(
                stream_name(infra.namespace, "tiering"),
                {ENVELOPE_FIELD: envelope.SerializeToString()},
            )
        await eventually(
            lambda: conn.fetchval(
                "SELECT count(*) = 3 FROM guides.member_tiers WHERE member_id = ANY($1::uuid[])",
                ids,
            )
        )
        vip, general = uid("wrVIP"), uid("wrGEN")
        await stub.UpsertCommunity(
            guides_pb2.Community(
                chat_id=vip, name="VIP群", store_id=store, audience="vip", tiers=["VIP"], actor="op"
            ),
            timeout=5,
        )
        await stub.UpsertCommunity(
            guides_pb2.Community(
                chat_id=general, name="福利群", store_id=store, audience="general", actor="op"
            ),
            timeout=5,
        )
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.UpsertCommunity(
                guides_pb2.Community(chat_id=uid("x"), store_id=store, audience="gold", actor="op"),
                timeout=5,
            )
        assert rpc_reason(bad.value) == "INVALID_AUDIENCE"

        joined_at = int(guides_clock().timestamp()) - 3600
        fake_wecom.groups[vip] = {
            exts[0]: joined_at,
            exts[1]: joined_at,
            uid("wmstranger"): joined_at,
        }
        fake_wecom.groups[general] = {}
        synced = await stub.SyncCommunities(
            guides_pb2.SyncCommunitiesRequest(actor="op"), timeout=10
        )
        assert synced.joined >= 3

        gaps = await stub.CommunityGaps(guides_pb2.CommunityGapsRequest(store_id=store), timeout=5)
        assert {(i.member_id, i.chat_id, i.staff_id) for i in gaps.invite} == {
            (ids[2], vip, guide.staff_id),  # VIP, in no group yet
            (ids[1], general, guide.staff_id),  # fits only the general group
        }
        assert {(m.member_id, m.chat_id, m.tier) for m in gaps.misfits} == {
            (ids[1], vip, "普通会员")
        }

        # An order by a member of the VIP group counts for it.
        await rewards_pb2_grpc.RewardsServiceStub(rewards_channel).CompleteOrder(
            rewards_pb2.CompleteOrderRequest(
                store_id="SH001",
                pos_transaction_id=uid("T-"),
                member_id=ids[0],
                channel=common_pb2.CHANNEL_STORE,
                paid_amount_fen=3200,
                gross_amount_fen=3200,
            ),
            timeout=10,
        )
        # The misfit leaves the VIP group.
        del fake_wecom.groups[vip][exts[1]]
        again = await stub.SyncCommunities(
            guides_pb2.SyncCommunitiesRequest(actor="op"), timeout=10
        )
        assert again.left >= 1

        today = guides_clock().astimezone(ZoneInfo("Asia/Shanghai")).date().isoformat()

        async def reported() -> guides_pb2.CommunityReportResponse | None:
            r = await stub.CommunityReport(
                guides_pb2.CommunityReportRequest(chat_id=vip, from_day="2020-01-01", to_day=today),
                timeout=5,
            )
            return r if r.orders == 1 else None

        report = await eventually(reported, timeout=15)
        assert (report.members, report.joins, report.leaves, report.paid_amount_fen) == (
            2,
            3,
            1,
            3200,
        )
    finally:
        await conn.close()
        await redis.aclose()


async def test_joins_and_leaves_are_published(
    guides_channel: grpc.aio.Channel,
    fake_wecom: FakeWeCom,
    guides_clock: ServiceClock,
    infra: Infra,
) -> None:
    stub = guides_pb2_grpc.GuidesServiceStub(guides_channel)
    store = uid("CP")
    guide = await new_staff(stub, store)
    ext = uid("wm")
    fake_wecom.add_contact(ext, "顾客")
    await add_customer(stub, wecom_crypto(fake_wecom.corp_id), guides_clock, guide.staff_id, ext)
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    redis = Redis.from_url(infra.redis_url)
    try:
        member_id = str(
            await eventually(
                lambda: conn.fetchval(
                    "SELECT member_id FROM guides.contacts WHERE external_userid = $1", ext
                )
            )
        )
        chat = uid("wrG")
        await stub.UpsertCommunity(
            guides_pb2.Community(
                chat_id=chat, name="成长群", store_id=store, audience="growth", actor="op"
            ),
            timeout=5,
        )
        fake_wecom.groups[chat] = {ext: int(guides_clock().timestamp())}
        await stub.SyncCommunities(guides_pb2.SyncCommunitiesRequest(actor="op"), timeout=10)
        fake_wecom.groups[chat] = {}
        await stub.SyncCommunities(guides_pb2.SyncCommunitiesRequest(actor="op"), timeout=10)

        async def seen() -> list[str] | None:
            types = []
            for _, fields in await redis.xrange(stream_name(infra.namespace, "guides")):
                envelope = events_pb2.EventEnvelope()
                envelope.ParseFromString(fields[ENVELOPE_FIELD])
                if envelope.member_id == member_id and envelope.event_type.startswith(
                    "loyalty.events.v1.Community"
                ):
                    types.append(envelope.event_type.rsplit(".", 1)[1])
            return types if len(types) == 2 else None

        assert await eventually(seen, timeout=15) == ["CommunityJoined", "CommunityLeft"]
    finally:
        await conn.close()
        await redis.aclose()


async def test_groups_staff_own_are_found_in_wecom_and_their_joins_and_leaves_applied(
    guides_channel: grpc.aio.Channel,
    fake_wecom: FakeWeCom,
    guides_clock: ServiceClock,
    infra: Infra,
) -> None:
    # No operator defines this group: WeCom's group-chat list names it as the guide's.
    stub = guides_pb2_grpc.GuidesServiceStub(guides_channel)
    store = uid("CL")
    guide = await new_staff(stub, store)
    chat, a, b, c = uid("wrL"), uid("wm"), uid("wm"), uid("wm")
    t0 = int(guides_clock().timestamp())
    fake_wecom.group_owners[chat] = guide.staff_id
    fake_wecom.groups[chat] = {a: t0 - 60, b: t0 - 30}
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))

    async def members() -> dict[str, tuple[object, object]]:
        rows = await conn.fetch(
            "SELECT external_userid, joined_at, left_at FROM guides.community_members"
            " WHERE chat_id = $1",
            chat,
        )
        return {r["external_userid"]: (r["joined_at"], r["left_at"]) for r in rows}

    try:
        await stub.SyncCommunities(guides_pb2.SyncCommunitiesRequest(actor="op"), timeout=10)
        group = await conn.fetchrow(
            "SELECT store_id, audience FROM guides.communities WHERE chat_id = $1", chat
        )
        assert (group["store_id"], group["audience"]) == (store, "general")
        first = await members()
        assert set(first) == {a, b} and all(left is None for _, left in first.values())

        # In WeCom, b leaves and c joins.
        fake_wecom.groups[chat] = {a: t0 - 60, c: t0 + 5}
        await stub.SyncCommunities(guides_pb2.SyncCommunitiesRequest(actor="op"), timeout=10)
        second = await members()
        assert second[a] == first[a]  # unchanged
        assert second[b][0] == first[b][0] and second[b][1] is not None  # left
        assert second[c][1] is None  # joined
        # A sync with nothing new changes nothing (idempotent).
        await stub.SyncCommunities(guides_pb2.SyncCommunitiesRequest(actor="op"), timeout=10)
        assert await members() == second
        # An operator's classification is kept by later syncs.
        await stub.UpsertCommunity(
            guides_pb2.Community(
                chat_id=chat, name="VIP群", store_id=store, audience="vip", actor="op"
            ),
            timeout=5,
        )
        await stub.SyncCommunities(guides_pb2.SyncCommunitiesRequest(actor="op"), timeout=10)
        assert (
            await conn.fetchval("SELECT audience FROM guides.communities WHERE chat_id = $1", chat)
            == "vip"
        )
    finally:
        await conn.close()
