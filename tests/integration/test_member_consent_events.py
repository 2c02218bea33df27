"""Member publishes every consent change (loyalty.events.v1.ConsentChanged)
through its outbox: a member's own choice, and the answers a merge or an
unmerge recomputes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest

from loyalty.events.v1 import events_pb2
from loyalty.member.v1 import member_pb2 as pb
from loyalty.member.v1 import member_pb2_grpc

from ..harness import Infra, eventually
from . import test_member_oneid as oneid
from .test_member_oneid import CARD, ident, identify, member_stream, tag

Stub = member_pb2_grpc.MemberServiceStub
MARKETING = pb.CONSENT_PURPOSE_MARKETING
SMS = pb.CONSENT_CHANNEL_SMS


# The same fixture as test_member_oneid; pytest finds it as a module attribute.
stub = oneid.stub


async def consent_events(infra: Infra, member_id: str) -> list[events_pb2.ConsentChanged]:
    found = await member_stream(infra, events_pb2.ConsentChanged)
    return [payload for payload in found if payload.member_id == member_id]


async def wait_for(infra: Infra, member_id: str, n: int) -> list[events_pb2.ConsentChanged]:
    async def enough() -> list[events_pb2.ConsentChanged] | None:
        found = await consent_events(infra, member_id)
        return found if len(found) >= n else None

    found = await eventually(enough)
    assert isinstance(found, list)
    return found


async def set_consent(
    stub: Stub,
    member: str,
    channel: int,
    granted: bool,
    purpose: int = MARKETING,
    source: str = "mini-program",
) -> pb.Profile:
    """The member's own choice, as the mini-program records it."""
    return await stub.SetConsent(
        pb.SetConsentRequest(
            member_id=member,
            purpose=purpose,
            channel=channel,
            granted=granted,
            source=source,
            actor="member",
        )
    )


def brief(events: list[events_pb2.ConsentChanged]) -> list[tuple[str, str, bool, str]]:
    return [(e.purpose, e.channel, e.granted, e.source) for e in events]


async def test_a_consent_change_puts_one_consent_changed_in_the_member_stream(
    infra: Infra, stub: Stub
) -> None:
    member = (await identify(stub, ident(CARD, f"cc-{tag()}"))).member.member_id
    await set_consent(stub, member, pb.CONSENT_CHANNEL_MINI_PROGRAM, True)
    [event] = await wait_for(infra, member, 1)
    assert brief([event]) == [("marketing", "mini_program", True, "mini-program")]
    recorded = event.recorded_at.ToDatetime(tzinfo=UTC)
    assert abs(datetime.now(UTC) - recorded) < timedelta(minutes=1)
    history = await stub.ListConsentHistory(pb.ListConsentHistoryRequest(member_id=member))
    assert [r.recorded_at.ToDatetime(tzinfo=UTC) for r in history.records] == [recorded]
    # Personalisation is for every channel: "" in the event.
    await set_consent(
        stub, member, pb.CONSENT_CHANNEL_ALL, False, purpose=pb.CONSENT_PURPOSE_PERSONALISATION
    )
    events = await wait_for(infra, member, 2)
    assert brief(events)[1:] == [("personalisation", "", False, "mini-program")]


async def test_bad_consent_emits_nothing(infra: Infra, stub: Stub) -> None:
    member = (await identify(stub, ident(CARD, f"cb-{tag()}"))).member.member_id
    with pytest.raises(grpc.aio.AioRpcError):
        # Personalisation is not given per channel.
        await set_consent(stub, member, SMS, True, purpose=pb.CONSENT_PURPOSE_PERSONALISATION)
    await set_consent(stub, member, SMS, True)
    assert brief(await wait_for(infra, member, 1)) == [("marketing", "sms", True, "mini-program")]


async def test_merge_and_unmerge_publish_the_recomputed_answers(infra: Infra, stub: Stub) -> None:
    t = tag()
    old = (await identify(stub, ident(CARD, f"ma-{t}"))).member.member_id
    new = (await identify(stub, ident(CARD, f"mb-{t}"))).member.member_id
    await set_consent(stub, old, SMS, True)
    await set_consent(stub, new, SMS, False)
    await set_consent(stub, new, pb.CONSENT_CHANNEL_WECOM, True)
    merged = await stub.MergeMembers(
        pb.MergeMembersRequest(member_ids=[old, new], operator="op", reason="same person")
    )
    assert merged.member.member_id == old
    # The absorbed member's refusal wins; its WeCom grant is new to the survivor.
    events = await wait_for(infra, old, 3)
    assert sorted(brief(events[1:])) == [
        ("marketing", "sms", False, "merge"),
        ("marketing", "wecom", True, "merge"),
    ]
    await stub.UnmergeMember(
        pb.UnmergeMemberRequest(
            merge_id=merged.merges[0].merge_id, operator="op", reason="two people"
        )
    )
    # The survivor answers for itself again (no WeCom record: no consent); the
    # restored member's own choices are published under its id.
    events = await wait_for(infra, old, 5)
    assert sorted(brief(events[3:])) == [
        ("marketing", "sms", True, "unmerge"),
        ("marketing", "wecom", False, "unmerge"),
    ]
    restored = await wait_for(infra, new, 4)
    assert sorted(brief(restored[2:])) == [
        ("marketing", "sms", False, "unmerge"),
        ("marketing", "wecom", True, "unmerge"),
    ]
    assert restored[2].recorded_at == events[3].recorded_at
