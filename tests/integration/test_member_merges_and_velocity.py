"""An operator finds and undoes an automatic merge (issue 13 item 27): identify
names the merge it made, a member's merges are listed with rule, masked
evidence, automatic or not and reversed or not, and unmerge takes that id.

The velocity watch (issue 13 item 31): one identifier presented at too many
stores within the window is flagged once per burst (row, event, metric) and
still served; below the threshold nothing is flagged. The member clock is
pinned: the window never depends on how fast the test runs."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from loyalty.events.v1 import events_pb2
from loyalty.member.v1 import member_pb2 as pb
from servicekit.errors import error_info
from servicekit.server import ServiceApp
from services.member.metrics import MemberMetrics

from ..harness import Infra, ServiceClock, eventually
from .test_member_oneid import (
    CARD,
    OPENID,
    PHONE,
    Stub,
    failure,
    ident,
    identify,
    member_stream,
    mobile,
    tag,
)

# Any fixed moment: the watch reads only the pinned clock.
T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def stub(member_channel: grpc.aio.Channel) -> Stub:
    return Stub(member_channel)


def masked(phone: str) -> str:
    return f"{phone[:3]}****{phone[-4:]}"


async def test_identify_names_its_merge_and_the_operator_lists_and_undoes_it(stub: Stub) -> None:
    t = tag()
    phone = mobile()
    older = await identify(stub, ident(OPENID, f"a-{t}", namespace="app-a"))
    newer = await identify(stub, ident(PHONE, phone, True))
    key = str(uuid.uuid4())
    merged = await identify(
        stub, ident(OPENID, f"a-{t}", namespace="app-a"), ident(PHONE, phone, True), key=key
    )
    assert [(m.absorbed_member_id, m.survivor_member_id, m.rule) for m in merged.merges] == [
        (newer.member.member_id, older.member.member_id, "identify:phone")
    ]
    merge_id = merged.merges[0].merge_id
    assert merged.merges[0].automatic and merged.merges[0].status == "active"
    # A retry of the same call names the same merge.
    replay = await identify(
        stub, ident(OPENID, f"a-{t}", namespace="app-a"), ident(PHONE, phone, True), key=key
    )
    assert replay.replayed and [m.merge_id for m in replay.merges] == [merge_id]

    listed = await stub.ListMemberMerges(
        pb.ListMemberMergesRequest(member_id=older.member.member_id)
    )
    assert [m.merge_id for m in listed.merges] == [merge_id]
    record = listed.merges[0]
    assert (record.rule, record.automatic, record.actor, record.status) == (
        "identify:phone",
        True,
        "test",
        "active",
    )
    # Evidence is masked: the phone appears only as its mask.
    assert f"phone:{masked(phone)} (verified)" in record.evidence
    assert not any(phone in e for e in record.evidence)
    assert not record.HasField("unmerged_at")
    # The absorbed id finds the same merge.
    by_absorbed = await stub.ListMemberMerges(
        pb.ListMemberMergesRequest(member_id=newer.member.member_id)
    )
    assert [m.merge_id for m in by_absorbed.merges] == [merge_id]

    await stub.UnmergeMember(
        pb.UnmergeMemberRequest(merge_id=merge_id, operator="ops-li", reason="recycled number")
    )
    for member in (older, newer):
        after = await stub.ListMemberMerges(
            pb.ListMemberMergesRequest(member_id=member.member.member_id)
        )
        assert [(m.merge_id, m.status, m.unmerged_by, m.unmerge_reason) for m in after.merges] == [
            (merge_id, "unmerged", "ops-li", "recycled number")
        ]
        assert after.merges[0].HasField("unmerged_at")


async def test_an_operator_merge_is_listed_as_not_automatic(stub: Stub) -> None:
    t = tag()
    a = await identify(stub, ident(CARD, f"ca-{t}"))
    b = await identify(stub, ident(CARD, f"cb-{t}"))
    done = await stub.MergeMembers(
        pb.MergeMembersRequest(
            member_ids=[a.member.member_id, b.member.member_id], operator="ops-wu", reason="same"
        )
    )
    listed = await stub.ListMemberMerges(pb.ListMemberMergesRequest(member_id=a.member.member_id))
    assert [(m.merge_id, m.rule, m.automatic, m.actor) for m in listed.merges] == [
        (done.merges[0].merge_id, "operator", False, "ops-wu")
    ]
    # A plain identify merges nothing and names no merge.
    plain = await identify(stub, ident(CARD, f"ca-{t}"))
    assert list(plain.merges) == []


async def test_listing_merges_refuses_bad_and_unknown_members(stub: Stub) -> None:
    bad = await failure(stub.ListMemberMerges(pb.ListMemberMergesRequest(member_id="nope")))
    assert error_info(bad) == ("INVALID_MEMBER_ID", "member_id")
    unknown = await failure(
        stub.ListMemberMerges(pb.ListMemberMergesRequest(member_id=str(uuid.uuid4())))
    )
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(unknown) == ("UNKNOWN_MEMBER", "member_id")


# ---- velocity ---------------------------------------------------------------------


def flagged_phones(app: ServiceApp) -> float:
    metrics: MemberMetrics = app.member_metrics  # type: ignore[attr-defined]
    value = metrics.registry.get_sample_value(
        "member_identifiers_velocity_flagged_total", {"identifier_type": "phone"}
    )
    return value or 0.0


async def at_store(stub: Stub, phone: str, store: str) -> pb.Member:
    """What the gateway's POS identify asks for a known phone (gateway/clients.py)."""
    return await stub.ResolveMember(
        pb.ResolveMemberRequest(identifier=ident(PHONE, phone), store_id=store), timeout=10
    )


