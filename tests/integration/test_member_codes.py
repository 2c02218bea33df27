"""Dynamic member codes (issue 15 item 10): every issue is a fresh code,
redeemable once, for a minute; against the real database, with the
handlers' clock injected (no sleeping, no dependence on today)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from loyalty.member.v1 import member_pb2 as pb
from servicekit.db import Database, create_pool
from servicekit.errors import FailedPrecondition, InvalidArgument
from services.member.domain import CODE_LIFETIME_SECONDS
from services.member.handlers import MemberHandlers
from services.member.oneid_handlers import CODE_FORGET_AFTER_SECONDS
from services.member.pii import PiiVault
from services.member.policy import load_policy

from ..harness import Infra
from .test_member_oneid import UNIONID, Stub, ident, identify, tag


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
async def stub(member_channel: object) -> Stub:
    return Stub(member_channel)


@pytest.fixture
async def database(infra: Infra) -> AsyncIterator[Database]:
    pool = await create_pool(infra.database_url, min_size=1, max_size=4)
    yield Database(pool, "member", "member")
    await pool.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def handlers(infra: Infra, clock: Clock) -> MemberHandlers:
    vault = PiiVault(infra.service_settings().pii_key, {}, "k0")
    return MemberHandlers(vault, load_policy(), b"member-code-test-secret", clock=clock)


async def test_the_service_issues_a_fresh_code_each_time(stub: Stub) -> None:
    member = (await identify(stub, ident(UNIONID, f"u-{tag()}", True))).member
    first = await stub.IssueMemberCode(pb.IssueMemberCodeRequest(member_id=member.member_id))
    second = await stub.IssueMemberCode(pb.IssueMemberCodeRequest(member_id=member.member_id))
    assert first.code != second.code
    # The scan of the first does not spoil the second (the refresh after a scan).
    scanned = await stub.RedeemMemberCode(pb.RedeemMemberCodeRequest(code=first.code, source="t"))
    assert scanned.member_id == member.member_id
    again = await stub.RedeemMemberCode(pb.RedeemMemberCodeRequest(code=second.code, source="t"))
    assert again.member_id == member.member_id


async def test_a_code_is_single_use_and_short_lived(
    stub: Stub, database: Database, handlers: MemberHandlers, clock: Clock
) -> None:
    member = (await identify(stub, ident(UNIONID, f"u-{tag()}", True))).member
    async with database.unit_of_work() as uow:
        issued = await handlers.issue_code(uow, member.member_id)
    assert issued.expires_at.timestamp() == pytest.approx(clock.now + CODE_LIFETIME_SECONDS)
    assert 0 < issued.refresh_after_seconds < CODE_LIFETIME_SECONDS

    # Two tills scan the same code at once: exactly one gets the member.
    async def scan(source: str) -> str:
        async with database.unit_of_work() as uow:
            return (await handlers.redeem_code(uow, issued.code, source)).member_id

    results = await asyncio.gather(scan("pos:A"), scan("pos:B"), return_exceptions=True)
    assert sorted(map(type, results), key=str) == sorted([str, FailedPrecondition], key=str)
    (refused,) = [r for r in results if isinstance(r, FailedPrecondition)]
    assert refused.code == "MEMBER_CODE_USED"
    assert member.member_id in results

    async with database.unit_of_work() as uow:
        late = await handlers.issue_code(uow, member.member_id)
    clock.now += CODE_LIFETIME_SECONDS + 1
    with pytest.raises(FailedPrecondition) as expired:
        async with database.unit_of_work() as uow:
            await handlers.redeem_code(uow, late.code, "pos:A")
    assert expired.value.code == "MEMBER_CODE_EXPIRED"

    # Long after: forgotten (pruned by a later issue), so simply not a code.
    clock.now += CODE_FORGET_AFTER_SECONDS + 1
    async with database.unit_of_work() as uow:
        await handlers.issue_code(uow, member.member_id)
    with pytest.raises(InvalidArgument) as unknown:
        async with database.unit_of_work() as uow:
            await handlers.redeem_code(uow, late.code, "pos:A")
    assert unknown.value.code == "MEMBER_CODE_INVALID"


async def test_an_erased_members_codes_go(
    stub: Stub, database: Database, handlers: MemberHandlers
) -> None:
    member = (await identify(stub, ident(UNIONID, f"u-{tag()}", True))).member
    async with database.unit_of_work() as uow:
        await handlers.issue_code(uow, member.member_id)
    await stub.EraseMember(
        pb.EraseMemberRequest(member_id=member.member_id, operator="t", reason=str(uuid.uuid4()))
    )
    async with database.pool.acquire() as conn:
        left = await conn.fetchval(
            "SELECT count(*) FROM member.member_codes WHERE member_id = $1",
            uuid.UUID(member.member_id),
        )
    assert left == 0
