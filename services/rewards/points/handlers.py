"""Use cases of the points ledger, each given a unit of work.

Every write claims an idempotency key first (ledger_requests, or the order's
key for checkout), then takes the member's lock, brings the member's lots up to
date (lazy expiry and activation, as journal transactions), decides with the
pure rules in domain.py and writes with `repository.post`.

A refusal that depends on state (not enough points, refund larger than the
order) is stored under the key and the unit of work commits it: use cases
return an `Outcome`, and the servicer raises its error only after the commit,
so a retry replays the same refusal. (Not a refund whose order has not
arrived yet: its key is given back, so the retry after the order applies.)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from loyalty.events.v1 import events_pb2
from servicekit.db import Connection, UnitOfWork
from servicekit.errors import (
    Conflict,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from servicekit.protos import timestamp

from .. import members, merges
from ..kernel import parse_member_id, parse_store_id
from . import repository as ledger
from .domain import (
    DEFAULT_POLICY,
    MAX_POINTS_PER_OPERATION,
    LedgerPolicy,
    Lot,
    ShortfallPolicy,
    Take,
    allocate,
    check_key,
    check_points,
    check_text,
    due_for_activation,
    due_for_expiry,
    refund_points_due,
    request_hash,
)
from .earning import EarningRules, Period, period_start
from .repository import Balance, BalanceDelta, Entry, LotChange, NewLot, Posting

T = TypeVar("T")

ERRORS: dict[str, type[DomainError]] = {
    cls.__name__: cls for cls in (InvalidArgument, NotFound, Conflict, FailedPrecondition)
}


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """A result, or a refusal to raise once the unit of work has committed."""

    value: T | None = None
    error: DomainError | None = None

    def unwrap(self) -> T:
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


def error_doc(error: DomainError) -> dict[str, str]:
    return {
        "error": type(error).__name__,
        "code": error.code,
        "message": error.message,
        "field": error.field,
    }


def error_from_doc(doc: dict[str, Any]) -> DomainError:
    cls = ERRORS.get(doc["error"], FailedPrecondition)
    return cls(doc["message"], code=doc["code"], field=doc["field"])


@dataclass(frozen=True)
class Spend:
    """The result of a redemption, a hold, a post or a void."""

    transaction_id: str
    member_id: str
    points: int
    available: int
    lots: list[tuple[str, int]] = field(default_factory=list)
    hold_id: str = ""
    hold_status: str = ""
    expires_at: str = ""
    replayed: bool = False

    def doc(self) -> dict[str, Any]:
        return {
            "transaction_id": self.transaction_id,
            "member_id": self.member_id,
            "points": self.points,
            "available": self.available,
            "lots": [list(t) for t in self.lots],
            "hold_id": self.hold_id,
            "hold_status": self.hold_status,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Spend:
        return cls(
            transaction_id=doc["transaction_id"],
            member_id=doc["member_id"],
            points=doc["points"],
            available=doc["available"],
            lots=[(lot, n) for lot, n in doc["lots"]],
            hold_id=doc["hold_id"],
            hold_status=doc["hold_status"],
            expires_at=doc["expires_at"],
            replayed=True,
        )


@dataclass(frozen=True)
class Refund:
    refund_id: str
    order_id: str
    member_id: str
    refunded_amount_fen: int
    points_due: int
    points_reversed: int
    points_debt: int
    points_shortfall: int
    available: int
    points_restored: int = 0
    replayed: bool = False

    def doc(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "replayed"}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Refund:
        return cls(**doc, replayed=True)


@dataclass(frozen=True)
class Adjustment:
    transaction_id: str
    member_id: str
    points: int
    available: int
    replayed: bool = False

    def doc(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "replayed"}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Adjustment:
        return cls(**doc, replayed=True)


@dataclass(frozen=True)
class Maintained:
    balance: Balance
    lots: list[Lot]


def _uuid(member_id: str, field: str = "member_id") -> uuid.UUID:
    return uuid.UUID(parse_member_id(member_id, field))


def spendable(balance: Balance) -> int:
    """What a member may spend: available points net of debt (docs/ledger.md,
    "Debt": a member who owes points spends only what exceeds the debt)."""
    return max(0, balance.available - balance.debt)


def insufficient(member_id: uuid.UUID, wanted: int, balance: Balance, field: str) -> DomainError:
    owed = f" ({balance.debt} owed as debt)" if balance.debt else ""
    return FailedPrecondition(
        f"member {member_id} has {spendable(balance)} points to spend{owed}, {wanted} requested",
        code="INSUFFICIENT_POINTS",
        field=field,
    )


def member_erased(member_id: uuid.UUID, field: str = "member_id") -> DomainError:
    return FailedPrecondition(
        f"member {member_id} was erased; no further points can be written",
        code="MEMBER_ERASED",
        field=field,
    )


async def refuse_erased(conn: Connection, member_id: uuid.UUID) -> None:
    """Refuse a write for an erased member (MemberErased) before anything is
    written, so no new record is created about them."""
    if await members.is_erased(conn, member_id):
        raise member_erased(member_id)


def spend_entries(
    takes: Sequence[Take], member_id: uuid.UUID, to_account: str, points: int
) -> tuple[list[Entry], list[LotChange]]:
    # Held points stay the member's; redeemed or adjusted ones go to a brand account.
    holder = member_id if to_account == "member_held" else None
    entries = [Entry("member_wallet", member_id, -points), Entry(to_account, holder, points)]
    return entries, [LotChange(t.lot_id, -t.points) for t in takes]


class PointsLedger:
    def __init__(
        self,
        policy: LedgerPolicy = DEFAULT_POLICY,
        rules: EarningRules | None = None,
        directory: members.MemberDirectory | None = None,
    ) -> None:
        self.policy = policy
        self.rules = rules or EarningRules()
        # Which ids are members' (AdjustPoints, bulk earn); None: not asked
        # (MEMBER_ADDR unset), only rewards' own erasure marks apply.
        self.directory = directory

    async def member_refusals(self, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, DomainError]:
        """The ids the member service refuses (unknown or erased), with the error."""
        if self.directory is None:
            return {}
        return await self.directory.refusals(ids)

    # ---- the member's lock and lazy maintenance ------------------------------

    async def maintain(
        self, conn: Connection, member_id: uuid.UUID, now: datetime
    ) -> Maintained | None:
        """Lock the member, expire lots whose time has come and activate pending
        ones that are due; None when the member has no account."""
        balance, floor = await ledger.lock_member_with_floor(conn, member_id)
        if balance is None:
            return None
        assert floor is not None
        lots = await ledger.open_lots(conn, member_id, floor)
        expired = due_for_expiry(lots, now)
        if expired:
            balance = await self._expire(conn, member_id, expired)
        activating = due_for_activation(lots, now)
        if activating:
            balance = await self._activate(conn, member_id, activating, balance.debt)
        if expired or activating:
            lots = await ledger.open_lots(conn, member_id, floor)
        return Maintained(balance, lots)

    async def _expire(self, conn: Connection, member_id: uuid.UUID, lots: list[Lot]) -> Balance:
        active = sum(lot.remaining for lot in lots if lot.status == "active")
        pending = sum(lot.remaining for lot in lots if lot.status == "pending")
        entries = [Entry("expired", None, active + pending)]
        if active:
            entries.append(Entry("member_wallet", member_id, -active))
        if pending:
            entries.append(Entry("member_pending", member_id, -pending))
        txn = uuid.uuid4()
        balance = await ledger.post(
            conn,
            Posting(
                transaction_id=txn,
                member_id=member_id,
                kind="expire",
                idempotency_key=f"expire:{txn}",
                amount=active + pending,
                entries=entries,
                balance=BalanceDelta(available=-active, pending=-pending),
                lot_changes=[LotChange(lot.lot_id, -lot.remaining, "expired") for lot in lots],
            ),
        )
        assert balance is not None, "an expiry never takes more than the lots hold"
        return balance

    async def _activate(
        self, conn: Connection, member_id: uuid.UUID, lots: list[Lot], debt: int
    ) -> Balance:
        total = sum(lot.remaining for lot in lots)
        repay = min(debt, total)
        # Debt is repaid out of the soonest-expiring activating lots.
        changes = []
        left = repay
        for lot in sorted(lots, key=lambda lot: (lot.expires_at, lot.lot_id)):
            take = min(left, lot.remaining)
            left -= take
            changes.append(LotChange(lot.lot_id, -take, "active"))
        entries = [Entry("member_pending", member_id, -total)]
        if total - repay:
            entries.append(Entry("member_wallet", member_id, total - repay))
        if repay:
            entries.append(Entry("member_debt", member_id, repay))
        txn = uuid.uuid4()
        balance = await ledger.post(
            conn,
            Posting(
                transaction_id=txn,
                member_id=member_id,
                kind="activate",
                idempotency_key=f"activate:{txn}",
                amount=total,
                entries=entries,
                balance=BalanceDelta(available=total - repay, pending=-total, debt=-repay),
                lot_changes=changes,
            ),
        )
        assert balance is not None
        return balance

    # ---- idempotency ------------------------------------------------------

    async def _claim(
        self,
        conn: Connection,
        key: str,
        operation: str,
        body: dict[str, object],
        field: str = "idempotency_key",
    ) -> tuple[bytes, ledger.StoredRequest | None]:
        digest = request_hash(operation, body)
        stored = await ledger.claim_request(conn, key, operation, digest)
        if stored is not None and (stored.request_hash != digest or stored.operation != operation):
            raise Conflict(
                f"idempotency key {key.split(':', 1)[1]} was already used for a different request",
                code="IDEMPOTENCY_KEY_REUSED",
                field=field,
            )
        return digest, stored

    async def _reject(self, conn: Connection, key: str, error: DomainError) -> Outcome[Any]:
        await ledger.finish_request(conn, key, "rejected", error_doc(error))
        return Outcome(error=error)

    # ---- spending ----------------------------------------------------------

    async def _start_spend(
        self,
        conn: Connection,
        operation: str,
        member_id: str,
        points: int,
        idempotency_key: str,
        reference: str,
        now: datetime,
        ttl: timedelta | None = None,
    ) -> tuple[uuid.UUID, int, str, list[Take]] | Outcome[Spend]:
        """What a redemption and a hold share: validate, claim the key, lock and
        maintain the member and pick the lots; an Outcome is a replay or a refusal."""
        member, points = _uuid(member_id), check_points(points, "points")
        rkey = f"{operation}:{check_key(idempotency_key)}"
        check_text(reference, "reference", "REFERENCE", required=False)
        await refuse_erased(conn, member)
        body: dict[str, object] = {"member_id": str(member), "points": points, "ref": reference}
        if ttl is not None:
            # Only when given, so hashes of holds on the default time-out stay the same.
            body["ttl_ms"] = ttl // timedelta(milliseconds=1)
        _, stored = await self._claim(conn, rkey, operation, body)
        if stored is not None:
            return self._replay(stored, Spend.from_doc)
        state = await self.maintain(conn, member, now)
        if state is None:
            # Rewards cannot tell a member who never earned from no member: for
            # both, nothing is there to spend (member checks who exists).
            return await self._reject(conn, rkey, insufficient(member, points, Balance(), "points"))
        takes = allocate(state.lots, points, now) if points <= spendable(state.balance) else None
        if takes is None:
            return await self._reject(
                conn, rkey, insufficient(member, points, state.balance, "points")
            )
        return member, points, rkey, takes

    async def redeem(
        self,
        uow: UnitOfWork,
        member_id: str,
        points: int,
        idempotency_key: str,
        reference: str,
        now: datetime,
    ) -> Outcome[Spend]:
        start = await self._start_spend(
            uow.conn, "redeem", member_id, points, idempotency_key, reference, now
        )
        if isinstance(start, Outcome):
            return start
        conn = uow.conn
        member, points, rkey, takes = start
        spend = await self._post_redeem(conn, member, points, takes, rkey, reference or None, None)
        await ledger.finish_request(conn, rkey, "ok", spend.doc())
        return Outcome(spend)

    async def _post_redeem(
        self,
        conn: Connection,
        member: uuid.UUID,
        points: int,
        takes: list[Take],
        key: str,
        reference: str | None,
        order_id: uuid.UUID | None,
    ) -> Spend:
        txn = uuid.uuid4()
        entries, changes = spend_entries(takes, member, "redeemed", points)
        balance = await ledger.post(
            conn,
            Posting(
                transaction_id=txn,
                member_id=member,
                kind="redeem",
                idempotency_key=key,
                amount=points,
                entries=entries,
                balance=BalanceDelta(available=-points),
                lot_changes=changes,
                reference=reference,
                order_id=order_id,
            ),
        )
        assert balance is not None, "allocated under the member's lock"
        return Spend(
            str(txn),
            str(member),
            points,
            balance.available,
            [(str(t.lot_id), t.points) for t in takes],
        )

    def _replay(self, stored: ledger.StoredRequest, build: Any) -> Outcome[Any]:
        assert stored.response is not None and stored.outcome is not None
        if stored.outcome == "rejected":
            return Outcome(error=error_from_doc(stored.response))
        return Outcome(build(stored.response))

    async def redeem_for_order(
        self, conn: Connection, member: uuid.UUID, points: int, order_id: uuid.UUID, now: datetime
    ) -> Spend | DomainError:
        """Points spent as part of a checkout (the order's key is the idempotency key)."""
        state = await self.maintain(conn, member, now)
        if state is None:
            return insufficient(member, points, Balance(), "points_to_redeem")
        takes = allocate(state.lots, points, now) if points <= spendable(state.balance) else None
        if takes is None:
            return insufficient(member, points, state.balance, "points_to_redeem")
        return await self._post_redeem(
            conn, member, points, takes, f"redeem:order:{order_id}", None, order_id
        )

    # ---- holds ---------------------------------------------------------------

    async def hold(
        self,
        uow: UnitOfWork,
        member_id: str,
        points: int,
        idempotency_key: str,
        reference: str,
        now: datetime,
        ttl: timedelta | None = None,
    ) -> Outcome[Spend]:
        start = await self._start_spend(
            uow.conn, "hold", member_id, points, idempotency_key, reference, now, ttl
        )
        if isinstance(start, Outcome):
            return start
        conn = uow.conn
        member, points, rkey, takes = start
        txn, hold_id = uuid.uuid4(), uuid.uuid4()
        entries, changes = spend_entries(takes, member, "member_held", points)
        balance = await ledger.post(
            conn,
            Posting(
                transaction_id=txn,
                member_id=member,
                kind="hold",
                idempotency_key=rkey,
                amount=points,
                entries=entries,
                balance=BalanceDelta(available=-points, held=points),
                lot_changes=changes,
                reference=str(hold_id),
            ),
        )
        assert balance is not None
        expires_at = now + (ttl or self.policy.hold_ttl)
        await ledger.insert_hold(conn, hold_id, member, points, reference or None, expires_at, txn)
        spend = Spend(
            str(txn),
            str(member),
            points,
            balance.available,
            [(str(t.lot_id), t.points) for t in takes],
            hold_id=str(hold_id),
            hold_status="held",
            expires_at=expires_at.isoformat(),
        )
        await ledger.finish_request(conn, rkey, "ok", spend.doc())
        return Outcome(spend)

    async def _locked_hold(self, conn: Connection, hold_id: str, member_id: str = "") -> Any:
        try:
            hid = uuid.UUID(hold_id)
        except ValueError:
            raise InvalidArgument(
                "hold_id is not a hold id (a UUID)", code="INVALID_HOLD_ID", field="hold_id"
            ) from None
        hold = await ledger.get_hold(conn, hid)
        # When the caller names a member (the mini-program's routes), another
        # person's hold does not exist for it.
        if hold is None or (
            member_id and hold["member_id"] not in await merges.person_of(conn, _uuid(member_id))
        ):
            raise NotFound(f"hold {hold_id} does not exist", code="UNKNOWN_HOLD", field="hold_id")
        # The member's lock first (as every writer takes it), then re-read the hold.
        await ledger.lock_member(conn, hold["member_id"])
        return await ledger.get_hold(conn, hid)

    def _resolved(self, hold: Any, wanted: str) -> Outcome[Spend]:
        """A hold already resolved: the same answer again, or why not."""
        if hold["status"] == wanted:
            return Outcome(
                Spend(
                    str(hold["resolution_transaction_id"]),
                    str(hold["member_id"]),
                    hold["points"],
                    -1,
                    hold_id=str(hold["id"]),
                    hold_status=hold["status"],
                    replayed=True,
                )
            )
        return Outcome(
            error=FailedPrecondition(
                f"hold {hold['id']} is already {hold['status']}",
                code=f"HOLD_{hold['status'].upper()}",
                field="hold_id",
            )
        )

    async def post_hold(
        self, uow: UnitOfWork, hold_id: str, now: datetime, member_id: str = ""
    ) -> Outcome[Spend]:
        conn = uow.conn
        hold = await self._locked_hold(conn, hold_id, member_id)
        if hold["status"] != "held":
            return await self._with_balance(conn, self._resolved(hold, "posted"))
        if hold["expires_at"] <= now:
            await self._void(conn, hold, "expired", now)
            return Outcome(
                error=FailedPrecondition(
                    f"hold {hold_id} timed out", code="HOLD_EXPIRED", field="hold_id"
                )
            )
        txn = uuid.uuid4()
        member, points = hold["member_id"], hold["points"]
        balance = await ledger.post(
            conn,
            Posting(
                transaction_id=txn,
                member_id=member,
                kind="hold_post",
                idempotency_key=f"hold_post:{hold['id']}",
                amount=points,
                entries=[Entry("member_held", member, -points), Entry("redeemed", None, points)],
                balance=BalanceDelta(held=-points),
                reference=str(hold["id"]),
            ),
        )
        assert balance is not None
        # Spent: what a refund claimed from these points stays its debt or shortfall.
        claws, _ = await self._clawbacks(conn, hold)
        if claws:
            await ledger.change_clawback(conn, {lot: -c for lot, c in claws.items()})
        # Under the member's lock the hold is still 'held'; the conditional
        # update is the exactly-once guard all the same (False rolls back).
        # The call stays outside the assert (`python -O` drops asserts).
        resolved = await ledger.resolve_hold(conn, hold["id"], "posted", txn, now)
        assert resolved, "the member's lock serialises resolutions"
        return Outcome(
            Spend(
                str(txn),
                str(member),
                points,
                balance.available,
                hold_id=str(hold["id"]),
                hold_status="posted",
            )
        )

    async def void_hold(
        self,
        uow: UnitOfWork,
        hold_id: str,
        now: datetime,
        *,
        timed_out: bool = False,
        member_id: str = "",
    ) -> Outcome[Spend]:
        """Void a hold (or, for the time-out job, expire one that is due)."""
        conn = uow.conn
        hold = await self._locked_hold(conn, hold_id, member_id)
        wanted = "expired" if timed_out else "voided"
        if hold["status"] != "held":
            return await self._with_balance(conn, self._resolved(hold, wanted))
        if timed_out and hold["expires_at"] > now:
            return Outcome(error=FailedPrecondition("hold is not due", code="HOLD_NOT_DUE"))
        return Outcome(await self._void(conn, hold, wanted, now))

    async def _with_balance(self, conn: Connection, outcome: Outcome[Spend]) -> Outcome[Spend]:
        if outcome.value is None:
            return outcome
        balance = await ledger.read_balance(conn, uuid.UUID(outcome.value.member_id))
        value = outcome.value
        return Outcome(
            Spend(
                value.transaction_id,
                value.member_id,
                value.points,
                balance.available if balance else 0,
                hold_id=value.hold_id,
                hold_status=value.hold_status,
                replayed=True,
            )
        )

    async def _clawbacks(
        self, conn: Connection, hold: Any
    ) -> tuple[dict[uuid.UUID, int], list[tuple[uuid.UUID, int, Any]]]:
        """What refunds claim back from this hold's points, by lot, and the
        hold's takes with their lots."""
        takes = await ledger.hold_takes(conn, hold["transaction_id"])
        lots = await ledger.lots_by_id(conn, [lot for lot, _ in takes])
        claws = {lot: min(n, lots[lot]["clawback"]) for lot, n in takes if lots[lot]["clawback"]}
        return claws, [(lot, n, lots[lot]) for lot, n in takes]

    async def _void(self, conn: Connection, hold: Any, status: str, now: datetime) -> Spend:
        """Give a hold's points back to the lots they came from, with their
        original expiry (a lot that lapsed meanwhile lapses again at once).

        Points a refund claimed while they were held are not revived: under
        the debt policy they repay the debt the refund booked for them (what
        the member already repaid otherwise comes back to them), under the
        report policy they go back to the brand."""
        txn = uuid.uuid4()
        member, points = hold["member_id"], hold["points"]
        claws, takes = await self._clawbacks(conn, hold)
        clawed = sum(claws.values())
        repay = reverse = 0
        if clawed and self.policy.shortfall is ShortfallPolicy.DEBT:
            owed = await ledger.read_balance(conn, member)
            repay = min(clawed, owed.debt if owed else 0)
        elif clawed:
            reverse = clawed
        # Which lots keep what they claimed: the repaid or reversed points
        # leave from the claiming lots, in the order of the hold's takes.
        kept, left = {}, repay + reverse
        for lot, _n, _row in takes:
            kept[lot] = min(left, claws.get(lot, 0))
            left -= kept[lot]
        changes = [
            LotChange(lot, n - kept[lot], "active" if row["status"] == "expired" else None)
            for lot, n, row in takes
            if n - kept[lot]
        ]
        back = points - repay - reverse
        entries = [Entry("member_held", member, -points)]
        if back:
            entries.append(Entry("member_wallet", member, back))
        if repay:
            entries.append(Entry("member_debt", member, repay))
        if reverse:
            entries.append(Entry("issued_liability", None, reverse))
        balance = await ledger.post(
            conn,
            Posting(
                transaction_id=txn,
                member_id=member,
                kind="hold_void",
                idempotency_key=f"hold_void:{hold['id']}",
                amount=points,
                entries=entries,
                balance=BalanceDelta(held=-points, available=back, debt=-repay),
                lot_changes=changes,
                reference=str(hold["id"]),
                rule={"clawback": clawed, "repaid": repay, "reversed": reverse} if clawed else {},
            ),
        )
        assert balance is not None
        lapsed = [
            row["expires_at"] for lot, n, row in takes if n - kept[lot] and row["expires_at"] <= now
        ]
        if lapsed:
            # A lapsed lot holds points again until maintain lapses it below
            # (the job may have raised the lots' expiry floor past it while
            # the hold had all its points): the lot read must reach it.
            await ledger.lower_expiry_floor(conn, min(lapsed))
        if claws:
            await ledger.change_clawback(conn, {lot: -c for lot, c in claws.items()})
        # The call stays outside the assert (`python -O` drops asserts).
        resolved = await ledger.resolve_hold(conn, hold["id"], status, txn, now)
        assert resolved, "the member's lock serialises resolutions"
        state = await self.maintain(conn, member, now)
        assert state is not None
        return Spend(
            str(txn),
            str(member),
            points,
            state.balance.available,
            [(str(lot), n) for lot, n, _row in takes],
            hold_id=str(hold["id"]),
            hold_status=status,
        )

    async def void_holds_of(
        self,
        conn: Connection,
        member: uuid.UUID,
        now: datetime,
        lots: set[uuid.UUID] | None = None,
    ) -> None:
        """Void the member's open holds (only those that took from `lots`, when given)."""
        rows = await conn.fetch(
            "SELECT h.id FROM rewards.points_holds h WHERE h.member_id = $1 AND h.status = 'held'"
            " AND ($2::uuid[] IS NULL OR EXISTS (SELECT 1 FROM rewards.points_lot_movements m"
            "  WHERE m.transaction_id = h.transaction_id AND m.lot_id = ANY($2::uuid[])))"
            " ORDER BY h.created_at, h.id",
            member,
            None if lots is None else list(lots),
        )
        for row in rows:
            hold = await ledger.get_hold(conn, row["id"])
            await self._void(conn, hold, "voided", now)

    # ---- refunds -----------------------------------------------------------

    async def refund_order(
        self,
        uow: UnitOfWork,
        store_id: str,
        pos_transaction_id: str,
        refund_transaction_id: str,
        refunded_amount_fen: int,
        now: datetime,
    ) -> Outcome[Refund]:
        parse_store_id(store_id)
        check_text(pos_transaction_id, "pos_transaction_id", "POS_TRANSACTION_ID", required=True)
        check_key(refund_transaction_id, "refund_transaction_id")
        # Zero is allowed here only for an order nothing was paid on (checked
        # below, once the order is read): it refunds such an order in full.
        if refunded_amount_fen < 0:
            raise InvalidArgument(
                "refunded_amount_fen must be positive",
                code="INVALID_AMOUNT",
                field="refunded_amount_fen",
            )
        conn = uow.conn
        key = f"refund:{store_id}:{refund_transaction_id}"
        body: dict[str, object] = {
            "store_id": store_id,
            "pos_transaction_id": pos_transaction_id,
            "refund_transaction_id": refund_transaction_id,
            "refunded_amount_fen": refunded_amount_fen,
        }
        _, stored = await self._claim(conn, key, "refund", body, "refund_transaction_id")
        if stored is not None:
            return self._replay(stored, Refund.from_doc)
        order = await ledger.lock_order(conn, store_id, pos_transaction_id)
        if order is None and await ledger.order_archived(conn, store_id, pos_transaction_id):
            # Its month's orders partition was detached: refused by name
            # (stored, replayed to retries), not taken for an order yet to come.
            return await self._reject(
                conn,
                key,
                FailedPrecondition(
                    f"order {pos_transaction_id} at store {store_id} is past the refund horizon:"
                    " its orders partition is archived",
                    code="REFUND_ORDER_ARCHIVED",
                    field="pos_transaction_id",
                ),
            )
        if order is None or order["status"] != "settled":
            # Not stored under the key: a refund may reach us before its order
            # (an offline upload still on its way), and the POS retry after the
            # order lands must apply. The claim is released with this commit.
            await ledger.release_request(conn, key)
            return Outcome(
                error=NotFound(
                    f"no settled order {pos_transaction_id} at store {store_id}",
                    code="UNKNOWN_ORDER",
                    field="pos_transaction_id",
                )
            )
        if await ledger.journal_archived(conn, order["created_at"]):
            # Its earn and redemption lots are found through journal rows that
            # are archived: refused, never computed from a partial journal.
            return await self._reject(
                conn,
                key,
                FailedPrecondition(
                    f"order {pos_transaction_id} at store {store_id} is past the refund horizon:"
                    " its journal partition is archived",
                    code="REFUND_JOURNAL_ARCHIVED",
                    field="pos_transaction_id",
                ),
            )
        before_fen, due_before, restored_before, refund_count = await ledger.refunds_so_far(
            conn, order["id"]
        )
        refundable = order["paid_amount_fen"] - before_fen
        if refunded_amount_fen == 0 and order["paid_amount_fen"] > 0:
            raise InvalidArgument(
                "refunded_amount_fen must be positive",
                code="INVALID_AMOUNT",
                field="refunded_amount_fen",
            )
        if order["paid_amount_fen"] == 0 and refund_count:
            # An order paid entirely with coupons or points is refunded once, in full.
            return await self._reject(
                conn,
                key,
                InvalidArgument(
                    "this order was already refunded in full",
                    code="REFUND_EXCEEDS_ORDER",
                    field="refunded_amount_fen",
                ),
            )
        if refunded_amount_fen > refundable:
            return await self._reject(
                conn,
                key,
                InvalidArgument(
                    f"refunded_amount_fen {refunded_amount_fen} exceeds the {refundable} fen"
                    " still refundable on this order",
                    code="REFUND_EXCEEDS_ORDER",
                    field="refunded_amount_fen",
                ),
            )
        due = refund_points_due(
            order["points_earned"],
            order["paid_amount_fen"],
            before_fen,
            refunded_amount_fen,
            due_before,
        )
        # Points the order spent come back in the same proportion.
        restore = refund_points_due(
            order["points_redeemed"],
            order["paid_amount_fen"],
            before_fen,
            refunded_amount_fen,
            restored_before,
        )
        refund_id = uuid.uuid4()
        if due and self.rules.daily_cap is not None:
            # The points this refund reverses no longer count against the
            # day's cap (nor, once the order is refunded in full, the order).
            whole = before_fen + refunded_amount_fen >= order["paid_amount_fen"]
            await ledger.give_back_to_cap(
                conn,
                order["member_id"],
                "orders",
                period_start(Period.DAY, order["ordered_at"]),
                due,
                1 if whole else 0,
            )
        # The order's points live where its lot is now (a merge moves them).
        # A merge moves lots under both members' locks, so once the lot is
        # seen at the member whose lock we hold, it stays there.
        root = await ledger.order_lot(conn, order["id"], order["created_at"])
        live = await ledger.live_lot(conn, root["id"]) if root else None
        member = live["member_id"] if live is not None else order["member_id"]
        while True:
            await ledger.ensure_account(conn, member)
            state = await self.maintain(conn, member, now)
            assert state is not None
            live = await ledger.live_lot(conn, root["id"]) if root else None
            if live is None or live["member_id"] == member:
                break
            member = live["member_id"]  # moved meanwhile: follow it
        taken = debt = shortfall = 0
        txn_id: uuid.UUID | None = None
        available = state.balance.available
        if due or restore:
            # `live` was read after lazy expiry: an expired lot has nothing to take.
            lot_status = live["status"] if live else "active"
            taken = min(due, live["remaining"]) if live else 0
            if self.policy.shortfall is ShortfallPolicy.DEBT:
                debt = due - taken
            else:
                shortfall = due - taken
            if live and due > taken:
                # Held points are not the member's to keep: what the lot cannot
                # give because an open hold has it is claimed back from that
                # hold (a void reverses it; a post leaves the debt or shortfall).
                unclaimed = await ledger.held_from_lot(conn, live["id"]) - live["clawback"]
                clawed = max(0, min(due - taken, unclaimed))
                if clawed:
                    await ledger.change_clawback(conn, {live["id"]: clawed})
            account = "member_pending" if lot_status == "pending" else "member_wallet"
            entries: list[Entry] = []
            if taken or debt:
                entries.append(Entry("issued_liability", None, taken + debt))
            if taken:
                entries.append(Entry(account, member, -taken))
            if debt:
                entries.append(Entry("member_debt", member, -debt))
            new_lots = []
            # Restored points repay debt first (docs/ledger.md, "Debt"),
            # including the debt this refund books.
            repay = min(restore, state.balance.debt + debt)
            if restore:
                entries.append(Entry("redeemed", None, -restore))
                if restore - repay:
                    entries.append(Entry("member_wallet", member, restore - repay))
                    new_lots = await self._restored_lots(
                        conn, order["id"], order["created_at"], restore - repay, now
                    )
                if repay:
                    entries.append(Entry("member_debt", member, repay))
            if entries:
                txn_id = uuid.uuid4()
                balance = await ledger.post(
                    conn,
                    Posting(
                        transaction_id=txn_id,
                        member_id=member,
                        kind="refund",
                        idempotency_key=key,
                        amount=taken + debt + restore,
                        entries=entries,
                        balance=BalanceDelta(
                            available=(-taken if account == "member_wallet" else 0)
                            + restore
                            - repay,
                            pending=-taken if account == "member_pending" else 0,
                            debt=debt - repay,
                        ),
                        lot_changes=[LotChange(live["id"], -taken)] if live and taken else [],
                        new_lots=new_lots,
                        order_id=order["id"],
                        reference=str(refund_id),
                    ),
                )
                assert balance is not None
                available = balance.available
                if restore:
                    # A restored lot whose expiry has passed lapses at once.
                    again = await self.maintain(conn, member, now)
                    assert again is not None
                    available = again.balance.available
        await ledger.insert_refund(
            conn,
            {
                "id": refund_id,
                "order_id": order["id"],
                "store_id": store_id,
                "refund_transaction_id": refund_transaction_id,
                "refunded_amount_fen": refunded_amount_fen,
                "points_due": due,
                "points_reversed": taken,
                "points_debt": debt,
                "points_shortfall": shortfall,
                "points_restored": restore,
                "transaction_id": txn_id,
            },
        )
        await uow.emit(
            events_pb2.OrderRefunded(
                refund_id=str(refund_id),
                order_id=str(order["id"]),
                member_id=str(order["member_id"]),
                store_id=store_id,
                refunded_amount_fen=refunded_amount_fen,
                points_reversed=taken + debt,
                refunded_at=timestamp(now),
            ),
            member_id=str(order["member_id"]),
        )
        result = Refund(
            str(refund_id),
            str(order["id"]),
            str(member),
            refunded_amount_fen,
            due,
            taken,
            debt,
            shortfall,
            available,
            points_restored=restore,
        )
        await ledger.finish_request(conn, key, "ok", result.doc())
        return Outcome(result)

    async def _restored_lots(
        self,
        conn: Connection,
        order_id: uuid.UUID,
        order_created_at: datetime,
        points: int,
        now: datetime,
    ) -> list[NewLot]:
        """New lots for redeemed points given back, each with the expiry of the
        lot it was spent from (latest-expiring first) and a link to it."""
        spent = await ledger.order_redemption_lots(conn, order_id, order_created_at)
        lots = []
        left = points
        for row in spent:
            take = min(left, row["points"])
            if take <= 0:
                break
            left -= take
            lots.append(
                NewLot(
                    uuid.uuid4(),
                    take,
                    "active",
                    row["earned_at"],
                    row["expires_at"],
                    origin_lot_id=row["lot_id"],
                    root_lot_id=row["root_lot_id"],
                )
            )
        assert left == 0, "an order never restores more than it redeemed"
        return lots

    # ---- non-order actions -----------------------------------------------------

    async def record_action(
        self,
        uow: UnitOfWork,
        member_id: str,
        action: str,
        idempotency_key: str,
        now: datetime,
    ) -> Outcome[Adjustment]:
        """Points for a check-in, review, tea-residue recycling or referral,
        within the action's per-period cap (a refusal past it is stored)."""
        member = _uuid(member_id)
        rule = self.rules.action(action)
        key = f"action:{check_key(idempotency_key)}"
        conn = uow.conn
        await refuse_erased(conn, member)
        _, stored = await self._claim(
            conn, key, "action", {"member_id": str(member), "action": action}
        )
        if stored is not None:
            return self._replay(stored, Adjustment.from_doc)
        await ledger.ensure_account(conn, member)
        state = await self.maintain(conn, member, now)
        assert state is not None
        _, allowed = await ledger.count_against_cap(
            conn,
            member,
            f"action:{action}",
            period_start(rule.period, now),
            rule.points,
            None,
            rule.max_per_period,
        )
        if not allowed:
            return await self._reject(
                conn,
                key,
                FailedPrecondition(
                    f"{action} earns at most {rule.max_per_period} time(s) per {rule.period.value}",
                    code="ACTION_CAP_REACHED",
                    field="action",
                ),
            )
        txn = uuid.uuid4()
        points = rule.points
        repay = min(state.balance.debt, points)
        entries = [Entry("issued_liability", None, -points)]
        if points - repay:
            entries.append(Entry("member_wallet", member, points - repay))
        if repay:
            entries.append(Entry("member_debt", member, repay))
        balance = await ledger.post(
            conn,
            Posting(
                transaction_id=txn,
                member_id=member,
                kind="earn",
                idempotency_key=key,
                amount=points,
                entries=entries,
                balance=BalanceDelta(available=points - repay, debt=-repay, lifetime_earned=points),
                new_lots=[
                    NewLot(
                        uuid.uuid4(),
                        points - repay,
                        "active",
                        now,
                        self.policy.expiry.expires_at(now),
                    )
                ]
                if points - repay
                else [],
                rule={
                    "action": action,
                    "points": points,
                    "period": rule.period.value,
                    "max_per_period": rule.max_per_period,
                },
                reference=action,
            ),
        )
        assert balance is not None
        result = Adjustment(str(txn), str(member), points, balance.available)
        await ledger.finish_request(conn, key, "ok", result.doc())
        return Outcome(result)

    # ---- operators -----------------------------------------------------------

    async def adjust(
        self,
        uow: UnitOfWork,
        member_id: str,
        points: int,
        operator_id: str,
        reason: str,
        idempotency_key: str,
        now: datetime,
    ) -> Outcome[Adjustment]:
        """A manual credit (points > 0, a new lot) or debit (points < 0, from the
        soonest-expiring lots), with the operator and the reason on the journal."""
        member = _uuid(member_id)
        if points == 0:
            raise InvalidArgument("points must not be zero", code="INVALID_POINTS", field="points")
        check_points(abs(points), "points")
        check_text(operator_id, "operator_id", "OPERATOR_ID", required=True)
        check_text(reason, "reason", "REASON", required=True)
        key = f"adjust:{check_key(idempotency_key)}"
        conn = uow.conn
        refused = (await self.member_refusals([member])).get(member)
        if refused is not None:
            raise refused
        sent = member
        # As checkout and bulk earn: an absorbed (merged) id is its survivor's
        # (the stored request keeps the id sent, so a retry still matches).
        await members.hold_members(conn, [sent])
        member = await merges.holder_of(conn, sent)
        if member != sent:
            await members.hold_members(conn, [member])
            await refuse_erased(conn, sent)
        await refuse_erased(conn, member)
        _, stored = await self._claim(
            conn,
            key,
            "adjust",
            {"member_id": str(sent), "points": points, "operator": operator_id, "reason": reason},
        )
        if stored is not None:
            return self._replay(stored, Adjustment.from_doc)
        if points > 0:
            await ledger.ensure_account(conn, member)
        state = await self.maintain(conn, member, now)
        if state is None:
            # A debit of a member who never earned: nothing to take.
            return await self._reject(conn, key, insufficient(member, -points, Balance(), "points"))
        txn = uuid.uuid4()
        if points > 0:
            lot = NewLot(uuid.uuid4(), points, "active", now, self.policy.expiry.expires_at(now))
            posting = Posting(
                transaction_id=txn,
                member_id=member,
                kind="adjust",
                idempotency_key=key,
                amount=points,
                entries=[
                    Entry("member_wallet", member, points),
                    Entry("adjustments", None, -points),
                ],
                balance=BalanceDelta(available=points),
                new_lots=[lot],
                operator_id=operator_id,
                reason=reason,
            )
        else:
            takes = allocate(state.lots, -points, now)
            if takes is None:
                return await self._reject(
                    conn, key, insufficient(member, -points, state.balance, "points")
                )
            entries, changes = spend_entries(takes, member, "adjustments", -points)
            posting = Posting(
                transaction_id=txn,
                member_id=member,
                kind="adjust",
                idempotency_key=key,
                amount=-points,
                entries=entries,
                balance=BalanceDelta(available=points),
                lot_changes=changes,
                operator_id=operator_id,
                reason=reason,
            )
        balance = await ledger.post(conn, posting)
        assert balance is not None
        result = Adjustment(str(txn), str(member), points, balance.available)
        await ledger.finish_request(conn, key, "ok", result.doc())
        return Outcome(result)

    # ---- merge / unmerge -------------------------------------------------------

    async def merge(
        self, uow: UnitOfWork, merge_id: str, survivor_id: str, absorbed_id: str, now: datetime
    ) -> bool:
        """Move the absorbed member's lots (and debt) to the survivor, keeping
        expiry and a link to the original lot. False when already done."""
        survivor, absorbed = (
            _uuid(survivor_id, "survivor_member_id"),
            _uuid(absorbed_id, "absorbed_member_id"),
        )
        return await self._move(
            uow.conn, f"merge:{merge_id}", "merge", absorbed, survivor, None, now
        )

    async def unmerge(
        self, uow: UnitOfWork, merge_id: str, survivor_id: str, restored_id: str, now: datetime
    ) -> bool:
        """Move back what merge `merge_id` moved and the survivor still holds."""
        survivor, restored = (
            _uuid(survivor_id, "survivor_member_id"),
            _uuid(restored_id, "restored_member_id"),
        )
        merge_txn = await ledger.transaction_with_key(uow.conn, f"merge:{merge_id}")
        if merge_txn is None:
            return False  # the merge moved nothing (or never reached us)
        return await self._move(
            uow.conn, f"unmerge:{merge_id}", "unmerge", survivor, restored, merge_txn["id"], now
        )

    async def _move(
        self,
        conn: Connection,
        key: str,
        kind: str,
        source: uuid.UUID,
        target: uuid.UUID,
        from_merge: uuid.UUID | None,
        now: datetime,
    ) -> bool:
        if await ledger.transaction_with_key(conn, key) is not None:
            return False
        for member in sorted((source, target)):
            await ledger.ensure_account(conn, member)
            await ledger.lock_member(conn, member)
        moved: set[uuid.UUID] | None = None
        if from_merge is not None:
            moved = {
                r["id"]
                for r in await conn.fetch(
                    "SELECT id FROM rewards.points_lots WHERE transaction_id = $1", from_merge
                )
            }
        # In-flight checkouts that took from the lots that move are cancelled
        # first (a merge moves all the absorbed member's lots; an unmerge only
        # what the merge brought: the survivor's own checkouts go on).
        await self.void_holds_of(conn, source, now, moved)
        state = await self.maintain(conn, source, now)
        await self.maintain(conn, target, now)
        assert state is not None
        lots = state.lots
        debt = state.balance.debt
        if from_merge is not None:
            assert moved is not None
            lots = [lot for lot in lots if lot.lot_id in moved]
            merged_debt = await conn.fetchval(
                "SELECT coalesce(sum(amount), 0) FROM rewards.points_entries"
                " WHERE transaction_id = $1 AND account = 'member_debt' AND member_id = $2",
                from_merge,
                target,
            )
            debt = min(debt, int(merged_debt))
        active = sum(lot.remaining for lot in lots if lot.status == "active")
        pending = sum(lot.remaining for lot in lots if lot.status == "pending")
        if not (active or pending or debt):
            return False
        roots = await ledger.lots_by_id(conn, [lot.lot_id for lot in lots])
        entries: list[Entry] = []
        for account, amount in (("member_wallet", active), ("member_pending", pending)):
            if amount:
                entries += [Entry(account, source, -amount), Entry(account, target, amount)]
        if debt:
            entries += [Entry("member_debt", source, debt), Entry("member_debt", target, -debt)]
        txn = uuid.uuid4()
        balance = await ledger.post(
            conn,
            Posting(
                transaction_id=txn,
                member_id=target,
                kind=kind,
                idempotency_key=key,
                amount=active + pending + debt,
                entries=entries,
                balance=BalanceDelta(available=active, pending=pending, debt=debt),
                lot_changes=[LotChange(lot.lot_id, -lot.remaining, "moved") for lot in lots],
                new_lots=[
                    NewLot(
                        uuid.uuid4(),
                        lot.remaining,
                        lot.status,
                        lot.earned_at or now,
                        lot.expires_at,
                        lot.activates_at,
                        origin_lot_id=lot.lot_id,
                        root_lot_id=roots[lot.lot_id]["root_lot_id"],
                    )
                    for lot in lots
                ],
                counterpart_member_id=source,
            ),
        )
        assert balance is not None
        shifted = await ledger.shift_balance(
            conn, source, BalanceDelta(available=-active, pending=-pending, debt=-debt)
        )
        assert shifted is not None
        return True

    # ---- jobs ------------------------------------------------------------------

    async def expire_member(self, uow: UnitOfWork, member_id: uuid.UUID, now: datetime) -> None:
        await self.maintain(uow.conn, member_id, now)

    async def announce_expiring(self, uow: UnitOfWork, now: datetime, limit: int = 1000) -> int:
        """Emit PointsExpiringSoon once per lot, `expiring_soon_days` ahead."""
        horizon = now + timedelta(days=self.policy.expiring_soon_days)
        rows = await ledger.claim_expiring_soon(uow.conn, now, horizon, limit)
        for row in rows:
            await uow.emit(
                events_pb2.PointsExpiringSoon(
                    member_id=str(row["member_id"]),
                    points=row["points"],
                    expires_at=timestamp(row["expires_at"]),
                    points_balance=row["balance"],
                ),
                member_id=str(row["member_id"]),
            )
        return len(rows)


__all__ = ["MAX_POINTS_PER_OPERATION", "Outcome", "PointsLedger"]
