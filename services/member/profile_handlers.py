"""Use cases of a member's person, each given a unit of work: reads with PII
(audited) and re-encryption under the active key, the profile (observations
merged into one effective value per field), consent with history, and erasure
of a whole cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

from loyalty.events.v1 import events_pb2
from servicekit.db import Connection, UnitOfWork
from servicekit.errors import (
    InvalidArgument,
)

from . import cache
from . import oneid_repository as oneid_repo
from . import profile_repository as profile_repo
from . import repository as repo
from .domain import (
    MAX_PROFILE_VALUE,
    ConsentChannel,
    ConsentPurpose,
    ConsentRecord,
    ConsentState,
    IdType,
    ObservedIdentifier,
    check_consent_key,
    effective_consent,
    effective_profile,
    event_channel,
    is_time_zone,
)
from .handlers_common import HandlersBase, LostRace, parse_member_id, required_text, timestamp
from .repository import MemberRecord

# A change to one of these is announced as MemberZoneSet (engagement's zone).
ZONE_FIELDS = frozenset({"time_zone", "registration_store_id"})


# ResolveMemberIds' cap: a bulk earn chunk's ids in one call, one statement.
MAX_RESOLVE_IDS = 1000


@dataclass(frozen=True)
class ResolvedId:
    """A member id's state: "active", "absorbed" (survivor = its live root),
    "erased" (it or the member it was merged into) or "unknown"."""

    member_id: str
    state: str
    survivor_id: str = ""


@dataclass(frozen=True)
class Profile:
    member_id: str
    fields: dict[str, str]
    consents: dict[tuple[ConsentPurpose, ConsentChannel], ConsentRecord]

    @property
    def personalisation_allowed(self) -> bool:
        record = self.consents.get((ConsentPurpose.PERSONALISATION, ConsentChannel.ALL))
        return bool(record and record.granted)


async def consent_state(conn: Connection, root: str) -> ConsentState:
    records = await profile_repo.consents(conn, await repo.cluster_of(conn, root))
    return effective_consent(records, root, await oneid_repo.last_merge_at(conn, root))


async def emit_consent(
    uow: UnitOfWork,
    member_id: str,
    purpose: ConsentPurpose,
    channel: ConsentChannel,
    granted: bool,
    source: str,
    recorded_at: datetime,
) -> None:
    await uow.emit(
        events_pb2.ConsentChanged(
            member_id=member_id,
            purpose=purpose.value,
            channel=event_channel(channel),
            granted=granted,
            source=source,
            recorded_at=timestamp(recorded_at),
        ),
        member_id=member_id,
    )


class ProfileHandlers(HandlersBase):
    # ---- reads and PII -----------------------------------------------------------

    def _pii_reader(self, include_pii: bool, accessor: str, purpose: str) -> tuple[str, str] | None:
        if not include_pii:
            return None
        return required_text(accessor, "accessor"), required_text(purpose, "purpose", 500)

    async def resolve_ids(self, uow: UnitOfWork, member_ids: list[str]) -> list[ResolvedId]:
        """Each id's state, in the order asked (duplicates answered each time),
        as GetMember would judge it (_live_root), in one query."""
        if len(member_ids) > MAX_RESOLVE_IDS:
            raise InvalidArgument(
                f"at most {MAX_RESOLVE_IDS} member ids per call, got {len(member_ids)}",
                code="TOO_MANY_MEMBER_IDS",
                field="member_ids",
            )
        ids = [parse_member_id(m, f"member_ids[{n}]") for n, m in enumerate(member_ids)]
        found = await repo.resolve_many(uow.conn, ids) if ids else {}
        answers = []
        for asked, m in zip(member_ids, ids, strict=True):
            resolved = found.get(m)
            if resolved is None:
                answers.append(ResolvedId(asked, "unknown"))
            elif resolved[1] == "erased":
                answers.append(ResolvedId(asked, "erased"))
            elif resolved[0] != m:
                answers.append(ResolvedId(asked, "absorbed", resolved[0]))
            else:
                answers.append(ResolvedId(asked, "active"))
        return answers

    async def get(
        self,
        uow: UnitOfWork,
        member_id: str,
        include_pii: bool = False,
        accessor: str = "",
        purpose: str = "",
    ) -> tuple[MemberRecord, str]:
        """The member (the survivor, for an absorbed id) and, with PII, its phone."""
        reader = self._pii_reader(include_pii, accessor, purpose)
        root = await self._live_root(uow.conn, member_id)
        member = await self._member(uow.conn, root)
        phone = ""
        if reader is not None:
            blob = await profile_repo.phone_cipher(uow.conn, [root])
            phone = self._vault.decrypt(blob) if blob else ""
            await profile_repo.audit_pii_read(uow.conn, root, reader[0], reader[1], ["phone"])
        return member, phone

    async def identities(
        self,
        uow: UnitOfWork,
        member_id: str,
        include_pii: bool = False,
        accessor: str = "",
        purpose: str = "",
    ) -> list[tuple[profile_repo.IdentityView, str]]:
        reader = self._pii_reader(include_pii, accessor, purpose)
        root = await self._live_root(uow.conn, member_id)
        views = await profile_repo.identities_of(uow.conn, [root])
        if reader is None:
            return [(v, "") for v in views]
        await profile_repo.audit_pii_read(uow.conn, root, reader[0], reader[1], ["identities"])
        return [(v, self._vault.decrypt(v.value_cipher)) for v in views]

    async def reencrypt(self, uow: UnitOfWork, batch_size: int) -> tuple[int, int]:
        if batch_size < 0 or batch_size > 10_000:
            raise InvalidArgument(
                "batch_size is 0..10000", code="INVALID_BATCH_SIZE", field="batch_size"
            )
        key_id = self._vault.active_key_id
        rows = await profile_repo.ciphers_not_under(uow.conn, key_id, batch_size or 1000)
        await profile_repo.replace_ciphers(
            uow.conn, key_id, [(i, self._vault.encrypt(self._vault.decrypt(b))) for i, b in rows]
        )
        return len(rows), await profile_repo.count_not_under(uow.conn, key_id)

    # ---- profile and consent ------------------------------------------------------

    async def profile(self, uow: UnitOfWork, member_id: str) -> Profile:
        conn = uow.conn
        root = await self._live_root(conn, member_id)
        cluster = await repo.cluster_of(conn, root)
        fields = effective_profile(await profile_repo.observations(conn, cluster))
        records = await profile_repo.consents(conn, cluster)
        consents = effective_consent(records, root, await oneid_repo.last_merge_at(conn, root))
        return Profile(root, fields, consents)

    async def update_profile(
        self, uow: UnitOfWork, member_id: str, values: dict[str, str], source: str, verified: bool
    ) -> Profile:
        source = required_text(source, "source")
        if not values:
            raise InvalidArgument(
                "set at least one profile field", code="NO_PROFILE_FIELD", field="nickname"
            )
        clean: dict[str, str] = {}
        for name, raw in values.items():
            value = raw.strip()
            if len(value) > MAX_PROFILE_VALUE:
                raise InvalidArgument(
                    f"{name} is longer than {MAX_PROFILE_VALUE} characters",
                    code="VALUE_TOO_LONG",
                    field=name,
                )
            if name == "birthday" and value:
                try:
                    day = date.fromisoformat(value)
                except ValueError:
                    raise InvalidArgument(
                        "birthday is YYYY-MM-DD", code="INVALID_BIRTHDAY", field="birthday"
                    ) from None
                if day > datetime.now(UTC).date() or day.year < 1900:
                    raise InvalidArgument(
                        "birthday is not a plausible date",
                        code="INVALID_BIRTHDAY",
                        field="birthday",
                    )
            if name == "time_zone" and value and not is_time_zone(value):
                raise InvalidArgument(
                    "time_zone is an IANA zone name, e.g. Asia/Shanghai",
                    code="INVALID_TIME_ZONE",
                    field="time_zone",
                )
            clean[name] = value
        root = await self._live_root(uow.conn, member_id)
        await profile_repo.add_observations(uow.conn, root, clean, source, verified)
        profile = await self.profile(uow, root)
        if "birthday" in clean:
            await self._emit_birthday(uow, root, profile.fields.get("birthday", ""))
        if "nickname" in clean:
            # Engagement's `{nickname}` template variable (the effective value).
            await uow.emit(
                events_pb2.NicknameSet(
                    member_id=root,
                    nickname=profile.fields.get("nickname", ""),
                    recorded_at=timestamp(datetime.now(UTC)),
                ),
                member_id=root,
            )
        if ZONE_FIELDS & clean.keys():
            # Engagement's quiet hours and caps follow the member's zone.
            await uow.emit(
                events_pb2.MemberZoneSet(
                    member_id=root,
                    time_zone=profile.fields.get("time_zone", ""),
                    registration_store_id=profile.fields.get("registration_store_id", ""),
                    recorded_at=timestamp(datetime.now(UTC)),
                ),
                member_id=root,
            )
        return profile

    async def _emit_birthday(self, uow: UnitOfWork, member_id: str, birthday: str) -> None:
        """Month and day of the effective birthday (never the year: engagement's
        birthday-month journeys need no more); 0/0 when there is none."""
        day = date.fromisoformat(birthday) if birthday else None
        await uow.emit(
            events_pb2.BirthdaySet(
                member_id=member_id,
                month=day.month if day else 0,
                day=day.day if day else 0,
                recorded_at=timestamp(datetime.now(UTC)),
            ),
            member_id=member_id,
        )

    async def set_consent(
        self,
        uow: UnitOfWork,
        member_id: str,
        purpose: ConsentPurpose,
        channel: ConsentChannel,
        granted: bool,
        source: str,
        actor: str,
    ) -> Profile:
        check_consent_key(purpose, channel)
        source = required_text(source, "source")
        actor = required_text(actor, "actor")
        root = await self._live_root(uow.conn, member_id)
        at = await profile_repo.add_consent(
            uow.conn, root, purpose, channel, granted, source, actor, self.now()
        )
        # A choice on the root is its effective answer (the latest after any merge).
        await emit_consent(uow, root, purpose, channel, granted, source, at)
        return await self.profile(uow, root)

    async def consent_history(self, uow: UnitOfWork, member_id: str) -> list[ConsentRecord]:
        root = await self._live_root(uow.conn, member_id)
        return await profile_repo.consents(uow.conn, await repo.cluster_of(uow.conn, root))

    # ---- erasure ------------------------------------------------------------------

    async def erase(
        self, uow: UnitOfWork, member_id: str, operator: str, reason: str
    ) -> tuple[list[str], int]:
        operator = required_text(operator, "operator")
        reason = required_text(reason, "reason", 500)
        conn = uow.conn
        root = await self._live_root(conn, member_id)
        cluster = await repo.cluster_of(conn, root)
        states = await repo.lock_members(conn, cluster)
        if states[root].merged_into or set(await repo.cluster_of(conn, root)) != set(cluster):
            raise LostRace()
        hashes = []
        for view in await profile_repo.identities_of(conn, cluster):
            id_type = IdType(view.id_type)
            if id_type is IdType.MEMBER_NUMBER:
                continue  # never reissued: nothing to recognise later
            value = self._vault.decrypt(view.value_cipher)
            hashes.append(
                self._vault.suppression_hash(
                    ObservedIdentifier(id_type, value, view.namespace, False).key
                )
            )
        await profile_repo.suppress(conn, hashes)
        # Before the identities are deleted: their entries must go.
        await cache.touch(conn, cluster)
        cache.regroup()
        await profile_repo.erase_cluster(conn, cluster)
        await profile_repo.audit_pii_read(conn, root, operator, f"erasure: {reason}", ["erasure"])
        await uow.emit(
            events_pb2.MemberErased(member_ids=cluster, erased_at=timestamp(datetime.now(UTC))),
            member_id=root,
        )
        return cluster, len(hashes)