async def flags_of(stub: Stub, phone: str) -> list[pb.VelocityFlag]:
    flags: list[pb.VelocityFlag] = []
    token = ""
    while True:
        page = await stub.ListVelocityFlags(
            pb.ListVelocityFlagsRequest(page_size=50, page_token=token)
        )
        flags += [f for f in page.flags if f.value_masked == masked(phone)]
        token = page.next_page_token
        if not token:
            return flags


async def enrol_at(stub: Stub, phone: str, store: str) -> pb.IdentifyMemberResponse:
    return await stub.IdentifyMember(
        pb.IdentifyMemberRequest(
            identifiers=[ident(PHONE, phone)],
            source=f"pos:{store}",
            request_key=str(uuid.uuid4()),
            store_id=store,
        ),
        timeout=10,
    )


async def test_one_phone_at_20_stores_within_a_minute_is_flagged_once(
    stub: Stub, member_app: ServiceApp, member_clock: ServiceClock, infra: Infra
) -> None:
    t = tag()
    phone = mobile()
    stores = [f"V{t}-{n:02d}" for n in range(20)]
    before = flagged_phones(member_app)
    with member_clock.pinned(T0):
        member_id = (await enrol_at(stub, phone, stores[0])).member.member_id
    for n, store in enumerate(stores[1:], start=1):
        with member_clock.pinned(T0 + timedelta(seconds=3 * n)):
            # Flag, never block: every till is served the member.
            assert (await at_store(stub, phone, store)).member_id == member_id

    flags = await flags_of(stub, phone)
    assert len(flags) == 1
    flag = flags[0]
    # Raised by the 5th distinct store (default VELOCITY_STORES), 12 s after the first.
    assert (flag.member_id, flag.store_count, list(flag.store_ids), flag.window_seconds) == (
        member_id,
        5,
        sorted(stores[:5]),
        600,
    )
    assert flag.type == PHONE
    assert flag.flagged_at.ToDatetime(UTC) == T0 + timedelta(seconds=12)
    assert flagged_phones(member_app) == before + 1

    async def announced_once() -> bool:
        events = await member_stream(infra, events_pb2.IdentifierVelocityFlagged)
        mine = [e for e in events if e.value_masked == masked(phone)]
        return [(e.flag_id, e.identifier_type, e.store_count) for e in mine] == [
            (flag.flag_id, "phone", 5)
        ]

    await eventually(announced_once)

    # A new burst after a quiet window is flagged again.
    later = T0 + timedelta(hours=2)
    for n, store in enumerate(stores[:5]):
        with member_clock.pinned(later + timedelta(seconds=n)):
            await at_store(stub, phone, store)
    assert len(await flags_of(stub, phone)) == 2


async def test_below_the_threshold_nothing_is_flagged(
    stub: Stub, member_app: ServiceApp, member_clock: ServiceClock
) -> None:
    before = flagged_phones(member_app)
    t = tag()
    # Four stores within a minute, each many times: one short of the threshold.
    phone = mobile()
    with member_clock.pinned(T0):
        await enrol_at(stub, phone, f"B{t}-0")
    for n in range(40):
        with member_clock.pinned(T0 + timedelta(seconds=n)):
            await at_store(stub, phone, f"B{t}-{n % 4}")
    # Five stores, but never five within ten minutes (one every 200 s).
    spread = mobile()
    with member_clock.pinned(T0):
        await enrol_at(stub, spread, f"S{t}-0")
    for n in range(1, 8):
        with member_clock.pinned(T0 + timedelta(seconds=200 * n)):
            await at_store(stub, spread, f"S{t}-{n}")
    # Without a store (the mini-program, an RPC from another service): not counted.
    quiet = mobile()
    await enrol_at(stub, quiet, "")
    for _ in range(10):
        await stub.ResolveMember(pb.ResolveMemberRequest(identifier=ident(PHONE, quiet)))
    assert await flags_of(stub, phone) == []
    assert await flags_of(stub, spread) == []
    assert await flags_of(stub, quiet) == []
    assert flagged_phones(member_app) == before


