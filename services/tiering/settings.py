"""Settings of the tiering service (environment variables, upper-cased names)."""

from __future__ import annotations

from pydantic import Field

from servicekit.settings import ServiceSettings


class TieringSettings(ServiceSettings):
    # The brand's tier programme: every member is evaluated on this one
    # (docs/tiers.md, "One programme per brand"). Other stored programmes are
    # drafts or alternatives, for simulation, until a brand switches to one.
    tiering_programme_id: str = Field(default="default", min_length=1, max_length=64)
    # A growth action (check-in, review, referral) is accepted this long after
    # it happened, no longer: caps are per local day, so an unbounded past
    # would let a client backfill check-ins day by day.
    tiering_growth_max_age_hours: float = Field(default=24.0, gt=0)
    # The rewards service, which issues tier benefit coupons (upgrade gift,
    # birthday coupon); empty = not wired: grants stay pending.
    rewards_addr: str = ""
    rewards_timeout_seconds: float = Field(default=2.0, gt=0)
    # How often pending benefit grants are sent to rewards and birthday
    # grants are looked for.
    tiering_benefits_poll_seconds: float = Field(default=30.0, gt=0)
