"""Use cases of the member service, each given a unit of work."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from loyalty.events.v1 import events_pb2
from servicekit.db import UnitOfWork
from servicekit.errors import FailedPrecondition, InvalidArgument, NotFound

from . import repository as repo
from .domain import IdType, ObservedIdentifier, dedupe, mask
from .pii import PiiVault
from .repository import IdentityRow, MemberRecord

MAX_IDENTIFIERS_PER_CALL = 10


@dataclass(frozen=True)
class Identified:
    member: MemberRecord
    created: bool


class MemberHandlers:
    def __init__(self, vault: PiiVault) -> None:
        self._vault = vault

    def _row(self, ident: ObservedIdentifier) -> IdentityRow:
        return IdentityRow(
            id_type=ident.id_type.value,
            namespace=ident.namespace,
            value_hash=self._vault.lookup_hash(ident.key),
            value_cipher=self._vault.encrypt(ident.value),
            value_masked=mask(ident.id_type, ident.value),
            verified=ident.verified,
        )

    async def identify(
        self, uow: UnitOfWork, observed: list[ObservedIdentifier], source: str
    ) -> Identified:
        """Find the member owning the identifiers, or enrol one; attach the rest.

        Identifiers that point at two different members are a conflict for the
        OneID merge process, never a silent merge here.
        """
        if not observed:
            raise InvalidArgument(
                "at least one identifier is required", code="NO_IDENTIFIER", field="identifiers"
            )
        if len(observed) > MAX_IDENTIFIERS_PER_CALL:
            raise InvalidArgument(
                f"at most {MAX_IDENTIFIERS_PER_CALL} identifiers per call",
                code="TOO_MANY_IDENTIFIERS",
                field="identifiers",
            )
        idents = dedupe(observed)
        rows = [self._row(i) for i in idents]
        conn = uow.conn
        await repo.lock_identifier_hashes(conn, [r.value_hash for r in rows])
        owners = await repo.members_owning(conn, rows)
        member_ids = sorted({m for m, _ in owners})
        phone = next((i for i in idents if i.id_type is IdType.PHONE), None)
        phone_masked = mask(IdType.PHONE, phone.value) if phone else ""
        if len(member_ids) > 1:
            raise FailedPrecondition(
                "the identifiers belong to different members; merging them needs OneID review",
                code="IDENTITY_CONFLICT",
                field="identifiers",
            )
        if member_ids:
            member = await repo.get_member(conn, member_ids[0])
            assert member is not None, "identity points at a missing member"
            created = False
            if phone_masked and not member.phone_masked:
                await repo.set_phone_masked_if_missing(conn, member.member_id, phone_masked)
                member = MemberRecord(
                    member.member_id, member.member_number, member.registered_at, phone_masked
                )
        else:
            member = await repo.insert_member(conn, source, phone_masked)
            created = True
            registered_at = timestamp_pb2.Timestamp()
            registered_at.FromDatetime(member.registered_at)
            await uow.emit(
                events_pb2.MemberRegistered(
                    member_id=member.member_id, source=source, registered_at=registered_at
                ),
                member_id=member.member_id,
            )
        await repo.attach_identities(conn, member.member_id, rows, source)
        return Identified(member, created)

    async def get(self, uow: UnitOfWork, member_id: str) -> MemberRecord:
        try:
            uuid.UUID(member_id)
        except ValueError:
            raise InvalidArgument(
                "member_id is not a member id", code="INVALID_MEMBER_ID", field="member_id"
            ) from None
        member = await repo.get_member(uow.conn, member_id)
        if member is None:
            raise NotFound(
                f"member {member_id} does not exist", code="UNKNOWN_MEMBER", field="member_id"
            )
        return member
