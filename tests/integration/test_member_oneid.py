"""OneID through the member service's gRPC API, on real PostgreSQL: merging,
conflicts for review, junk and quarantine, idempotency, unmerge, bad input."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from typing import TypeVar

import asyncpg
import grpc
import pytest
from google.protobuf.message import Message
from redis.asyncio import Redis

from loyalty.events.v1 import events_pb2
from loyalty.member.v1 import member_pb2 as pb
from loyalty.member.v1 import member_pb2_grpc
from servicekit.db import asyncpg_dsn
from servicekit.errors import error_info
from servicekit.events import unpack
from servicekit.server import ServiceApp

from ..harness import Infra, eventually

Stub = member_pb2_grpc.MemberServiceStub
M = TypeVar("M", bound=Message)
PHONE = pb.IDENTIFIER_TYPE_PHONE
UNIONID = pb.IDENTIFIER_TYPE_WECHAT_UNIONID
OPENID = pb.IDENTIFIER_TYPE_WECHAT_OPENID
CARD = pb.IDENTIFIER_TYPE_POS_CARD


def tag() -> str:
    return uuid.uuid4().hex[:10]


def mobile() -> str:
    return f"139{random.randrange(10**8):08d}"


def ident(kind: int, value: str, verified: bool = False, namespace: str = "") -> pb.Identifier:
    if kind == OPENID and not namespace:
        namespace = "wx-app"
    return pb.Identifier(type=kind, value=value, verified=verified, namespace=namespace)


async def identify(
    stub: Stub, *idents: pb.Identifier, key: str | None = None, source: str = "test"
) -> pb.IdentifyMemberResponse:
    return await stub.IdentifyMember(
        pb.IdentifyMemberRequest(
            identifiers=list(idents), source=source, request_key=key or str(uuid.uuid4())
        ),
        timeout=10,
    )


async def failure(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


@pytest.fixture(scope="module")
async def stub(member_channel: grpc.aio.Channel) -> Stub:
    return Stub(member_channel)


@pytest.fixture
async def db(infra: Infra) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    yield conn
    await conn.close()


async def test_openid_then_unionid_then_phone_is_one_member(stub: Stub) -> None:
    t = tag()
    login = await identify(stub, ident(OPENID, f"o-{t}"), ident(UNIONID, f"u-{t}", True))
    assert login.created
    again = await identify(stub, ident(OPENID, f"o-{t}"))
    assert again.member.member_id == login.member.member_id and not again.created
    phone = mobile()
    bound = await identify(stub, ident(OPENID, f"o-{t}"), ident(PHONE, phone, True))
    assert bound.member.member_id == login.member.member_id
    assert bound.member.phone_masked == f"{phone[:3]}****{phone[-4:]}"
    # The POS types the same number: the same member.
    pos = await identify(stub, ident(PHONE, phone), source="pos:SH001")
    assert pos.member.member_id == login.member.member_id


async def test_a_verified_phone_merges_two_members_into_the_oldest(
    stub: Stub, db: asyncpg.Connection
) -> None:
    t = tag()
    phone = mobile()
    older = await identify(stub, ident(OPENID, f"a-{t}", namespace="app-a"))
    newer = await identify(stub, ident(PHONE, phone, True))
    assert older.member.member_id != newer.member.member_id
    # Phone authorisation in app A: openid + verified phone observed together.
    merged = await identify(
        stub, ident(OPENID, f"a-{t}", namespace="app-a"), ident(PHONE, phone, True)
    )
    assert merged.member.member_id == older.member.member_id
    assert list(merged.merged_member_ids) == [newer.member.member_id]
    # The absorbed id answers with its survivor; lookups by either id agree.
    got = await stub.GetMember(pb.GetMemberRequest(member_id=newer.member.member_id))
    assert got.member_id == older.member.member_id
    record = await db.fetchrow(
        "SELECT rule, evidence, status FROM member.merges WHERE absorbed_id = $1",
        uuid.UUID(newer.member.member_id),
    )
    assert record["rule"] == "identify:phone" and record["status"] == "active"
    assert f"phone:{phone[:3]}****{phone[-4:]} (verified)" in record["evidence"]
    assert (
        await db.fetchval(
            "SELECT count(*) FROM member.merges m WHERE m.absorbed_id = $1",
            uuid.UUID(newer.member.member_id),
        )
        == 1
    )


async def test_unverified_phone_and_card_never_merge(stub: Stub) -> None:
    t = tag()
    phone = mobile()
    by_phone = await identify(stub, ident(PHONE, phone))
    by_card = await identify(stub, ident(CARD, f"card-{t}"))
    both = await identify(stub, ident(PHONE, phone), ident(CARD, f"card-{t}"))
    assert not both.merged_member_ids
    # Priority decides which member answers: phone (90) over card (40).
    assert both.member.member_id == by_phone.member.member_id
    assert [(i.index, i.reason) for i in both.ignored] == [(1, "OWNED_ELSEWHERE")]
    assert by_card.member.member_id != by_phone.member.member_id


async def test_two_verified_phones_are_a_review_not_a_merge(
    stub: Stub, db: asyncpg.Connection
) -> None:
    t = tag()
    first = await identify(stub, ident(UNIONID, f"u-{t}", True), ident(PHONE, mobile(), True))
    second = await identify(stub, ident(OPENID, f"o-{t}"), ident(PHONE, mobile(), True))
    linked = await identify(stub, ident(UNIONID, f"u-{t}", True), ident(OPENID, f"o-{t}"))
    assert not linked.merged_member_ids
    assert linked.review_id
    assert linked.member.member_id == first.member.member_id  # unionid outranks openid
    # The same observation again does not open a second review.
    repeat = await identify(stub, ident(UNIONID, f"u-{t}", True), ident(OPENID, f"o-{t}"))
    assert repeat.review_id == linked.review_id

    pending = await stub.ListMergeReviews(pb.ListMergeReviewsRequest(page_size=500))
    review = next(r for r in pending.reviews if r.review_id == linked.review_id)
    assert review.reason == "LIMIT_EXCEEDED:phone_verified"
    assert sorted(review.member_ids) == sorted([first.member.member_id, second.member.member_id])

    approved = await stub.ApproveMergeReview(
        pb.DecideMergeReviewRequest(review_id=review.review_id, operator="op-1", note="same person")
    )
    assert approved.status == "approved" and len(approved.merge_ids) == 1
    got = await stub.GetMember(pb.GetMemberRequest(member_id=second.member.member_id))
    assert got.member_id == first.member.member_id
    err = await failure(
        stub.ApproveMergeReview(
            pb.DecideMergeReviewRequest(review_id=review.review_id, operator="x")
        )
    )
    assert error_info(err) == ("REVIEW_DECIDED", "review_id")


async def test_rejected_review_puts_the_pair_on_do_not_merge(stub: Stub) -> None:
    t = tag()
    a = await identify(stub, ident(UNIONID, f"ua-{t}", True))
    b = await identify(stub, ident(UNIONID, f"ub-{t}", True))
    # A phone proven in both accounts: two unionids would meet on one member.
    phone = mobile()
    await identify(stub, ident(UNIONID, f"ua-{t}", True), ident(PHONE, phone, True))
    linked = await identify(stub, ident(UNIONID, f"ub-{t}", True), ident(PHONE, phone, True))
    assert linked.review_id
    rejected = await stub.RejectMergeReview(
        pb.DecideMergeReviewRequest(review_id=linked.review_id, operator="op-2", note="siblings")
    )
    assert rejected.status == "rejected"
    again = await identify(stub, ident(UNIONID, f"ub-{t}", True), ident(PHONE, phone, True))
    assert not again.merged_member_ids and not again.review_id
    assert {a.member.member_id, b.member.member_id} == {
        (await stub.GetMember(pb.GetMemberRequest(member_id=m))).member_id
        for m in (a.member.member_id, b.member.member_id)
    }


async def test_junk_values_never_link_anyone(stub: Stub, db: asyncpg.Connection) -> None:
    t = tag()
    a = await identify(stub, ident(OPENID, f"o1-{t}"), ident(PHONE, "13800000000", True))
    b = await identify(stub, ident(OPENID, f"o2-{t}"), ident(PHONE, "138 0000 0000", True))
    assert a.member.member_id != b.member.member_id
    assert [(i.index, i.reason) for i in a.ignored] == [(1, "JUNK")]
    assert a.member.phone_masked == ""
    err = await failure(identify(stub, ident(PHONE, "13800000000", True)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err) == ("JUNK_IDENTIFIER", "identifiers[0].value")
    err = await failure(identify(stub, ident(CARD, "000000")))
    assert error_info(err) == ("JUNK_IDENTIFIER", "identifiers[0].value")


async def test_an_identifier_linking_many_members_is_quarantined(stub: Stub) -> None:
    t = tag()
    staff_card = ident(CARD, f"staff-{t}")
    members = []
    for n in range(5):
        own = ident(OPENID, f"o{n}-{t}")
        members.append((await identify(stub, own)).member.member_id)
        reply = await identify(stub, own, staff_card)
        assert reply.member.member_id == members[-1]
    # Seen with a 4th member (threshold 3): quarantined, and reported.
    assert [(i.index, i.reason) for i in reply.ignored] == [(1, "QUARANTINED")]
    listed = await stub.ListQuarantinedIdentifiers(pb.ListQuarantinedIdentifiersRequest())
    hit = next(q for q in listed.identifiers if q.value_masked == f"st{'*' * (len(t) + 2)}{t[-2:]}")
    assert hit.type == CARD and hit.linked_members == 4
    # Alone it resolves nobody now: refused, not trusted.
    err = await failure(identify(stub, staff_card))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err) == ("IDENTIFIER_QUARANTINED", "identifiers[0]")


async def test_the_quarantine_list_pages_each_identifier_once(stub: Stub) -> None:
    t = tag()
    for card in ("a", "b", "c"):
        shared = ident(CARD, f"shared-{card}-{t}")
        for n in range(4):  # four members seen with it: quarantined (threshold 3)
            own = ident(OPENID, f"o{card}{n}-{t}")
            await identify(stub, own)
            await identify(stub, own, shared)
    seen: list[tuple[int, str, str]] = []
    token = ""
    while True:
        page = await stub.ListQuarantinedIdentifiers(
            pb.ListQuarantinedIdentifiersRequest(page_size=1, page_token=token)
        )
        assert len(page.identifiers) <= 1
        seen += [(q.type, q.namespace, q.value_masked) for q in page.identifiers]
        token = page.next_page_token
        if not token:
            break
    whole = await stub.ListQuarantinedIdentifiers(
        pb.ListQuarantinedIdentifiersRequest(page_size=500)
    )
    # One at a time gives exactly the whole list, in its order (newest first).
    assert seen == [(q.type, q.namespace, q.value_masked) for q in whole.identifiers]
    assert sum(q.value_masked.endswith(t[-2:]) for q in whole.identifiers) >= 3
    stamps = [q.quarantined_at.ToDatetime() for q in whole.identifiers]
    assert stamps == sorted(stamps, reverse=True)
    for bad, code, field in (
        (
            pb.ListQuarantinedIdentifiersRequest(page_token="not-ours"),
            "INVALID_PAGE_TOKEN",
            "page_token",
        ),
        (pb.ListQuarantinedIdentifiersRequest(page_size=501), "INVALID_PAGE_SIZE", "page_size"),
    ):
        err = await failure(stub.ListQuarantinedIdentifiers(bad))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(err) == (code, field)


async def test_identify_is_idempotent_under_its_request_key(stub: Stub) -> None:
    phone = mobile()
    key = str(uuid.uuid4())
    first = await identify(stub, ident(PHONE, phone), key=key)
    retry = await identify(stub, ident(PHONE, phone), key=key)
    assert first.created and retry.created and retry.replayed
    assert retry.member.member_id == first.member.member_id
    err = await failure(identify(stub, ident(PHONE, mobile()), key=key))
    assert err.code() == grpc.StatusCode.ABORTED
    assert error_info(err) == ("IDEMPOTENCY_KEY_REUSED", "request_key")


async def test_concurrent_retries_of_one_key_get_one_answer(stub: Stub) -> None:
    phone = mobile()
    key = str(uuid.uuid4())
    replies = await asyncio.gather(
        *(identify(stub, ident(PHONE, phone), key=key) for _ in range(12))
    )
    assert len({r.member.member_id for r in replies}) == 1
    assert all(r.created for r in replies)  # the one answer, replayed
    assert sum(not r.replayed for r in replies) == 1
    # A known member now: the lock-free lookup path, racing on one key.
    key = str(uuid.uuid4())
    replies = await asyncio.gather(
        *(identify(stub, ident(PHONE, phone), key=key) for _ in range(12))
    )
    assert {r.member.member_id for r in replies} == {replies[0].member.member_id}
    assert sum(not r.replayed for r in replies) == 1 and not any(r.created for r in replies)


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [
        (
            pb.IdentifyMemberRequest(
                identifiers=[pb.Identifier(type=99, value="x")], request_key="k"
            ),
            "UNKNOWN_IDENTIFIER_TYPE",
            "identifiers[0].type",
        ),
        (
            pb.IdentifyMemberRequest(
                identifiers=[pb.Identifier(type=CARD, value="9" * 129)], request_key="k"
            ),
            "IDENTIFIER_TOO_LONG",
            "identifiers[0].value",
        ),
        (
            pb.IdentifyMemberRequest(
                identifiers=[pb.Identifier(type=PHONE, value="139-123")], request_key="k"
            ),
            "INVALID_PHONE",
            "identifiers[0].value",
        ),
        (
            pb.IdentifyMemberRequest(identifiers=[pb.Identifier(type=CARD, value="c-1")]),
            "REQUEST_KEY_REQUIRED",
            "request_key",
        ),
        (
            pb.IdentifyMemberRequest(
                identifiers=[pb.Identifier(type=CARD, value="c-1")], request_key="k" * 129
            ),
            "VALUE_TOO_LONG",
            "request_key",
        ),
    ],
)
async def test_bad_input_is_invalid_argument_and_writes_nothing(
    stub: Stub, db: asyncpg.Connection, request_: pb.IdentifyMemberRequest, code: str, field: str
) -> None:
    count = (
        "SELECT (SELECT count(*) FROM member.members) + (SELECT count(*) FROM member.identities)"
    )
    before = await db.fetchval(count)
    err = await failure(stub.IdentifyMember(request_, timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err) == (code, field)
    # Other tests may write concurrently only in their own calls; this file runs serially.
    assert await db.fetchval(count) == before


async def member_stream(infra: Infra, kind: type[M]) -> list[M]:
    """The payloads of one event type on the member stream, oldest first."""
    redis = Redis.from_url(infra.redis_url)
    try:
        entries = await redis.xrange(f"{infra.namespace}:events:member")
    finally:
        await redis.aclose()
    out: list[M] = []
    for _, fields in entries:
        envelope = events_pb2.EventEnvelope.FromString(fields[b"envelope"])
        if envelope.event_type == kind.DESCRIPTOR.full_name:
            out.append(unpack(envelope, kind))  # type: ignore[arg-type]
    return out


async def member_events(infra: Infra) -> list[object]:
    """Merge and unmerge payloads on the member stream, timestamps cleared for comparison."""
    out: list[object] = []
    for kind, stamp in (
        (events_pb2.MemberMerged, "merged_at"),
        (events_pb2.MemberUnmerged, "unmerged_at"),
    ):
        for payload in await member_stream(infra, kind):
            payload.ClearField(stamp)  # type: ignore[arg-type]
            out.append(payload)
    return out


async def test_unmerge_restores_identities_and_blocks_the_redo(
    infra: Infra, stub: Stub, db: asyncpg.Connection
) -> None:
    t = tag()
    phone = mobile()
    old = await identify(stub, ident(OPENID, f"o-{t}"), ident(CARD, f"c-{t}"))
    new = await identify(stub, ident(PHONE, phone, True), ident(CARD, f"c2-{t}"))
    before_new = await stub.ListIdentities(pb.ListIdentitiesRequest(member_id=new.member.member_id))
    merged = await identify(stub, ident(OPENID, f"o-{t}"), ident(PHONE, phone, True))
    assert list(merged.merged_member_ids) == [new.member.member_id]
    merge_id = str(
        await db.fetchval(
            "SELECT id FROM member.merges WHERE absorbed_id = $1", uuid.UUID(new.member.member_id)
        )
    )
    undone = await stub.UnmergeMember(
        pb.UnmergeMemberRequest(merge_id=merge_id, operator="op-3", reason="recycled number")
    )
    assert undone.restored.member_id == new.member.member_id
    assert undone.restored.phone_masked == f"{phone[:3]}****{phone[-4:]}"
    assert undone.survivor.phone_masked == ""
    after_new = await stub.ListIdentities(pb.ListIdentitiesRequest(member_id=new.member.member_id))
    assert {(i.type, i.value_masked) for i in after_new.identities} == {
        (i.type, i.value_masked) for i in before_new.identities
    }
    # The same observation does not redo the merge (do-not-merge list).
    again = await identify(stub, ident(OPENID, f"o-{t}"), ident(PHONE, phone, True))
    assert not again.merged_member_ids and not again.review_id
    # The verified phone outranks the openid: its owner answers.
    assert again.member.member_id == new.member.member_id
    assert (await identify(stub, ident(OPENID, f"o-{t}"))).member.member_id == old.member.member_id
    err = await failure(
        stub.UnmergeMember(pb.UnmergeMemberRequest(merge_id=merge_id, operator="op", reason="r"))
    )
    assert error_info(err) == ("MERGE_NOT_ACTIVE", "merge_id")
    # Both left through the outbox for the other services to move things.
    merged_event = events_pb2.MemberMerged(
        merge_id=merge_id,
        survivor_member_id=old.member.member_id,
        absorbed_member_id=new.member.member_id,
        rule="identify:phone",
    )
    unmerged_event = events_pb2.MemberUnmerged(
        merge_id=merge_id,
        survivor_member_id=old.member.member_id,
        restored_member_id=new.member.member_id,
    )

    async def published() -> bool:
        seen = await member_events(infra)
        return merged_event in seen and unmerged_event in seen

    await eventually(published)


async def test_chained_merges_unmerge_newest_first(stub: Stub) -> None:
    t = tag()
    a = await identify(stub, ident(CARD, f"a-{t}"))
    b = await identify(stub, ident(CARD, f"b-{t}"))
    c = await identify(stub, ident(CARD, f"c-{t}"))
    ab = await stub.MergeMembers(
        pb.MergeMembersRequest(
            member_ids=[a.member.member_id, b.member.member_id], operator="op", reason="same"
        )
    )
    ca = await stub.MergeMembers(
        pb.MergeMembersRequest(
            member_ids=[c.member.member_id, b.member.member_id], operator="op", reason="same"
        )
    )
    # a is the oldest: it survives both merges and holds all three cards.
    assert ca.member.member_id == a.member.member_id
    ids = await stub.ListIdentities(pb.ListIdentitiesRequest(member_id=b.member.member_id))
    assert sum(i.type == CARD for i in ids.identities) == 3
    assert {i.member_id for i in ids.identities} == {a.member.member_id}
    for merge in (*ca.merges, *ab.merges):
        await stub.UnmergeMember(
            pb.UnmergeMemberRequest(merge_id=merge.merge_id, operator="op", reason="undo")
        )
    for m in (a, b, c):
        got = await stub.GetMember(pb.GetMemberRequest(member_id=m.member.member_id))
        assert got.member_id == m.member.member_id


async def test_unmerge_of_an_absorbed_survivor_is_refused_until_newer_is_undone(
    stub: Stub,
) -> None:
    t = tag()
    oldest = await identify(stub, ident(CARD, f"x-{t}"))
    middle = await identify(stub, ident(CARD, f"y-{t}"))
    newest = await identify(stub, ident(CARD, f"z-{t}"))
    first = await stub.MergeMembers(
        pb.MergeMembersRequest(
            member_ids=[middle.member.member_id, newest.member.member_id], operator="op", reason="r"
        )
    )
    second = await stub.MergeMembers(
        pb.MergeMembersRequest(
            member_ids=[oldest.member.member_id, middle.member.member_id], operator="op", reason="r"
        )
    )
    # newest was flattened onto oldest: one hop.
    got = await stub.GetMember(pb.GetMemberRequest(member_id=newest.member.member_id))
    assert got.member_id == oldest.member.member_id
    err = await failure(
        stub.UnmergeMember(
            pb.UnmergeMemberRequest(merge_id=first.merges[0].merge_id, operator="op", reason="r")
        )
    )
    assert error_info(err) == ("UNMERGE_NEWER_FIRST", "merge_id")
    await stub.UnmergeMember(
        pb.UnmergeMemberRequest(merge_id=second.merges[0].merge_id, operator="op", reason="r")
    )
    # The flattened member points at its own survivor again.
    got = await stub.GetMember(pb.GetMemberRequest(member_id=newest.member.member_id))
    assert got.member_id == middle.member.member_id
    await stub.UnmergeMember(
        pb.UnmergeMemberRequest(merge_id=first.merges[0].merge_id, operator="op", reason="r")
    )
    got = await stub.GetMember(pb.GetMemberRequest(member_id=newest.member.member_id))
    assert got.member_id == newest.member.member_id


async def test_64_concurrent_identifies_end_with_one_member_per_group(
    member_app: ServiceApp, stub: Stub, db: asyncpg.Connection
) -> None:
    """Four people, each seen through openid, unionid, verified phone and
    card in overlapping pairs, 64 calls at once in shuffled order."""
    t = tag()
    groups = []
    for g in range(4):
        groups.append(
            [
                ident(OPENID, f"o{g}-{t}"),
                ident(UNIONID, f"u{g}-{t}", True),
                ident(PHONE, mobile(), True),
                ident(CARD, f"c{g}-{t}"),
            ]
        )
    calls = []
    for g, ids in enumerate(groups):
        pairs = [(0, 1), (1, 2), (2, 3), (0, 2), (1, 3), (0, 3), (3, 0), (2, 1)]
        for i, j in pairs * 2:
            calls.append((g, [ids[i], ids[j]]))
    random.shuffle(calls)
    assert len(calls) == 64
    replies = await asyncio.wait_for(
        asyncio.gather(*(identify(stub, *ids) for _, ids in calls)), timeout=60
    )
    for g, ids in enumerate(groups):
        finals = {
            (await identify(stub, ident_)).member.member_id for ident_ in ids if ident_.verified
        }
        assert len(finals) == 1, f"group {g} split into {finals}"
    # Every identifier of a group sits on that group's one live member.
    roots = []
    for g, ids in enumerate(groups):
        root = (await identify(stub, ids[1])).member.member_id
        roots.append(root)
        listed = await stub.ListIdentities(pb.ListIdentitiesRequest(member_id=root))
        types = sorted(
            i.type for i in listed.identities if i.type != pb.IDENTIFIER_TYPE_MEMBER_NUMBER
        )
        assert types == sorted([OPENID, UNIONID, PHONE, CARD]), f"group {g}: {types}"
    assert len(set(roots)) == 4
    live = await db.fetchval(
        "SELECT count(*) FROM member.members WHERE id = ANY($1::uuid[]) AND merged_into IS NULL",
        [uuid.UUID(r.member.member_id) for r in replies],
    )
    assert live == 4
