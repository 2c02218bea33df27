"""The member service's use cases, each given a unit of work: MemberHandlers
is OneID (oneid_handlers.py: identify, merge, unmerge, review queue,
quarantine, member codes) and a member's person (profile_handlers.py:
profile, consent, PII reads, erasure) on one base (handlers_common.py).
"""

from __future__ import annotations

from .oneid_handlers import OneIdHandlers
from .profile_handlers import ProfileHandlers


class MemberHandlers(OneIdHandlers, ProfileHandlers):
    """Every use case the servicer calls, on one vault, policy and clock."""
