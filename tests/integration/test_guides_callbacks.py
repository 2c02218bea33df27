"""Staff, directory sync, WeCom callbacks (valid, tampered, replayed, too old),
OneID identify, exclusive binding with history, resigned-staff transfer and
tags pushed to WeCom: the guides service against the real member service and
the WeCom fake."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import grpc
import pytest

from loyalty.guides.v1 import guides_pb2, guides_pb2_grpc
from loyalty.member.v1 import member_pb2, member_pb2_grpc
from servicekit.db import asyncpg_dsn
from servicekit.server import ServiceApp
from services.guides import retries
from services.guides.server import GuidesApp
from services.guides.wecom import FakeWeCom

from ..harness import Infra, ServiceClock, eventually
from .guides_support import (
    add_customer,
    contact_event,
    new_staff,
    rpc_reason,
    signed_callback,
    uid,
    wecom_crypto,
)


@pytest.fixture(scope="module")
def stub(guides_channel: grpc.aio.Channel) -> guides_pb2_grpc.GuidesServiceStub:
    return guides_pb2_grpc.GuidesServiceStub(guides_channel)


@pytest.fixture(scope="module")
def members(member_channel: grpc.aio.Channel) -> member_pb2_grpc.MemberServiceStub:
    return member_pb2_grpc.MemberServiceStub(member_channel)


@pytest.fixture(scope="module")
async def conn(infra: Infra) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    yield c
    await c.close()


@pytest.fixture
def crypto(fake_wecom: FakeWeCom):  # type: ignore[no-untyped-def]
    return wecom_crypto(fake_wecom.corp_id)


async def bound_to(stub: guides_pb2_grpc.GuidesServiceStub, member_id: str) -> guides_pb2.Binding:
    return await stub.GetBinding(guides_pb2.MemberRef(member_id=member_id), timeout=5)


async def member_of_contact(conn: asyncpg.Connection, ext: str) -> str | None:
    value = await conn.fetchval(
        "SELECT member_id FROM guides.contacts WHERE external_userid = $1", ext
    )
    return str(value) if value else None


async def test_staff_admin_validation_and_codes(stub: guides_pb2_grpc.GuidesServiceStub) -> None:
    g = await new_staff(stub, "SH001", code=uid("C"))
    assert g.status == "active" and g.role == guides_pb2.STAFF_ROLE_GUIDE
    listed = await stub.ListStaff(guides_pb2.ListStaffRequest(store_id="SH001"), timeout=5)
    assert g.staff_id in {s.staff_id for s in listed.staff}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UpsertStaff(
            guides_pb2.Staff(staff_id=uid("g"), name="x", store_id="SH001", actor="op"), timeout=5
        )
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and rpc_reason(err.value) == "INVALID_ROLE"
    )
    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await new_staff(stub, "SH001", code=g.staff_code)
    assert rpc_reason(taken.value) == "STAFF_CODE_TAKEN"


async def test_directory_sync_creates_updates_and_resigns(
    stub: guides_pb2_grpc.GuidesServiceStub,
    guides_app: GuidesApp,
    fake_wecom: FakeWeCom,
    conn: asyncpg.Connection,
    guides_clock: ServiceClock,
    crypto,  # type: ignore[no-untyped-def]
) -> None:
    # A directory that comes back empty resigns nobody.
    saved, fake_wecom.users = fake_wecom.users, {}
    try:
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await stub.SyncDirectory(guides_pb2.SyncDirectoryRequest(actor="sync"), timeout=10)
        assert rpc_reason(empty.value) == "DIRECTORY_EMPTY"
    finally:
        fake_wecom.users = saved
    store = uid("ST")
    manager, guide = uid("m"), uid("g")
    fake_wecom.add_user(manager, "店长", store, "store_manager")
    fake_wecom.add_user(guide, "小王", store, "guide")
    first = await stub.SyncDirectory(guides_pb2.SyncDirectoryRequest(actor="sync"), timeout=10)
    assert first.created >= 2
    staff = await stub.GetStaff(guides_pb2.StaffRef(staff_id=manager), timeout=5)
    assert staff.role == guides_pb2.STAFF_ROLE_STORE_MANAGER and staff.store_id == store
    # A customer of the guide, then the guide leaves WeCom: the store manager takes over.
    ext = uid("wm")
    fake_wecom.add_contact(ext, "顾客")
    await add_customer(stub, crypto, guides_clock, guide, ext)
    member_id = await eventually(lambda: member_of_contact(conn, ext))
    await eventually(lambda: _has_guide(stub, member_id, guide))
    fake_wecom.users[guide]["status"] = 5
    again = await stub.SyncDirectory(guides_pb2.SyncDirectoryRequest(actor="sync"), timeout=10)
    assert again.resigned == 1
    gone = await stub.GetStaff(guides_pb2.StaffRef(staff_id=guide), timeout=5)
    assert gone.status == "resigned"
    # WeCom's errcode 0 only starts its 24-hour takeover: the guide keeps the
    # member until transfer_result says the manager took over.
    assert (await bound_to(stub, member_id)).staff_id == guide
    fake_wecom.transfer_status[ext] = 1
    assert guides_app.db is not None
    settled = await retries.poll_transfers(guides_app.handlers, guides_app.db)
    assert settled["done"] >= 1
    binding = await bound_to(stub, member_id)
    assert binding.staff_id == manager
    assert binding.history[0].reason == "resigned_transfer"
    assert fake_wecom.transfers[-1]["handover_userid"] == guide


async def _has_guide(
    stub: guides_pb2_grpc.GuidesServiceStub, member_id: str, staff_id: str
) -> bool:
    return (await bound_to(stub, member_id)).staff_id == staff_id


async def test_add_customer_callback_identifies_binds_and_audits(
    stub: guides_pb2_grpc.GuidesServiceStub,
    members: member_pb2_grpc.MemberServiceStub,
    fake_wecom: FakeWeCom,
    conn: asyncpg.Connection,
    guides_clock: ServiceClock,
    crypto,  # type: ignore[no-untyped-def]
) -> None:
    # The customer is already a member through the mini-program (unionid):
    # WeCom's add attaches to that member instead of enrolling another.
    unionid = uid("o6_")
    known = await members.IdentifyMember(
        member_pb2.IdentifyMemberRequest(
            identifiers=[
                member_pb2.Identifier(
                    type=member_pb2.IDENTIFIER_TYPE_WECHAT_UNIONID, value=unionid, verified=True
                )
            ],
            source="mini-program",
            request_key=uid("k"),
        ),
        timeout=5,
    )
    g1 = await new_staff(stub, "SH001")
    g2 = await new_staff(stub, "SH002")
    ext = uid("wm")
    fake_wecom.add_contact(ext, "顾客", unionid)
    now = guides_clock()
    request = signed_callback(
        crypto, contact_event("add_external_contact", g1.staff_id, ext, now), now
    )
    reply = await stub.ReceiveCallback(request, timeout=5)
    assert (reply.reply, reply.outcome) == ("success", "accepted")
    member_id = known.member.member_id
    await eventually(lambda: _has_guide(stub, member_id, g1.staff_id))
    assert await member_of_contact(conn, ext) == member_id
    identities = await members.ListIdentities(
        member_pb2.ListIdentitiesRequest(member_id=member_id), timeout=5
    )
    assert member_pb2.IDENTIFIER_TYPE_WECOM_EXTERNAL_USERID in {
        i.type for i in identities.identities
    }

    # Replayed as is: answered, nothing done again.
    replay = await stub.ReceiveCallback(request, timeout=5)
    assert replay.outcome == "duplicate"
    # WeCom's own retry (same event, new nonce and signature): also a duplicate.
    retry = signed_callback(
        crypto, contact_event("add_external_contact", g1.staff_id, ext, now), now
    )
    assert (await stub.ReceiveCallback(retry, timeout=5)).outcome == "duplicate"

    # Another guide adds the same customer: the first guide keeps the member.
    await add_customer(stub, crypto, guides_clock, g2.staff_id, ext)
    await eventually(
        lambda: conn.fetchval(
            "SELECT count(*) FROM guides.audit WHERE subject = $1 AND action = 'binding_kept'",
            f"member:{member_id}",
        )
    )
    binding = await bound_to(stub, member_id)
    assert binding.staff_id == g1.staff_id and binding.store_id == "SH001"
    assert [(h.from_staff_id, h.to_staff_id, h.reason) for h in binding.history] == [
        ("", g1.staff_id, "wecom_add")
    ]
    actions = await conn.fetch(
        "SELECT action FROM guides.audit WHERE subject = $1 ORDER BY id", f"member:{member_id}"
    )
    assert [a["action"] for a in actions][:2] == ["guide_bound", "contact_added"]

    # An operator reassigns: history records who and why.
    moved = await stub.ReassignGuide(
        guides_pb2.ReassignGuideRequest(
            member_id=member_id, staff_id=g2.staff_id, actor="op-1", reason="complaint"
        ),
        timeout=5,
    )
    assert moved.staff_id == g2.staff_id
    assert (moved.history[0].actor, moved.history[0].reason) == ("op-1", "operator:complaint")


async def test_tampered_and_old_callbacks_are_refused_and_write_nothing(
    stub: guides_pb2_grpc.GuidesServiceStub,
    conn: asyncpg.Connection,
    guides_clock: ServiceClock,
    crypto,  # type: ignore[no-untyped-def]
) -> None:
    g = await new_staff(stub, "SH001")
    ext = uid("wm")
    now = guides_clock()
    before = await conn.fetchval("SELECT count(*) FROM guides.callback_inbox")
    good = signed_callback(crypto, contact_event("add_external_contact", g.staff_id, ext, now), now)
    tampered = guides_pb2.CallbackRequest()
    tampered.CopyFrom(good)
    tampered.body = good.body.replace(b"<AgentID>1", b"<AgentID>2").replace(
        b"]]></Encrypt>", b"A]]></Encrypt>", 1
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReceiveCallback(tampered, timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert rpc_reason(err.value) == "BAD_SIGNATURE"
    forged = signed_callback(
        wecom_crypto("wwsomeoneelse"),
        contact_event("add_external_contact", g.staff_id, ext, now),
        now,
    )
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await stub.ReceiveCallback(forged, timeout=5)
    assert rpc_reason(other.value) == "WRONG_RECEIVER"
    old = now - timedelta(minutes=10)
    stale = signed_callback(
        crypto, contact_event("add_external_contact", g.staff_id, ext, old), old
    )
    with pytest.raises(grpc.aio.AioRpcError) as too_old:
        await stub.ReceiveCallback(stale, timeout=5)
    assert too_old.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_reason(too_old.value) == "CALLBACK_TOO_OLD"
    assert await conn.fetchval("SELECT count(*) FROM guides.callback_inbox") == before


async def test_url_verification_echoes_the_decrypted_echostr(
    stub: guides_pb2_grpc.GuidesServiceStub,
    guides_clock: ServiceClock,
    crypto,  # type: ignore[no-untyped-def]
) -> None:
    echo = crypto.encrypt(b"1234567890")
    ts = str(int(guides_clock().timestamp()))
    reply = await stub.VerifyCallbackUrl(
        guides_pb2.CallbackRequest(
            msg_signature=crypto.signature(ts, "n", echo), timestamp=ts, nonce="n", echostr=echo
        ),
        timeout=5,
    )
    assert reply.reply == "1234567890"


async def test_resigned_transfer_moves_bindings_and_reports_refusals(
    stub: guides_pb2_grpc.GuidesServiceStub,
    guides_app: GuidesApp,
    fake_wecom: FakeWeCom,
    conn: asyncpg.Connection,
    guides_clock: ServiceClock,
    crypto,  # type: ignore[no-untyped-def]
) -> None:
    leaver = await new_staff(stub, "SH003")
    takeover = await new_staff(stub, "SH003")
    exts = [uid("wm"), uid("wm")]
    for ext in exts:
        fake_wecom.add_contact(ext, "顾客")
        await add_customer(stub, crypto, guides_clock, leaver.staff_id, ext)
    ids = [await eventually(lambda e=e: member_of_contact(conn, e)) for e in exts]
    for member_id in ids:
        await eventually(lambda m=member_id: _has_guide(stub, m, leaver.staff_id))
    fake_wecom.transfer_errors[exts[1]] = 40129  # WeCom refuses this one
    reply = await stub.ResignStaff(
        guides_pb2.ResignStaffRequest(
            staff_id=leaver.staff_id, takeover_staff_id=takeover.staff_id, actor="op-2"
        ),
        timeout=10,
    )
    assert (reply.transferred, list(reply.failed)) == (1, [exts[1]])
    assert (await bound_to(stub, ids[0])).staff_id == leaver.staff_id  # pending in WeCom
    fake_wecom.transfer_status[exts[0]] = 1
    assert guides_app.db is not None
    await retries.poll_transfers(guides_app.handlers, guides_app.db)
    moved, stayed = await bound_to(stub, ids[0]), await bound_to(stub, ids[1])
    assert moved.staff_id == takeover.staff_id
    assert (moved.history[0].reason, moved.history[0].actor) == ("resigned_transfer", "op-2")
    assert stayed.staff_id == leaver.staff_id
    detail = await conn.fetchval(
        "SELECT detail FROM guides.audit WHERE subject = $1 AND action = 'staff_resigned'",
        f"staff:{leaver.staff_id}",
    )
    assert '"transferred": 1' in detail
    # A resigned guide cannot be given new members.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReassignGuide(
            guides_pb2.ReassignGuideRequest(member_id=ids[0], staff_id=leaver.staff_id, actor="op"),
            timeout=5,
        )
    assert rpc_reason(err.value) == "UNKNOWN_STAFF"


async def test_unknown_staff_callback_is_retried_then_processed(
    stub: guides_pb2_grpc.GuidesServiceStub,
    fake_wecom: FakeWeCom,
    conn: asyncpg.Connection,
    guides_clock: ServiceClock,
    crypto,  # type: ignore[no-untyped-def]
) -> None:
    staff_id, ext = uid("g"), uid("wm")
    fake_wecom.add_contact(ext, "顾客")
    await add_customer(stub, crypto, guides_clock, staff_id, ext)

    async def failed_once() -> bool:
        row = await conn.fetchrow(
            "SELECT attempts, last_error FROM guides.callback_inbox WHERE message LIKE $1",
            f"%{ext}%",
        )
        return row is not None and row["attempts"] >= 1 and "not known" in row["last_error"]

    await eventually(failed_once)
    await stub.UpsertStaff(
        guides_pb2.Staff(
            staff_id=staff_id, name="新导购", store_id="SH002",
            role=guides_pb2.STAFF_ROLE_GUIDE, actor="op",
        ),
        timeout=5,
    )  # fmt: skip
    member_id = await eventually(lambda: member_of_contact(conn, ext), timeout=15)
    await eventually(lambda: _has_guide(stub, member_id, staff_id))


async def test_manual_tags_are_audited_and_pushed_to_wecom(
    stub: guides_pb2_grpc.GuidesServiceStub,
    fake_wecom: FakeWeCom,
    conn: asyncpg.Connection,
    guides_clock: ServiceClock,
    crypto,  # type: ignore[no-untyped-def]
    guides_app: ServiceApp,
) -> None:
    g = await new_staff(stub, "SH001")
    ext = uid("wm")
    fake_wecom.add_contact(ext, "顾客")
    await add_customer(stub, crypto, guides_clock, g.staff_id, ext)
    member_id = await eventually(lambda: member_of_contact(conn, ext))
    tags = await stub.SetManualTag(
        guides_pb2.SetManualTagRequest(
            member_id=member_id, tag="果茶控", present=True, actor=g.staff_id
        ),
        timeout=5,
    )
    assert [(t.tag, t.source, t.set_by) for t in tags.tags] == [("果茶控", "manual", g.staff_id)]
    await eventually(lambda: "果茶控" in fake_wecom.marked.get((g.staff_id, ext), set()))
    await stub.SetManualTag(
        guides_pb2.SetManualTagRequest(
            member_id=member_id, tag="果茶控", present=False, actor="op"
        ),
        timeout=5,
    )
    await eventually(
        lambda: (
            "果茶控" not in fake_wecom.marked.get((g.staff_id, ext), {"x"})
            and (g.staff_id, ext) in fake_wecom.marked
        )
    )
    assert (
        await stub.ListMemberTags(guides_pb2.MemberRef(member_id=member_id), timeout=5)
    ).tags == []
    actions = await conn.fetch(
        "SELECT action, actor FROM guides.audit WHERE subject = $1 AND action LIKE 'tag_%' ORDER BY id",
        f"member:{member_id}",
    )
    assert [(a["action"], a["actor"]) for a in actions] == [
        ("tag_added", g.staff_id),
        ("tag_removed", "op"),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SetManualTag(
            guides_pb2.SetManualTagRequest(
                member_id=str(uuid.uuid4()), tag=" ", present=True, actor="op"
            ),
            timeout=5,
        )
    assert rpc_reason(err.value) == "MISSING_TAG"


async def test_a_oneid_merge_moves_contacts_tags_and_keeps_the_first_guide(
    stub: guides_pb2_grpc.GuidesServiceStub,
    members: member_pb2_grpc.MemberServiceStub,
    fake_wecom: FakeWeCom,
    conn: asyncpg.Connection,
    guides_clock: ServiceClock,
    crypto,  # type: ignore[no-untyped-def]
) -> None:
    first, second = await new_staff(stub, "SH001"), await new_staff(stub, "SH002")
    exts = [uid("wm"), uid("wm")]
    ids = []
    for ext, guide in zip(exts, (first, second), strict=True):
        fake_wecom.add_contact(ext, "顾客")
        await add_customer(stub, crypto, guides_clock, guide.staff_id, ext)
        ids.append(await eventually(lambda e=ext: member_of_contact(conn, e)))
    for member_id, guide in zip(ids, (first, second), strict=True):
        await eventually(lambda m=member_id, g=guide: _has_guide(stub, m, g.staff_id))
    await stub.SetManualTag(
        guides_pb2.SetManualTagRequest(member_id=ids[1], tag="夜猫子", present=True, actor="op"),
        timeout=5,
    )
    # An operator merges the two; whichever survives, the guide who bound first keeps them.
    merged = await members.MergeMembers(
        member_pb2.MergeMembersRequest(
            member_ids=[ids[1], ids[0]], operator="op", reason="same person"
        ),
        timeout=10,
    )
    survivor = merged.member.member_id

    async def moved() -> bool:
        return (
            await member_of_contact(conn, exts[1]) == survivor
            and await member_of_contact(conn, exts[0]) == survivor
        )

    await eventually(moved, timeout=15)
    binding = await bound_to(stub, survivor)
    assert binding.staff_id == first.staff_id
    tags = await stub.ListMemberTags(guides_pb2.MemberRef(member_id=survivor), timeout=5)
    assert "夜猫子" in {t.tag for t in tags.tags}
