"""Profile and consent survivorship, PII (masking, audited unmasked reads, key
rotation), erasure with suppression, and the dynamic member code."""

from __future__ import annotations

import base64
import os
import uuid

import asyncpg
import grpc

from loyalty.events.v1 import events_pb2
from loyalty.member.v1 import member_pb2 as pb
from loyalty.member.v1 import member_pb2_grpc
from servicekit.errors import error_info
from services.member.server import build
from services.member.settings import MemberSettings

from ..harness import Infra, eventually
from . import test_member_oneid as oneid
from .test_member_consent_events import set_consent
from .test_member_oneid import (
    CARD,
    OPENID,
    PHONE,
    UNIONID,
    failure,
    ident,
    identify,
    member_stream,
    mobile,
    tag,
)

Stub = member_pb2_grpc.MemberServiceStub
MARKETING = pb.CONSENT_PURPOSE_MARKETING
PERSONALISATION = pb.CONSENT_PURPOSE_PERSONALISATION


# The same fixtures as test_member_oneid; pytest finds them as module attributes.
stub, db = oneid.stub, oneid.db


def consent(profile: pb.Profile, purpose: int, channel: int) -> pb.Consent | None:
    return next((c for c in profile.consents if (c.purpose, c.channel) == (purpose, channel)), None)


async def test_profile_is_the_latest_verified_value_across_a_merge(stub: Stub) -> None:
    t = tag()
    phone = mobile()
    a = await identify(stub, ident(OPENID, f"o-{t}"))
    b = await identify(stub, ident(PHONE, phone, True))
    await stub.UpdateProfile(
        pb.UpdateProfileRequest(
            member_id=a.member.member_id,
            nickname="阿茶",
            birthday="1995-04-01",
            source="mp",
            verified=True,
        )
    )
    await stub.UpdateProfile(
        pb.UpdateProfileRequest(
            member_id=b.member.member_id,
            nickname="typed at till",
            gender=pb.GENDER_FEMALE,
            source="pos:SH001",
            verified=False,
        )
    )
    await identify(stub, ident(OPENID, f"o-{t}"), ident(PHONE, phone, True))
    merged = await stub.GetProfile(pb.GetProfileRequest(member_id=b.member.member_id))
    assert merged.member_id == a.member.member_id
    # Verified beats newer-but-unverified; fields only one side had survive.
    assert merged.nickname == "阿茶"
    assert merged.birthday == "1995-04-01"
    assert merged.gender == pb.GENDER_FEMALE


async def test_consent_history_and_no_personalisation(stub: Stub) -> None:
    m = (await identify(stub, ident(CARD, f"c-{tag()}"))).member.member_id
    fresh = await stub.GetProfile(pb.GetProfileRequest(member_id=m))
    assert not fresh.personalisation_allowed and not fresh.consents  # opt-in: nothing yet
    await set_consent(stub, m, pb.CONSENT_CHANNEL_ALL, True, PERSONALISATION, "mp:privacy")
    profile = await set_consent(
        stub, m, pb.CONSENT_CHANNEL_ALL, False, PERSONALISATION, "mp:privacy"
    )
    assert not profile.personalisation_allowed
    history = await stub.ListConsentHistory(pb.ListConsentHistoryRequest(member_id=m))
    assert [r.granted for r in history.records] == [True, False]
    assert all(r.actor == "member" and r.source == "mp:privacy" for r in history.records)
    err = await failure(set_consent(stub, m, pb.CONSENT_CHANNEL_SMS, True, PERSONALISATION, "s"))
    assert error_info(err) == ("INVALID_CONSENT_CHANNEL", "channel")


async def test_consent_after_merge_is_the_most_restrictive_until_chosen_again(stub: Stub) -> None:
    t = tag()
    phone = mobile()
    a = (await identify(stub, ident(OPENID, f"o-{t}"))).member.member_id
    b = (await identify(stub, ident(PHONE, phone, True))).member.member_id
    for member, granted in ((a, True), (b, False)):
        await set_consent(stub, member, pb.CONSENT_CHANNEL_SMS, granted, MARKETING, "mp")
    await identify(stub, ident(OPENID, f"o-{t}"), ident(PHONE, phone, True))
    merged = await stub.GetProfile(pb.GetProfileRequest(member_id=a))
    sms = consent(merged, MARKETING, pb.CONSENT_CHANNEL_SMS)
    assert sms is not None and not sms.granted
    chosen = await set_consent(stub, b, pb.CONSENT_CHANNEL_SMS, True, MARKETING, "mp")
    sms = consent(chosen, MARKETING, pb.CONSENT_CHANNEL_SMS)
    assert sms is not None and sms.granted


