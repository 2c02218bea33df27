"""OneID use cases of the member service, each given a unit of work: identify,
merge and unmerge, the review queue, quarantine, resolving an identifier, and
the dynamic member code a till scans.

Identify (OneID) in one transaction:
1. junk values (blocklist) are dropped; a call of nothing but junk is refused;
2. advisory locks on the sorted keyed hashes of the request key and every
   identifier serialise calls that share one;
3. the identifiers' owners are looked up, an identifier seen with more than
   N members is quarantined, the owners' rows are locked in id order and the
   lookup is repeated: if anything moved meanwhile (a merge or unmerge that
   committed between our read and our lock) the transaction is retried;
4. owners are merged only when the call carries a merge key (policy) and the
   union breaks no per-type limit and no do-not-merge pair; a limit break
   opens a review instead;
5. unowned identifiers are attached to the member the call resolved to.
"""

from __future__ import annotations

import itertools
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from loyalty.events.v1 import events_pb2
from servicekit.db import Connection, UnitOfWork
from servicekit.errors import (
    Conflict,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

from . import cache
from . import oneid_repository as oneid_repo
from . import profile_repository as profile_repo
from . import repository as repo
from .domain import (
    CODE_LIFETIME_SECONDS,
    CODE_REFRESH_SECONDS,
    Holding,
    IdType,
    ObservedIdentifier,
    choose_survivor,
    consent_changes,
    limit_violations,
    mask,
    member_code,
    member_code_is_genuine,
)
from .handlers_common import (
    MAX_TEXT,
    HandlersBase,
    LostRace,
    bad_page_token,
    decode_page_token,
    encode_page_token,
    page_limit,
    parse_member_id,
    required_text,
    timestamp,
)
from .oneid_repository import IdentityRow, MergeRow, ReviewRow
from .profile_handlers import consent_state, emit_consent
from .repository import MemberRecord
from .velocity import Burst

# Issued member codes are kept this long after they expire (so a late scan is
# told EXPIRED, not INVALID), then pruned.
CODE_FORGET_AFTER_SECONDS = 600

MAX_IDENTIFIERS_PER_CALL = 10

Ref = tuple[str, str, bytes]


@dataclass(frozen=True)
class Identified:
    member: MemberRecord | None
    created: bool
    merged_member_ids: list[str] = field(default_factory=list)
    review_id: str = ""
    # (index in the request, reason)
    ignored: list[tuple[int, str]] = field(default_factory=list)
    replayed: bool = False
    # The merges this call made (survivor = member), for the answer to name.
    merges: list[MergeRow] = field(default_factory=list)
    # Raised by the caller after commit: the call's own writes (a quarantine)
    # must persist even though it resolves no member.
    refusal: DomainError | None = None


@dataclass(frozen=True)
class IssuedCode:
    code: str
    expires_at: datetime
    refresh_after_seconds: int


class OneIdHandlers(HandlersBase):
    def _row(self, ident: ObservedIdentifier) -> IdentityRow:
        return IdentityRow(
            id_type=ident.id_type.value,
            namespace=ident.namespace,
            value_hash=self._vault.lookup_hash(ident.key),
            value_cipher=self._vault.encrypt(ident.value),
            value_masked=mask(ident.id_type, ident.value),
            verified=ident.verified,
            key_id=self._vault.active_key_id,
        )

    def lookup_hash(self, ident: ObservedIdentifier) -> bytes:
        """The keyed hash an identifier is stored and cached under."""
        return self._vault.lookup_hash(ident.key)

    def _priority(self, ident: ObservedIdentifier) -> int:
        return self.policy.of(ident.id_type).priority

    # ---- identify ---------------------------------------------------------------

    def _request_hash(self, idents: list[ObservedIdentifier], source: str, reenrol: bool) -> bytes:
        canonical = "\n".join(
            [f"{i.key}|{int(i.verified)}" for i in sorted(idents, key=lambda i: i.key)]
            + [f"source|{source}", f"reenrol|{int(reenrol)}"]
        )
        return self._vault.lookup_hash(canonical)

    async def identify(
        self,
        uow: UnitOfWork,
        observed: list[ObservedIdentifier],
        source: str,
        request_key: str,
        reenrol: bool = False,
        quarantined_types: list[str] | None = None,
    ) -> Identified:
        """Find the member owning the identifiers, enrol one, or merge several.
        The types of identifiers this call quarantined are appended to
        `quarantined_types` (the servicer counts them once the call committed)."""
        request_key = required_text(request_key, "request_key")
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
        if len(source) > MAX_TEXT:
            raise InvalidArgument(
                f"source is longer than {MAX_TEXT} characters",
                code="VALUE_TOO_LONG",
                field="source",
            )
        ignored: list[tuple[int, str]] = []
        # One entry per identifier (the verified copy wins), remembering its index.
        first_index: dict[str, int] = {}
        by_key: dict[str, ObservedIdentifier] = {}
        for n, ident in enumerate(observed):
            if self.policy.is_junk(ident.id_type, ident.value):
                ignored.append((n, "JUNK"))
                continue
            seen = by_key.get(ident.key)
            if seen is None or (ident.verified and not seen.verified):
                by_key[ident.key] = ident
            first_index.setdefault(ident.key, n)
        if not by_key:
            n = ignored[0][0]
            raise InvalidArgument(
                f"identifiers[{n}].value is a placeholder or test value, never an identifier",
                code="JUNK_IDENTIFIER",
                field=f"identifiers[{n}].value",
            )
        idents = sorted(by_key.values(), key=lambda i: i.key)
        conn = uow.conn
        request_hash = self._request_hash(list(by_key.values()), source, reenrol)
        rows = {i.key: self._row(i) for i in idents}
        suppression = {i.key: self._vault.suppression_hash(i.key) for i in idents}
        refs = [rows[i.key].ref for i in idents]

        # Optimistic first pass, without locks: a known member's lookup writes
        # nothing but its idempotency record, whose primary key settles a
        # concurrent call with the same key. One statement reads the owners,
        # so the answer is one consistent snapshot.
        prior, suppressed = await oneid_repo.preflight(
            conn, request_key, list(suppression.values())
        )
        if prior is not None:
            return await self._replay(conn, prior, request_hash)
        if not suppressed:
            found = await oneid_repo.find_identities(conn, refs)
            fast = self._plain_lookup(idents, rows, found)
            if fast is not None:
                outcome = {"merged": [], "review_id": "", "ignored": sorted(ignored)}
                if await oneid_repo.save_request(
                    conn, request_key, request_hash, fast.member_id, False, outcome
                ):
                    return Identified(fast, False, ignored=sorted(ignored))
                # The same key committed meanwhile: answer as a retry.
                prior, _ = await oneid_repo.preflight(conn, request_key, [])
                assert prior is not None, "a conflicting request key must be readable"
                return await self._replay(conn, prior, request_hash)

        # Writing: serialise with every call sharing an identifier or the key,
        # then read again under the locks.
        await oneid_repo.lock_hashes(
            conn,
            [self._vault.lookup_hash(f"request|{request_key}")]
            + [r.value_hash for r in rows.values()],
        )
        prior, suppressed = await oneid_repo.preflight(
            conn, request_key, list(suppression.values())
        )
        if prior is not None:
            return await self._replay(conn, prior, request_hash)
        if suppressed:
            if not reenrol:
                hit = next(i for i in idents if suppression[i.key] in suppressed)
                n = first_index[hit.key]
                raise FailedPrecondition(
                    f"identifiers[{n}] belonged to an erased member; enrolling it again needs"
                    " the person's explicit re-enrolment (reenrol)",
                    code="IDENTIFIER_ERASED",
                    field=f"identifiers[{n}]",
                )
            await profile_repo.unsuppress(conn, sorted(suppressed))
        found = await oneid_repo.find_identities(conn, refs)
        quarantined = {ref for ref, stored in found.items() if stored.quarantined}
        # Quarantined identifiers of nobody are known only from their table.
        quarantined |= await oneid_repo.quarantined_among(conn, [r for r in refs if r not in found])
        call_roots = {found[r].member_id for r in refs if r in found and r not in quarantined}
        links = await oneid_repo.linked_roots(conn, refs)
        for ident in idents:
            ref = rows[ident.key].ref
            if ref in quarantined:
                continue
            prospective = links.get(ref, set()) | call_roots
            if len(prospective) > self.policy.quarantine_after_members:
                row = rows[ident.key]
                at = await oneid_repo.quarantine(conn, row, len(prospective))
                if at is not None:
                    # Reported, not only listed: an alert can fire on it.
                    await uow.emit(
                        events_pb2.IdentifierQuarantined(
                            identifier_type=row.id_type,
                            namespace=row.namespace,
                            value_masked=row.value_masked,
                            linked_members=len(prospective),
                            quarantined_at=timestamp(at),
                        )
                    )
                    if quarantined_types is not None:
                        quarantined_types.append(row.id_type)
                # It resolves nobody from now on.
                await cache.touch(conn, hashes=[rows[ident.key].value_hash])
                quarantined.add(ref)
        active = [i for i in idents if rows[i.key].ref not in quarantined]
        ignored += [(first_index[i.key], "QUARANTINED") for i in idents if i not in active]
        if not active:
            n = min(first_index[i.key] for i in idents)
            return Identified(
                None,
                False,
                ignored=sorted(ignored),
                refusal=FailedPrecondition(
                    f"identifiers[{n}] is quarantined: it links too many members to be trusted",
                    code="IDENTIFIER_QUARANTINED",
                    field=f"identifiers[{n}]",
                ),
            )

        # Owners (identities always sit on a live root: merges move them).
        owner_of = {
            i.key: found[rows[i.key].ref].member_id for i in active if rows[i.key].ref in found
        }
        roots = sorted(set(owner_of.values()))
        states = await repo.lock_members(conn, roots)
        again = await oneid_repo.find_identities(conn, [rows[i.key].ref for i in active])
        if {
            k: again[rows[k].ref].member_id for k in owner_of if rows[k].ref in again
        } != owner_of or any(s.merged_into or s.status != "active" for s in states.values()):
            raise LostRace()
        if any(rows[i.key].ref in again for i in active if i.key not in owner_of):
            raise LostRace()

        best: dict[str, int] = {}
        for ident in active:
            owner = owner_of.get(ident.key)
            if owner is not None:
                best[owner] = max(best.get(owner, -(10**9)), self._priority(ident))
        merge_keys = [i for i in active if self.policy.of(i.id_type).may_merge(i.verified)]
        evidence = [
            f"{i.id_type}:{rows[i.key].value_masked}{' (verified)' if i.verified else ''}"
            for i in active
        ]

        created = False
        merged: list[str] = []
        merges: list[MergeRow] = []
        review_id = ""
        target: str
        if len(roots) > 1 and merge_keys:
            new_holdings = [
                Holding(i.id_type, i.namespace, i.verified) for i in active if i.key not in owner_of
            ]
            held = await oneid_repo.holdings(conn, roots)
            violations = limit_violations(self.policy, [held[r] for r in roots] + [new_holdings])
            apart = await oneid_repo.do_not_merge_among(conn, roots)
            # An operator already said these stay apart: no new review either.
            if violations and not apart:
                review_id = await oneid_repo.open_review(
                    conn,
                    roots,
                    "LIMIT_EXCEEDED:" + ",".join(violations),
                    f"merging would give one member more than allowed: {', '.join(violations)}",
                    evidence,
                )
            if violations or apart:
                target = self._by_priority(best, states)
            else:
                survivor = choose_survivor([(states[r].registered_at, r) for r in roots])
                key_type = max(merge_keys, key=self._priority).id_type
                for absorbed in roots:
                    if absorbed != survivor:
                        record = await self._merge(
                            uow, survivor, absorbed, f"identify:{key_type}", evidence, source, None
                        )
                        merged.append(absorbed)
                        merges.append(record)
                target = survivor
        elif roots:
            target = self._by_priority(best, states)
        else:
            member = await repo.insert_member(conn, source, self.now())
            target = member.member_id
            created = True
            number_ident = ObservedIdentifier(IdType.MEMBER_NUMBER, member.member_number, "", True)
            await oneid_repo.attach_identities(conn, target, [self._row(number_ident)], source)
            await uow.emit(
                events_pb2.MemberRegistered(
                    member_id=target, source=source, registered_at=timestamp(member.registered_at)
                ),
                member_id=target,
            )

        # Attach what nobody owns; upgrade what the target owns unverified.
        held_now = (await oneid_repo.holdings(conn, [target]))[target]
        to_attach: list[IdentityRow] = []
        to_verify: list[int] = []
        phones_changed = bool(merged)
        for ident in sorted(active, key=self._priority, reverse=True):
            owner = owner_of.get(ident.key)
            n = first_index[ident.key]
            if owner is not None and owner != target and owner not in merged:
                ignored.append((n, "OWNED_ELSEWHERE"))
                continue
            holding = Holding(ident.id_type, ident.namespace, ident.verified)
            if owner is None:
                if limit_violations(self.policy, [held_now, [holding]]):
                    ignored.append((n, "LIMIT"))
                    continue
                to_attach.append(rows[ident.key])
                held_now.append(holding)
                phones_changed |= ident.id_type is IdType.PHONE
                continue
            stored = again[rows[ident.key].ref]
            if ident.verified and not stored.verified:
                unverified = Holding(ident.id_type, ident.namespace, False)
                rest = list(held_now)
                rest.remove(unverified)
                if limit_violations(self.policy, [rest, [holding]]):
                    ignored.append((n, "LIMIT"))
                    continue
                to_verify.append(stored.identity_id)
                held_now = [*rest, holding]
                phones_changed |= ident.id_type is IdType.PHONE
        if to_attach:
            await oneid_repo.attach_identities(conn, target, to_attach, source)
        if to_verify:
            await oneid_repo.mark_verified(conn, to_verify)
        if phones_changed:
            await repo.refresh_phone_masked(conn, [target])
        # Evidence for quarantine: who each identifier was seen with. A plain
        # lookup (every identifier already on the target) adds no evidence:
        # those links were written when the identifiers were attached.
        seen_with = set(roots) | {target}
        if len(seen_with) > 1 or len(owner_of) != len(active):
            await oneid_repo.insert_links(
                conn, [(rows[i.key].ref, m) for i in active for m in sorted(seen_with)]
            )
        # What the target and the merged members' identifiers resolve to may
        # have changed (attached, verified, masked phone, moved).
        await cache.touch(conn, [*roots, target])
        ignored.sort()
        # Under the key's lock nobody else writes this key, except an optimistic
        # lookup that committed first: then retry, which replays its answer.
        if not await oneid_repo.save_request(
            conn,
            request_key,
            request_hash,
            target,
            created,
            {
                "merged": merged,
                "review_id": review_id,
                "ignored": ignored,
                "merge_ids": [m.merge_id for m in merges],
            },
        ):
            raise LostRace()
        return Identified(
            await self._member(conn, target), created, merged, review_id, ignored, merges=merges
        )

    def _plain_lookup(
        self,
        idents: list[ObservedIdentifier],
        rows: dict[str, IdentityRow],
        found: dict[Ref, oneid_repo.StoredIdentity],
    ) -> MemberRecord | None:
        """The member when the call is a pure read: every identifier stored on
        one live member, none quarantined, none to upgrade to verified."""
        owner: MemberRecord | None = None
        for ident in idents:
            stored = found.get(rows[ident.key].ref)
            if stored is None or stored.quarantined or not stored.owner_live:
                return None
            if ident.verified and not stored.verified:
                return None
            if owner is not None and owner.member_id != stored.member_id:
                return None
            owner = stored.owner
        return owner

    def _by_priority(self, best: dict[str, int], states: dict[str, repo.MemberState]) -> str:
        """The member of the highest-priority identifier; the oldest on a tie."""
        return min(best, key=lambda m: (-best[m], states[m].registered_at, m))

    async def _replay(
        self, conn: Connection, prior: oneid_repo.PriorRequest, request_hash: bytes
    ) -> Identified:
        if prior.request_hash != request_hash:
            raise Conflict(
                "request_key was already used for different identifiers",
                code="IDEMPOTENCY_KEY_REUSED",
                field="request_key",
            )
        root = await self._live_root(conn, prior.member_id)
        outcome = prior.outcome
        return Identified(
            await self._member(conn, root),
            prior.created,
            list(outcome.get("merged", [])),
            str(outcome.get("review_id", "")),
            [(int(n), str(r)) for n, r in outcome.get("ignored", [])],
            replayed=True,
            # Answers recorded before merges were named carry none.
            merges=await oneid_repo.merges_by_id(conn, list(outcome.get("merge_ids", []))),
        )

    # ---- merge / unmerge --------------------------------------------------------

    async def _merge(
        self,
        uow: UnitOfWork,
        survivor: str,
        absorbed: str,
        rule: str,
        evidence: list[str],
        actor: str,
        review_id: str | None,
    ) -> MergeRow:
        """Absorb one live root into another; both rows are locked by the caller."""
        conn = uow.conn
        consent_before = await consent_state(conn, survivor)
        moved = await oneid_repo.move_identities(conn, absorbed, survivor)
        repointed = await oneid_repo.repoint(conn, absorbed, survivor)
        await oneid_repo.set_merged_into(conn, absorbed, survivor)
        record = await oneid_repo.insert_merge(
            conn, survivor, absorbed, rule, evidence, actor, review_id, moved, repointed, self.now()
        )
        await repo.refresh_phone_masked(conn, [survivor, absorbed])
        await cache.touch(conn, [survivor, absorbed])
        cache.regroup()
        await uow.emit(
            events_pb2.MemberMerged(
                merge_id=record.merge_id,
                survivor_member_id=survivor,
                absorbed_member_id=absorbed,
                rule=rule,
                merged_at=timestamp(record.merged_at),
            ),
            member_id=survivor,
        )
        # The survivor's consent is now the cluster's (a refusal anywhere wins).
        after = await consent_state(conn, survivor)
        for purpose, channel, granted in consent_changes(consent_before, after):
            await emit_consent(uow, survivor, purpose, channel, granted, "merge", record.merged_at)
        return record

    async def _merge_roots(
        self,
        uow: UnitOfWork,
        member_ids: list[str],
        rule: str,
        evidence: list[str],
        actor: str,
        review_id: str | None,
    ) -> tuple[str, list[MergeRow]]:
        """Operator merges: every given member's cluster into the oldest root.
        Per-type limits and do-not-merge pairs yield to the operator's decision."""
        conn = uow.conn
        roots = sorted({await self._live_root(conn, m, "member_ids") for m in member_ids})
        states = await repo.lock_members(conn, roots)
        if any(s.merged_into or s.status != "active" for s in states.values()):
            raise LostRace()
        if len(roots) < 2:
            raise FailedPrecondition(
                "these members are already one member", code="ALREADY_MERGED", field="member_ids"
            )
        survivor = choose_survivor([(states[r].registered_at, r) for r in roots])
        await oneid_repo.remove_do_not_merge(conn, roots)
        records = [
            await self._merge(uow, survivor, r, rule, evidence, actor, review_id)
            for r in roots
            if r != survivor
        ]
        return survivor, records

    async def merge_members(
        self, uow: UnitOfWork, member_ids: list[str], operator: str, reason: str
    ) -> tuple[MemberRecord, list[MergeRow]]:
        operator = required_text(operator, "operator")
        reason = required_text(reason, "reason", 500)
        if len(member_ids) < 2:
            raise InvalidArgument(
                "name at least two members", code="TOO_FEW_MEMBERS", field="member_ids"
            )
        survivor, records = await self._merge_roots(
            uow, member_ids, "operator", [f"reason:{reason}"], operator, None
        )
        return await self._member(uow.conn, survivor), records

    async def unmerge(
        self, uow: UnitOfWork, merge_id: str, operator: str, reason: str
    ) -> tuple[MemberRecord, MemberRecord]:
        operator = required_text(operator, "operator")
        reason = required_text(reason, "reason", 500)
        conn = uow.conn
        merge = await oneid_repo.get_merge(
            conn, parse_member_id(merge_id, "merge_id"), for_update=True
        )
        if merge is None:
            raise NotFound(
                f"merge {merge_id} does not exist", code="UNKNOWN_MERGE", field="merge_id"
            )
        if merge.status != "active":
            raise FailedPrecondition(
                f"merge {merge_id} is {merge.status}", code="MERGE_NOT_ACTIVE", field="merge_id"
            )
        states = await repo.lock_members(conn, [merge.survivor_id, merge.absorbed_id])
        survivor, absorbed = states[merge.survivor_id], states[merge.absorbed_id]
        if survivor.merged_into is not None:
            newer = await oneid_repo.active_merge_absorbing(conn, merge.survivor_id)
            raise FailedPrecondition(
                f"member {merge.survivor_id} was merged again later"
                + (f" (merge {newer.merge_id})" if newer else "")
                + "; unmerge the newest merge first",
                code="UNMERGE_NEWER_FIRST",
                field="merge_id",
            )
        if absorbed.merged_into != merge.survivor_id:
            raise FailedPrecondition(
                "the absorbed member no longer points at the survivor",
                code="MERGE_NOT_ACTIVE",
                field="merge_id",
            )
        consent_before = await consent_state(conn, merge.survivor_id)
        await oneid_repo.move_back(conn, merge)
        await oneid_repo.set_merged_into(conn, merge.absorbed_id, None)
        unmerged_at = await oneid_repo.mark_unmerged(
            conn, merge.merge_id, operator, reason, self.now()
        )
        await oneid_repo.add_do_not_merge(
            conn, [(merge.survivor_id, merge.absorbed_id)], f"unmerge:{merge.merge_id}"
        )
        await repo.refresh_phone_masked(conn, [merge.survivor_id, merge.absorbed_id])
        await cache.touch(conn, [merge.survivor_id, merge.absorbed_id])
        cache.regroup()
        await uow.emit(
            events_pb2.MemberUnmerged(
                merge_id=merge.merge_id,
                survivor_member_id=merge.survivor_id,
                restored_member_id=merge.absorbed_id,
                unmerged_at=timestamp(unmerged_at),
            ),
            member_id=merge.survivor_id,
        )
        # Each member answers for itself again: the survivor where that changed
        # its answer, the restored member with every choice it had made.
        survivor_after = await consent_state(conn, merge.survivor_id)
        for purpose, channel, granted in consent_changes(consent_before, survivor_after):
            await emit_consent(
                uow, merge.survivor_id, purpose, channel, granted, "unmerge", unmerged_at
            )
        restored = await consent_state(conn, merge.absorbed_id)
        for purpose, channel, granted in consent_changes({}, restored):
            await emit_consent(
                uow, merge.absorbed_id, purpose, channel, granted, "unmerge", unmerged_at
            )
        return (
            await self._member(conn, merge.survivor_id),
            await self._member(conn, merge.absorbed_id),
        )

    async def list_merges(self, uow: UnitOfWork, member_id: str) -> list[MergeRow]:
        """Every merge of the member's cluster (and of the given id itself, which
        may have been restored by an unmerge since), newest first."""
        conn = uow.conn
        asked = parse_member_id(member_id)
        root = await self._live_root(conn, asked)
        members = sorted({asked, *await repo.cluster_of(conn, root)})
        return await oneid_repo.merges_involving(conn, members)

    # ---- velocity flags ---------------------------------------------------------

    async def flag_velocity(
        self, uow: UnitOfWork, burst: Burst, member_id: str, window_seconds: int
    ) -> oneid_repo.VelocityFlagRow:
        """Record a burst the velocity watch saw start, and announce it. The
        identifier keeps resolving: a flag is for an operator, not a block."""
        s = burst.sighting
        flag = await oneid_repo.insert_velocity_flag(
            uow.conn,
            s.id_type,
            s.namespace,
            s.value_hash,
            s.value_masked,
            member_id,
            burst.store_ids,
            window_seconds,
            burst.at,
        )
        await uow.emit(
            events_pb2.IdentifierVelocityFlagged(
                flag_id=flag.flag_id,
                identifier_type=flag.id_type,
                namespace=flag.namespace,
                value_masked=flag.value_masked,
                member_id=flag.member_id,
                store_count=flag.store_count,
                store_ids=flag.store_ids,
                window_seconds=flag.window_seconds,
                flagged_at=timestamp(flag.flagged_at),
            ),
            member_id=flag.member_id,
        )
        return flag

    async def list_velocity_flags(
        self, uow: UnitOfWork, page_size: int, page_token: str = ""
    ) -> tuple[list[oneid_repo.VelocityFlagRow], str]:
        """A page, newest flag first, and the next page's token ("": last)."""
        limit = page_limit(page_size, 100)
        after = None
        if page_token:
            stamp, flag_id = decode_page_token(page_token, 2)
            try:
                after = (datetime.fromisoformat(stamp), str(uuid.UUID(flag_id)))
            except ValueError:
                raise bad_page_token() from None
        rows = await oneid_repo.list_velocity_flags(uow.conn, limit + 1, after)
        if len(rows) <= limit:
            return rows, ""
        last = rows[limit - 1]
        return rows[:limit], encode_page_token([last.flagged_at.isoformat(), last.flag_id])

    # ---- review queue -----------------------------------------------------------

    async def list_reviews(
        self, uow: UnitOfWork, status: str, page_size: int, page_token: str
    ) -> tuple[list[ReviewRow], str]:
        status = status.strip() or "pending"
        if status not in {"pending", "approved", "rejected", "closed"}:
            raise InvalidArgument(
                "status is pending, approved, rejected or closed",
                code="INVALID_STATUS",
                field="status",
            )
        limit = page_limit(page_size, 50)
        after = None
        if page_token:
            try:
                stamp, _, rid = page_token.partition("|")
                after = (datetime.fromisoformat(stamp), str(uuid.UUID(rid)))
            except ValueError:
                raise bad_page_token() from None
        rows = await oneid_repo.list_reviews(uow.conn, status, limit, after)
        token = ""
        if len(rows) == limit:
            token = f"{rows[-1].created_at.isoformat()}|{rows[-1].review_id}"
        return rows, token

    async def _pending_review(self, uow: UnitOfWork, review_id: str) -> ReviewRow:
        review = await oneid_repo.get_review(
            uow.conn, parse_member_id(review_id, "review_id"), for_update=True
        )
        if review is None:
            raise NotFound(
                f"review {review_id} does not exist", code="UNKNOWN_REVIEW", field="review_id"
            )
        if review.status != "pending":
            raise FailedPrecondition(
                f"review {review_id} is already {review.status}",
                code="REVIEW_DECIDED",
                field="review_id",
            )
        return review

    async def approve_review(
        self, uow: UnitOfWork, review_id: str, operator: str, note: str
    ) -> ReviewRow:
        operator = required_text(operator, "operator")
        review = await self._pending_review(uow, review_id)
        _, records = await self._merge_roots(
            uow,
            review.member_ids,
            "review",
            [*review.evidence, f"approved-by:{operator}"],
            operator,
            review.review_id,
        )
        return await oneid_repo.decide_review(
            uow.conn, review.review_id, "approved", operator, note, [r.merge_id for r in records]
        )

    async def reject_review(
        self, uow: UnitOfWork, review_id: str, operator: str, note: str
    ) -> ReviewRow:
        operator = required_text(operator, "operator")
        review = await self._pending_review(uow, review_id)
        pairs = list(itertools.combinations(review.member_ids, 2))
        await oneid_repo.add_do_not_merge(uow.conn, pairs, f"review:{review.review_id}")
        return await oneid_repo.decide_review(
            uow.conn, review.review_id, "rejected", operator, note, []
        )

    async def list_quarantined(
        self, uow: UnitOfWork, page_size: int, page_token: str = ""
    ) -> tuple[list[oneid_repo.QuarantineRow], str]:
        """A page, newest quarantine first, and the next page's token ("": last)."""
        limit = page_limit(page_size, 100)
        after = None
        if page_token:
            stamp, id_type, namespace, value_hash = decode_page_token(page_token, 4)
            try:
                after = (
                    datetime.fromisoformat(stamp),
                    id_type,
                    namespace,
                    bytes.fromhex(value_hash),
                )
            except ValueError:
                raise bad_page_token() from None
        rows = await oneid_repo.list_quarantined(uow.conn, limit + 1, after)
        if len(rows) <= limit:
            return rows, ""
        last = rows[limit - 1]
        boundary = [last.quarantined_at.isoformat(), last.id_type, last.namespace]
        return rows[:limit], encode_page_token([*boundary, last.value_hash.hex()])

    # ---- dynamic member code ---------------------------------------------------

    async def issue_code(self, uow: UnitOfWork, member_id: str) -> IssuedCode:
        """A fresh code on every call (never the one shown before, which may
        have been scanned already), good once for CODE_LIFETIME_SECONDS."""
        root = await self._live_root(uow.conn, member_id)
        now = self._clock()
        expires_at = datetime.fromtimestamp(now + CODE_LIFETIME_SECONDS, UTC)
        # Forgotten a while after they expire: an older code is simply unknown.
        prune_before = datetime.fromtimestamp(now - CODE_FORGET_AFTER_SECONDS, UTC)
        for _ in range(3):
            code = member_code(self._code_secret, secrets.randbelow(10**11))
            if await oneid_repo.insert_member_code(
                uow.conn, self._code_hash(code), root, expires_at, prune_before
            ):
                return IssuedCode(code, expires_at, CODE_REFRESH_SECONDS)
        raise Unavailable("could not draw a fresh member code; retry", code="MEMBER_CODE_BUSY")

    def _code_hash(self, code: str) -> bytes:
        return self._vault.lookup_hash(f"member-code|{code.strip()}")

    def refuse_junk(self, ident: ObservedIdentifier) -> None:
        """Junk names nobody, even if it was stored (or its answer cached)
        before the blocklist listed it: the POS then gets identify's
        JUNK_IDENTIFIER. Before any lookup, Redis included."""
        if self.policy.is_junk(ident.id_type, ident.value):
            raise NotFound(
                "no member owns this identifier", code="UNKNOWN_IDENTIFIER", field="identifier"
            )

    async def resolve_identifier(self, uow: UnitOfWork, ident: ObservedIdentifier) -> MemberRecord:
        """The live member owning one identifier (the survivor, if it was merged);
        read-only: nothing is enrolled, attached or audited."""
        self.refuse_junk(ident)
        ref = (ident.id_type.value, ident.namespace, self._vault.lookup_hash(ident.key))
        stored = (await oneid_repo.find_identities(uow.conn, [ref])).get(ref)
        if stored is None or stored.quarantined:
            # A quarantined identifier links too many members to name one.
            raise NotFound(
                "no member owns this identifier", code="UNKNOWN_IDENTIFIER", field="identifier"
            )
        root = await self._live_root(uow.conn, stored.member_id, "identifier")
        return await self._member(uow.conn, root)

    async def redeem_code(self, uow: UnitOfWork, code: str, source: str) -> MemberRecord:
        source = required_text(source, "source")
        if not member_code_is_genuine(self._code_secret, code):
            raise InvalidArgument(
                "code is not a member code this brand issued",
                code="MEMBER_CODE_INVALID",
                field="code",
            )
        now = self.now()
        code_hash = self._code_hash(code)
        member_id = await oneid_repo.use_member_code(uow.conn, code_hash, now, source)
        if member_id is None:
            state = await oneid_repo.member_code_state(uow.conn, code_hash)
            if state is None:
                raise InvalidArgument(
                    "code is not a member code this brand issued",
                    code="MEMBER_CODE_INVALID",
                    field="code",
                )
            used_at, expires_at = state
            if used_at is not None:
                raise FailedPrecondition(
                    "code was already used; ask the member to refresh it",
                    code="MEMBER_CODE_USED",
                    field="code",
                )
            raise FailedPrecondition(
                f"code expired at {expires_at.isoformat()}; ask the member to refresh it",
                code="MEMBER_CODE_EXPIRED",
                field="code",
            )
        root = await self._live_root(uow.conn, member_id, "code")
        return await self._member(uow.conn, root)
