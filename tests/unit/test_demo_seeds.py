"""The demo brand `make run` seeds is whole: every coupon the demo tier
programmes hand out as a benefit exists in rewards' demo templates (a missing
one made every upgrade gift fail as UNKNOWN_TEMPLATE)."""

from __future__ import annotations

from services.rewards.seed import DEMO_COUPON_TEMPLATES
from services.tiering import seed as tiering_seed
from services.tiering.domain import TierProgramme


def test_every_benefit_coupon_of_the_demo_programmes_is_a_demo_template() -> None:
    programmes = [p for p in vars(tiering_seed).values() if isinstance(p, TierProgramme)]
    assert programmes, "the tiering seed defines no programme"
    named = {
        template
        for p in programmes
        for tier in p.ladder.tiers
        for template in (
            tier.benefits.birthday_coupon_template,
            tier.benefits.upgrade_gift_coupon_template,
        )
        if template
    }
    assert named, "the demo programmes name no benefit coupon"
    assert named <= {t.template_id for t in DEMO_COUPON_TEMPLATES}