async def test_phone_is_masked_unless_asked_and_every_unmasked_read_is_audited(
    stub: Stub, db: asyncpg.Connection
) -> None:
    phone = mobile()
    m = (await identify(stub, ident(PHONE, phone, True))).member.member_id
    masked = await stub.GetMember(pb.GetMemberRequest(member_id=m))
    assert masked.phone == "" and masked.phone_masked == f"{phone[:3]}****{phone[-4:]}"
    stored = await db.fetchval(
        "SELECT value_cipher FROM member.identities WHERE member_id = $1 AND id_type = 'phone'",
        uuid.UUID(m),
    )
    assert phone.encode() not in bytes(stored)
    err = await failure(stub.GetMember(pb.GetMemberRequest(member_id=m, include_pii=True)))
    assert error_info(err) == ("ACCESSOR_REQUIRED", "accessor")
    full = await stub.GetMember(
        pb.GetMemberRequest(member_id=m, include_pii=True, accessor="op-7", purpose="ticket 42")
    )
    assert full.phone == f"+86{phone}"
    listed = await stub.ListIdentities(
        pb.ListIdentitiesRequest(member_id=m, include_pii=True, accessor="op-7", purpose="t 42")
    )
    assert f"+86{phone}" in {i.value for i in listed.identities}
    audit = await db.fetch(
        "SELECT accessor, purpose, fields FROM member.pii_access_log WHERE member_id = $1"
        " ORDER BY id",
        uuid.UUID(m),
    )
    assert [(r["accessor"], r["fields"]) for r in audit] == [
        ("op-7", ["phone"]),
        ("op-7", ["identities"]),
    ]


async def test_key_rotation_reencrypts_and_old_ciphertexts_still_read(
    infra: Infra, stub: Stub
) -> None:
    phone = mobile()
    m = (await identify(stub, ident(PHONE, phone, True))).member.member_id
    new_key = base64.b64encode(os.urandom(32)).decode()
    # A small pool: the shared test database has a connection budget.
    base = infra.service_settings(db_pool_max=2).model_dump()
    rotated = build(
        MemberSettings(**base, pii_encryption_keys=f"k1:{new_key}", pii_active_key_id="k1")
    )
    port = await rotated.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            other = Stub(channel)
            pii = pb.GetMemberRequest(member_id=m, include_pii=True, accessor="ops", purpose="rot")
            assert (await other.GetMember(pii)).phone == f"+86{phone}"
            total = 0
            while True:
                reply = await other.ReencryptPii(pb.ReencryptPiiRequest(batch_size=5000))
                total += reply.reencrypted
                if reply.remaining == 0:
                    break
            assert total >= 1
            assert (await other.GetMember(pii)).phone == f"+86{phone}"
    finally:
        await rotated.stop()


async def test_erasure_tombstones_the_cluster_and_suppresses_relinking(
    infra: Infra, stub: Stub, db: asyncpg.Connection
) -> None:
    t = tag()
    phone = mobile()
    a = (await identify(stub, ident(OPENID, f"o-{t}"))).member.member_id
    b = (await identify(stub, ident(PHONE, phone, True))).member.member_id
    await identify(stub, ident(OPENID, f"o-{t}"), ident(PHONE, phone, True))
    await stub.UpdateProfile(
        pb.UpdateProfileRequest(member_id=a, nickname="to forget", source="mp", verified=True)
    )
    erased = await stub.EraseMember(
        pb.EraseMemberRequest(member_id=b, operator="dpo", reason="PIPL request 9")
    )
    assert sorted(erased.erased_member_ids) == sorted([a, b])
    assert erased.identifiers_suppressed == 2
    for m in (a, b):
        err = await failure(stub.GetMember(pb.GetMemberRequest(member_id=m)))
        assert error_info(err) == ("MEMBER_ERASED", "member_id")
    left = await db.fetchval(
        "SELECT (SELECT count(*) FROM member.identities WHERE member_id = ANY($1::uuid[]))"
        " + (SELECT count(*) FROM member.profile_observations WHERE member_id = ANY($1::uuid[]))",
        [uuid.UUID(a), uuid.UUID(b)],
    )
    assert left == 0
    # A later login is not silently re-linked: it needs an explicit re-enrolment.
    err = await failure(identify(stub, ident(PHONE, phone, True)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err) == ("IDENTIFIER_ERASED", "identifiers[0]")
    again = await stub.IdentifyMember(
        pb.IdentifyMemberRequest(
            identifiers=[ident(PHONE, phone, True)], request_key=str(uuid.uuid4()), reenrol=True
        )
    )
    assert again.created and again.member.member_id not in (a, b)

    # MemberErased names the whole cluster, through the outbox and the stream.
    async def erased_cluster_published() -> bool:
        found = await member_stream(infra, events_pb2.MemberErased)
        return sorted([a, b]) in [sorted(payload.member_ids) for payload in found]

    await eventually(erased_cluster_published)


async def test_member_code_resolves_once_and_refuses_forgeries(stub: Stub) -> None:
    member = (await identify(stub, ident(UNIONID, f"u-{tag()}", True))).member
    issued = await stub.IssueMemberCode(pb.IssueMemberCodeRequest(member_id=member.member_id))
    assert len(issued.code) == 20 and issued.code.isdigit()
    assert 1 <= issued.refresh_after_seconds <= 30
    scanned = await stub.RedeemMemberCode(
        pb.RedeemMemberCodeRequest(code=issued.code, source="pos:SH001")
    )
    assert scanned.member_id == member.member_id
    replay = await failure(
        stub.RedeemMemberCode(pb.RedeemMemberCodeRequest(code=issued.code, source="pos:SH002"))
    )
    assert error_info(replay) == ("MEMBER_CODE_USED", "code")
    forged = issued.code[:-1] + str((int(issued.code[-1]) + 1) % 10)
    err = await failure(
        stub.RedeemMemberCode(pb.RedeemMemberCodeRequest(code=forged, source="pos:SH001"))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err) == ("MEMBER_CODE_INVALID", "code")
    err = await failure(
        stub.RedeemMemberCode(pb.RedeemMemberCodeRequest(code="12345", source="pos:SH001"))
    )
    assert error_info(err) == ("MALFORMED_MEMBER_CODE", "code")
