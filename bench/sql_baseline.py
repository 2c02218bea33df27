"""Baseline (b): rewards' CompleteOrder SQL, straight through one asyncpg pool.

The statements are not copied: they are the functions services/rewards/orders/
repository.py names in its docstring, on a pooled connection sized like the
service's pool. A plain order runs what the service runs for one:
`members.order_member` once per member (the service keeps that read per member
id) and `settle_order`, one statement outside a transaction. With points
spent: `claim_order`, the ledger's `redeem_for_order`, `record_earning`, then
the outbox INSERT that `UnitOfWork.emit` issues, in one transaction per order. What this leaves out of the
platform's path is exactly the part under test: two gRPC hops (POS client ->
gateway -> rewards), protobuf mapping, validation, interceptors and tracing.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import asyncpg

from loyalty.common.v1 import common_pb2
from loyalty.events.v1 import events_pb2
from servicekit.db import Database, create_pool
from servicekit.events import make_envelope
from servicekit.protos import timestamp
from services.rewards import members
from services.rewards.kernel import OrderLine
from services.rewards.orders import repository as repo
from services.rewards.points.domain import DEFAULT_POLICY
from services.rewards.points.earning import BASE_EARNING_RULE
from services.rewards.points.handlers import PointsLedger

PAID_FEN = 3200
GROSS_FEN = 3600
LINE = OrderLine(
    sku="MT-001", name="Jasmine milk tea", category="milk_tea", quantity=1, paid_amount_fen=PAID_FEN
)


class RewardsSqlBaseline:
    def __init__(
        self,
        pool: asyncpg.Pool,
        store_id: str,
        member_ids: Sequence[str],
        tag: str,
        points_to_redeem: int = 0,
    ):
        # Same schema and producer as the rewards service, so emit() writes its outbox.
        self._db = Database(pool, "rewards", "rewards")
        self._store_id = store_id
        self._members = [uuid.UUID(m) for m in member_ids]
        self._tag = tag
        self._points = BASE_EARNING_RULE.points_for(PAID_FEN)
        self._rule = BASE_EARNING_RULE.describe()
        self._expiry = DEFAULT_POLICY.expiry
        # With points: the checkout also spends them, through the very same
        # ledger code the service runs (member lock, lazy expiry, one posting).
        self._redeem = points_to_redeem
        self._ledger = PointsLedger()
        # A plain order's member read, once per member (as the service keeps it).
        self._order_members: dict[uuid.UUID, members.OrderMember] = {}

    @classmethod
    async def connect(
        cls,
        database_url: str,
        store_id: str,
        member_ids: Sequence[str],
        tag: str,
        pool_size: int,
        points_to_redeem: int = 0,
    ) -> RewardsSqlBaseline:
        pool = await create_pool(database_url, pool_size, pool_size)
        return cls(pool, store_id, member_ids, tag, points_to_redeem)

    async def close(self) -> None:
        await self._db.close()

    def call_for(self, phase: str) -> Callable[[int], Awaitable[None]]:
        """Request function of one phase (warm-up, measured): its own order keys."""

        def call(i: int) -> Awaitable[None]:
            return self.complete_order(f"{self._tag}-{phase}-{i}", i)

        return call

    def _new_order(
        self,
        pos_transaction_id: str,
        member_id: uuid.UUID,
        order_id: uuid.UUID,
        ordered_at: datetime,
    ) -> repo.NewOrder:
        return repo.NewOrder(
            order_id=order_id,
            store_id=self._store_id,
            pos_transaction_id=pos_transaction_id,
            member_id=member_id,
            channel="store",
            paid_amount_fen=PAID_FEN,
            gross_amount_fen=GROSS_FEN,
            lines=(LINE,),
            ordered_at=ordered_at,
            # The service hashes the canonical request; same size here.
            request_hash=hashlib.sha256(pos_transaction_id.encode()).digest(),
            points_earned=self._points,
            points_redeemed=self._redeem,
        )

    def _completed(
        self,
        pos_transaction_id: str,
        member_id: uuid.UUID,
        order_id: uuid.UUID,
        ordered_at: datetime,
    ) -> events_pb2.OrderCompleted:
        return events_pb2.OrderCompleted(
            order_id=str(order_id),
            member_id=str(member_id),
            store_id=self._store_id,
            pos_transaction_id=pos_transaction_id,
            channel=common_pb2.CHANNEL_STORE,
            paid_amount_fen=PAID_FEN,
            gross_amount_fen=GROSS_FEN,
            points_earned=self._points,
            ordered_at=timestamp(ordered_at),
        )

    async def complete_order(self, pos_transaction_id: str, i: int) -> None:
        member_id = self._members[i % len(self._members)]
        order_id = uuid.uuid4()
        ordered_at = datetime.now(UTC)
        if not self._redeem:
            await self._settle_plain(pos_transaction_id, member_id, order_id, ordered_at)
            return
        async with self._db.unit_of_work() as uow:
            # The checkout reads tier, multiplier and erasure first, as the service does.
            await members.member_state(uow.conn, member_id)
            claimed = await repo.claim_order(
                uow.conn, self._new_order(pos_transaction_id, member_id, order_id, ordered_at)
            )
            if not claimed:
                raise RuntimeError(f"order {pos_transaction_id} was not claimed")
            if self._redeem:
                spent = await self._ledger.redeem_for_order(
                    uow.conn, member_id, self._redeem, order_id, ordered_at
                )
                if isinstance(spent, Exception):
                    raise spent
            await repo.record_earning(
                uow.conn,
                repo.Earning(
                    transaction_id=uuid.uuid4(),
                    member_id=member_id,
                    order_id=order_id,
                    idempotency_key=f"earn:order:{order_id}",
                    points=self._points,
                    rule=self._rule,
                    lot_id=uuid.uuid4(),
                    earned_at=ordered_at,
                    expires_at=self._expiry.expires_at(ordered_at),
                ),
            )
            await uow.emit(
                self._completed(pos_transaction_id, member_id, order_id, ordered_at),
                member_id=str(member_id),
            )

    async def _settle_plain(
        self,
        pos_transaction_id: str,
        member_id: uuid.UUID,
        order_id: uuid.UUID,
        ordered_at: datetime,
    ) -> None:
        """A plain order as the service settles it (handlers.complete_order_now):
        the member read once per member, then the one statement."""
        async with self._db.pool.acquire() as conn:
            sent = self._order_members.get(member_id)
            if sent is None:
                sent = await members.order_member(conn, member_id)
                self._order_members[member_id] = sent
            completed = make_envelope(
                "rewards",
                self._completed(pos_transaction_id, member_id, order_id, ordered_at),
                str(member_id),
            )
            settled = await repo.settle_order(
                conn,
                self._new_order(pos_transaction_id, member_id, order_id, ordered_at),
                repo.Earning(
                    transaction_id=uuid.uuid4(),
                    member_id=member_id,
                    order_id=order_id,
                    idempotency_key=f"earn:order:{order_id}",
                    points=self._points,
                    rule=self._rule,
                    lot_id=uuid.uuid4(),
                    earned_at=ordered_at,
                    expires_at=self._expiry.expires_at(ordered_at),
                    event=(completed.event_id, completed.event_type, completed.SerializeToString()),
                ),
                member_id,
                sent.state,
            )
            if settled is None:
                raise RuntimeError(f"order {pos_transaction_id} was not settled")
