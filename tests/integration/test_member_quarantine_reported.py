"""Quarantine is reported (issue 15 item 14): the call that quarantines an
identifier emits IdentifierQuarantined (outbox, same transaction) and counts
member_identifiers_quarantined_total, once, so an alert can fire."""

from __future__ import annotations

import urllib.request

from loyalty.events.v1 import events_pb2
from servicekit.server import ServiceApp
from services.member.metrics import MemberMetrics

from ..harness import Infra, eventually
from .test_member_oneid import CARD, OPENID, Stub, ident, identify, member_stream, tag


def quarantined_cards(app: ServiceApp) -> float:
    metrics: MemberMetrics = app.member_metrics  # type: ignore[attr-defined]
    value = metrics.registry.get_sample_value(
        "member_identifiers_quarantined_total", {"identifier_type": "pos_card"}
    )
    return value or 0.0


async def test_crossing_the_quarantine_threshold_emits_an_event_and_a_metric(
    member_channel: object, member_app: ServiceApp, infra: Infra
) -> None:
    stub = Stub(member_channel)
    t = tag()
    staff_card = ident(CARD, f"staff-{t}")
    masked = f"st{'*' * (len(t) + 2)}{t[-2:]}"
    before = quarantined_cards(member_app)
    for n in range(6):  # the 4th member crosses the threshold (3); later calls do not count
        own = ident(OPENID, f"o{n}-{t}")
        await identify(stub, own)
        await identify(stub, own, staff_card)
    assert quarantined_cards(member_app) == before + 1

    async def published() -> bool:
        found = await member_stream(infra, events_pb2.IdentifierQuarantined)
        return [
            (e.identifier_type, e.linked_members) for e in found if e.value_masked == masked
        ] == [("pos_card", 4)]

    await eventually(published)


def test_member_metrics_are_served_on_their_own_port() -> None:
    metrics = MemberMetrics()
    metrics.quarantined.labels(identifier_type="phone").inc()
    port = metrics.start("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    finally:
        metrics.stop()
    assert 'member_identifiers_quarantined_total{identifier_type="phone"} 1.0' in text
