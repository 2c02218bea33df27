"""The member centre's fan-out (gateway/api/centre.py) against fake services:
which failures degrade a half and which answer the request (the real services
stopped: tests/e2e/test_tiers_member_centre.py)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import grpc
import pytest

from gateway.api.centre import member_centre
from gateway.clients import Downstreams
from gateway.errors import DownstreamError
from loyalty.rewards.v1 import rewards_pb2
from loyalty.tiering.v1 import tiering_pb2

MEMBER = "0b6a3c1e-5d7f-4b8e-9a2c-1f3e5d7a9b0c"
DOWN = DownstreamError(grpc.StatusCode.UNAVAILABLE, "down", code="DEPENDENCY_UNAVAILABLE")
NOT_DEPLOYED = DownstreamError(grpc.StatusCode.UNAVAILABLE, "gone", code="SERVICE_NOT_DEPLOYED")
NO_PROGRAMME = DownstreamError(grpc.StatusCode.NOT_FOUND, "none", code="NO_PROGRAMME")
BROKEN = DownstreamError(grpc.StatusCode.INTERNAL, "internal error", code="INTERNAL")


class Tiering:
    def __init__(self, fails: DownstreamError | None) -> None:
        self.fails = fails

    async def get_member_tier(self, member_id: str) -> tiering_pb2.MemberTier:
        await asyncio.sleep(0)
        if self.fails:
            raise self.fails
        return tiering_pb2.MemberTier(
            member_id=member_id,
            tier=tiering_pb2.TierInfo(code="svip", name="SVIP"),
            period_last_day="2026-12-31",
        )


class Rewards:
    def __init__(self, fails: DownstreamError | None) -> None:
        self.fails = fails
        self.finished = 0

    async def get_points_summary(self, member_id: str, days: int) -> rewards_pb2.PointsSummary:
        # Slower than tiering: a failed tier must not leave this call running.
        await asyncio.sleep(0.01)
        if self.fails:
            raise self.fails
        self.finished += 1
        return rewards_pb2.PointsSummary(
            balance=rewards_pb2.PointsBalance(member_id=member_id, available=320)
        )


class Fake:
    """Downstreams with the tiering or rewards client failing, or not deployed."""

    def __init__(self, tiering: Any, rewards: Any) -> None:
        self._tiering, self._rewards = tiering, rewards

    @property
    def tiering(self) -> Tiering:
        if self._tiering is NOT_DEPLOYED:
            raise NOT_DEPLOYED
        return cast(Tiering, self._tiering)

    @property
    def rewards(self) -> Rewards:
        return cast(Rewards, self._rewards)


def down(tiering: Any = None, rewards: Any = None) -> Downstreams:
    t = tiering if tiering is NOT_DEPLOYED else Tiering(tiering)
    return cast(Downstreams, Fake(t, Rewards(rewards)))


async def test_both_halves_answered() -> None:
    page = await member_centre(down(), MEMBER)
    assert page.degraded == []
    assert page.tier is not None and page.tier.tier.code == "svip"
    assert page.points is not None and page.points.available == 320


@pytest.mark.parametrize("failure", [DOWN, NOT_DEPLOYED], ids=["unavailable", "not-deployed"])
async def test_a_tier_service_that_does_not_answer_degrades_its_half(
    failure: DownstreamError,
) -> None:
    page = await member_centre(down(tiering=failure), MEMBER)
    assert (page.tier, page.degraded) == (None, ["tiering"])
    assert page.points is not None and page.points.available == 320


async def test_a_points_service_that_does_not_answer_degrades_its_half() -> None:
    page = await member_centre(down(rewards=DOWN), MEMBER)
    assert (page.points, page.degraded) == (None, ["rewards"])
    assert page.tier is not None


async def test_neither_answering_is_unavailable() -> None:
    with pytest.raises(DownstreamError) as raised:
        await member_centre(down(tiering=DOWN, rewards=DOWN), MEMBER)
    assert raised.value.status == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("failure", [NO_PROGRAMME, BROKEN], ids=["not-found", "internal"])
async def test_any_other_failure_answers_the_request(failure: DownstreamError) -> None:
    fakes = down(tiering=failure)
    with pytest.raises(DownstreamError) as raised:
        await member_centre(fakes, MEMBER)
    assert raised.value.code == failure.code
    # The other half was waited for, not left running.
    assert cast(Fake, fakes).rewards.finished == 1
