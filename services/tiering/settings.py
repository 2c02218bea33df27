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
    # Months of the orders projection kept attached (partitions by month of
    # ordered_at): a partition ending more than this many months before the
    # current month may be detached (`partitions detach`), and only once it is
    # also outside every stored programme's window_months and RFM window.
    # 36 is the longest window a programme can configure (MAX_WINDOW_MONTHS).
    tiering_orders_retention_months: int = Field(default=36, ge=1)
    # The rewards service, which issues tier benefit coupons (upgrade gift,
    # birthday coupon); empty = not wired: grants stay pending.
    rewards_addr: str = ""
    rewards_timeout_seconds: float = Field(default=2.0, gt=0)
    # How often pending benefit grants are sent to rewards and birthday
    # grants are looked for.
    tiering_benefits_poll_seconds: float = Field(default=30.0, gt=0)


def tiering_settings(settings: ServiceSettings) -> TieringSettings:
    """Tiering settings from the environment, with what the caller set winning."""
    if isinstance(settings, TieringSettings):
        return settings
    return TieringSettings(**settings.model_dump(exclude_unset=True))