async def test_twenty_tills_at_once_flag_one_burst(stub: Stub, member_clock: ServiceClock) -> None:
    t = tag()
    phone = mobile()
    with member_clock.pinned(T0):
        member_id = (await enrol_at(stub, phone, f"C{t}-start")).member.member_id
        served = await asyncio.gather(*(at_store(stub, phone, f"C{t}-{n}") for n in range(20)))
    assert {m.member_id for m in served} == {member_id}
    flags = await flags_of(stub, phone)
    assert len(flags) == 1 and flags[0].store_count == 5


async def test_an_overlong_store_is_refused_before_anything_is_read(stub: Stub) -> None:
    phone = mobile()
    for call in (
        stub.ResolveMember(
            pb.ResolveMemberRequest(identifier=ident(PHONE, phone), store_id="S" * 65)
        ),
        stub.IdentifyMember(
            pb.IdentifyMemberRequest(
                identifiers=[ident(PHONE, phone)],
                source="pos",
                request_key=str(uuid.uuid4()),
                store_id="S" * 65,
            )
        ),
    ):
        err = await failure(call)
        assert error_info(err) == ("VALUE_TOO_LONG", "store_id")
    # Nothing was enrolled by the refused identify.
    unknown = await failure(
        stub.ResolveMember(pb.ResolveMemberRequest(identifier=ident(PHONE, phone)))
    )
    assert error_info(unknown)[0] == "UNKNOWN_IDENTIFIER"


async def test_the_flag_list_pages_and_refuses_a_foreign_token(stub: Stub) -> None:
    first = await stub.ListVelocityFlags(pb.ListVelocityFlagsRequest(page_size=1))
    assert len(first.flags) <= 1
    bad = await failure(stub.ListVelocityFlags(pb.ListVelocityFlagsRequest(page_token="zz")))
    assert error_info(bad) == ("INVALID_PAGE_TOKEN", "page_token")
    too_big = await failure(stub.ListVelocityFlags(pb.ListVelocityFlagsRequest(page_size=501)))
    assert error_info(too_big) == ("INVALID_PAGE_SIZE", "page_size")


class _CountingRedis:
    """The member app's Redis client, counting every command and script call
    (what one ResolveMember costs in round trips)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: list[str] = []

    def register_script(self, source: str) -> Any:
        script = self.real.register_script(source)

        async def run(keys: list[str], args: list[Any] | None = None) -> Any:
            self.calls.append("script")
            return await script(keys=keys, args=args)

        return run

    def __getattr__(self, name: str) -> Any:
        command = getattr(self.real, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return await command(*args, **kwargs)

        return counted


async def test_a_known_phone_at_a_till_is_answered_and_counted_in_one_round_trip(
    stub: Stub, member_app: ServiceApp, infra: Infra
) -> None:
    """The POS identify of a known member: member reads its cached answer and
    counts the store in one Redis script (both keys in one shard), and the
    count still flags a burst, once, for the member it answered."""
    from services.member.cache import ResolveCache
    from services.member.handlers import MemberHandlers
    from services.member.pii import PiiVault
    from services.member.policy import load_policy
    from services.member.servicer import MemberServicer
    from services.member.settings import member_settings
    from services.member.velocity import VelocityWatch

    assert member_app.db is not None and member_app.redis is not None
    t = tag()
    phone = mobile()
    member_id = (await enrol_at(stub, phone, "")).member.member_id
    redis = _CountingRedis(member_app.redis)
    s = member_settings(infra.service_settings())
    metrics = MemberMetrics()
    servicer = MemberServicer(
        member_app.db,
        MemberHandlers(PiiVault(s.pii_key), load_policy(), s.member_code_secret.encode()),
        cache=ResolveCache(redis, infra.namespace),  # type: ignore[arg-type]
        metrics=metrics,
        velocity=VelocityWatch(redis, infra.namespace, 3, 600, lambda: T0),  # type: ignore[arg-type]
    )

    def at(store: str) -> Any:
        request = pb.ResolveMemberRequest(identifier=ident(PHONE, phone), store_id=store)
        return servicer.ResolveMember(request, None)  # type: ignore[arg-type]

    # A miss reads Postgres, fills, then counts (the member known only then).
    assert (await at(f"R{t}-0")).member_id == member_id
    assert len(redis.calls) == 3  # the read, the fill, the count: as before
    for n in range(1, 5):
        redis.calls.clear()
        assert (await at(f"R{t}-{n}")).member_id == member_id
        assert redis.calls == ["script"], n  # was an MGET, then the count's script
    flags = await flags_of(stub, phone)
    assert [(f.member_id, f.store_count, list(f.store_ids)) for f in flags] == [
        (member_id, 3, sorted(f"R{t}-{n}" for n in range(3)))
    ]
    flagged = metrics.velocity_flagged.labels(identifier_type="phone")._value.get()
    assert flagged == 1
