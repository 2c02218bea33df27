"""The identifier policy as data: which types may merge, per-member limits,
priorities, the junk blocklist and the quarantine threshold.

Loaded from JSON (services/member/identity_policy.json by default, or the file
named by IDENTITY_POLICY_PATH); no identifier type is special-cased in
code. Parsing is strict: a typo in the file stops the service at start, it
does not silently allow merges.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .domain import IdType

DEFAULT_POLICY_PATH = Path(__file__).with_name("identity_policy.json")


class MergeRule(enum.StrEnum):
    ALWAYS = "always"
    VERIFIED = "verified"
    NEVER = "never"


class PolicyError(ValueError):
    """The policy file is malformed."""


@dataclass(frozen=True)
class TypePolicy:
    merge: MergeRule
    # None: no limit.
    max_per_member: int | None
    max_verified_per_member: int | None
    # Limits count per app/platform (openid per mini-program) instead of overall.
    per_namespace: bool
    priority: int

    def may_merge(self, verified: bool) -> bool:
        return self.merge is MergeRule.ALWAYS or (self.merge is MergeRule.VERIFIED and verified)


@dataclass(frozen=True)
class BlockRule:
    id_type: IdType | None
    exact: str | None = None
    pattern: re.Pattern[str] | None = None

    def matches(self, id_type: IdType, value: str) -> bool:
        if self.id_type is not None and self.id_type is not id_type:
            return False
        if self.exact is not None:
            return value.casefold() == self.exact.casefold()
        assert self.pattern is not None
        return self.pattern.search(value) is not None


@dataclass(frozen=True)
class IdentityPolicy:
    types: dict[IdType, TypePolicy]
    blocklist: tuple[BlockRule, ...] = field(default_factory=tuple)
    # An identifier seen with more than this many distinct members is quarantined.
    quarantine_after_members: int = 3

    def of(self, id_type: IdType) -> TypePolicy:
        return self.types[id_type]

    def is_junk(self, id_type: IdType, value: str) -> bool:
        """`value` is normalised (phones in E.164). Member numbers are issued
        by this service, so no blocklist applies to them (11111111 is a real one)."""
        if id_type is IdType.MEMBER_NUMBER:
            return False
        return any(rule.matches(id_type, value) for rule in self.blocklist)


def _limit(raw: Any, where: str) -> int | None:
    if raw is None:
        return None
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 1:
        raise PolicyError(f"{where} must be a positive integer or null")
    return raw


def _id_type(raw: Any, where: str) -> IdType:
    try:
        return IdType(raw)
    except ValueError:
        raise PolicyError(f"{where}: unknown identifier type {raw!r}") from None


def parse_policy(data: dict[str, Any]) -> IdentityPolicy:
    raw_types = data.get("types")
    if not isinstance(raw_types, dict):
        raise PolicyError("policy needs a 'types' object")
    types: dict[IdType, TypePolicy] = {}
    for name, spec in raw_types.items():
        id_type = _id_type(name, "types")
        where = f"types.{name}"
        try:
            merge = MergeRule(spec.get("merge"))
        except ValueError:
            raise PolicyError(f"{where}.merge must be always, verified or never") from None
        priority = spec.get("priority")
        if not isinstance(priority, int):
            raise PolicyError(f"{where}.priority must be an integer")
        unknown = set(spec) - {
            "merge",
            "max_per_member",
            "max_verified_per_member",
            "per_namespace",
            "priority",
        }
        if unknown:
            raise PolicyError(f"{where}: unknown keys {sorted(unknown)}")
        types[id_type] = TypePolicy(
            merge=merge,
            max_per_member=_limit(spec.get("max_per_member"), f"{where}.max_per_member"),
            max_verified_per_member=_limit(
                spec.get("max_verified_per_member"), f"{where}.max_verified_per_member"
            ),
            per_namespace=bool(spec.get("per_namespace", False)),
            priority=priority,
        )
    missing = set(IdType) - set(types)
    if missing:
        raise PolicyError(f"policy has no entry for {sorted(missing)}")
    rules: list[BlockRule] = []
    blocklist = data.get("blocklist", {})
    for n, entry in enumerate(blocklist.get("exact", [])):
        scope = _id_type(entry["type"], f"blocklist.exact[{n}]") if "type" in entry else None
        rules.append(BlockRule(scope, exact=str(entry["value"])))
    for n, entry in enumerate(blocklist.get("regex", [])):
        scope = _id_type(entry["type"], f"blocklist.regex[{n}]") if "type" in entry else None
        try:
            pattern = re.compile(entry["pattern"])
        except re.error as exc:
            raise PolicyError(f"blocklist.regex[{n}]: {exc}") from None
        rules.append(BlockRule(scope, pattern=pattern))
    threshold = data.get("quarantine_after_members", 3)
    if not isinstance(threshold, int) or threshold < 1:
        raise PolicyError("quarantine_after_members must be a positive integer")
    return IdentityPolicy(types, tuple(rules), threshold)


def load_policy(path: str | Path | None = None) -> IdentityPolicy:
    source = Path(path) if path else DEFAULT_POLICY_PATH
    try:
        data = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PolicyError(f"cannot read identity policy {source}: {exc}") from None
    return parse_policy(data)
