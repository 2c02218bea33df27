"""Send-step templates: each provider's field rules checked at publish time
(the field named), and rendering from the member's facts and the entering event."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from servicekit.errors import InvalidArgument
from services.engagement.journey import EVENTS, parse_journey
from services.engagement.templates import TRIGGER_VARIABLES, VARIABLES, RenderError, render

NOW = datetime(2030, 3, 4, 2, 0, tzinfo=UTC)


def journey(channel: str, entry: str = "coupon_expiring_soon", **content: Any) -> dict[str, Any]:
    return {
        "id": "coupon-expiring",
        "entry": {"event": entry},
        "start": "tell",
        "steps": {
            "tell": {
                "type": "send",
                "channel": channel,
                "template": "tmpl-1",
                "class": "transactional",
                "next": "end",
                **content,
            },
            "end": {"type": "exit"},
        },
    }


def refusal(doc: dict[str, Any]) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        parse_journey(doc)
    return caught.value


def test_an_over_long_thing_value_is_refused_at_publish_naming_the_field() -> None:
    err = refusal(
        journey("miniprogram", data={"thing1": "您的积分即将过期，请尽快到店使用积分兑换饮品"})
    )
    assert err.code == "TEMPLATE_VALUE_TOO_LONG"
    assert err.field == "definition.steps.tell.data.thing1"
    assert "allows 20" in str(err)


def test_a_variable_that_can_outgrow_a_thing_is_refused_unless_cut() -> None:
    # A coupon name can be 64 characters: too long for thing (20) ...
    err = refusal(journey("miniprogram", data={"thing1": "{coupon_name}"}))
    assert (err.code, err.field) == ("TEMPLATE_VALUE_TOO_LONG", "definition.steps.tell.data.thing1")
    # ... unless the template cuts it.
    parse_journey(journey("miniprogram", data={"thing1": "{coupon_name:20}"}))


@pytest.mark.parametrize(
    ("data", "code", "key"),
    [
        ({"number2": "{coupon_name:5}"}, "TEMPLATE_FIELD_TYPE", "number2"),
        ({"number2": "twelve"}, "TEMPLATE_FIELD_TYPE", "number2"),
        ({"date3": "on {points_expire_on}"}, "TEMPLATE_FIELD_TYPE", "date3"),
        ({"amount4": "¥{points}"}, None, None),
        ({"price5": "1"}, "UNKNOWN_KEYWORD_TYPE", "price5"),
        ({"thing1": "{nick_name}"}, "UNKNOWN_TEMPLATE_VARIABLE", "thing1"),
    ],
)
def test_wechat_keyword_types(data: dict[str, str], code: str | None, key: str | None) -> None:
    doc = journey("miniprogram", "points_expiring_soon", data=data)
    if code is None:
        parse_journey(doc)
        return
    err = refusal(doc)
    assert (err.code, err.field) == (code, f"definition.steps.tell.data.{key}")


def test_sms_variables_are_at_most_35_characters() -> None:
    err = refusal(journey("sms", params={"name": "{coupon_name}"}))
    assert (err.code, err.field) == ("TEMPLATE_VALUE_TOO_LONG", "definition.steps.tell.params.name")
    parse_journey(journey("sms", params={"name": "{coupon_name:35}", "on": "{coupon_expire_on}"}))


def test_each_channel_needs_its_content() -> None:
    assert refusal(journey("miniprogram")).code == "MISSING_TEMPLATE_DATA"
    assert refusal(journey("wecom")).field == "definition.steps.tell.text"
    assert refusal(journey("app_push", title="x")).field == "definition.steps.tell.body"


def test_rendering_fills_cuts_and_refuses_what_it_cannot_fill() -> None:
    step = parse_journey(
        journey(
            "miniprogram",
            data={"thing1": "{coupon_name:6}", "date3": "{coupon_expire_on}"},
            page="pages/coupon/index?id={coupon_id}",
        )
    ).step("tell")
    # As server.py maps rewards' CouponExpiringSoon: expires_at is an instant.
    event = {
        "name": "Oolong milk tea voucher",
        "coupon_id": "C1",
        "expires_at": "2030-03-30T16:00:00+00:00",
    }
    out = render("miniprogram", "tmpl-1", step.content, event, {"tz": "Asia/Shanghai"}, NOW)
    assert out == {
        "template_id": "tmpl-1",
        "page": "pages/coupon/index?id=C1",
        "data": {
            "thing1": {"value": "Oolong"},
            # Midnight in Shanghai is the 31st there (16:00 UTC on the 30th).
            "date3": {"value": "2030-03-31"},
        },
    }
    london = render("miniprogram", "tmpl-1", step.content, event, {"tz": "Europe/London"}, NOW)
    assert london["data"]["date3"] == {"value": "2030-03-30"}
    with pytest.raises(RenderError) as caught:
        render("miniprogram", "tmpl-1", step.content, {"name": "x"}, {}, NOW)
    assert caught.value.code == "MISSING_VARIABLE"


@pytest.mark.parametrize(
    ("entry", "text", "variable"),
    [
        ("tier_changed", "You have {points} points", "points"),
        ("coupon_expiring_soon", "Balance {points_balance}", "points_balance"),
        ("points_expiring_soon", "See you at {store_name:10}", "store_name"),
        ("member_registered", "Your {coupon_name:20} ends {coupon_expire_on}", "coupon_name"),
    ],
)
def test_a_variable_the_trigger_never_supplies_is_refused_at_publish(
    entry: str, text: str, variable: str
) -> None:
    err = refusal(journey("app_push", entry, title="Hi", body=text))
    assert (err.code, err.field) == ("UNSUPPLIED_VARIABLE", "definition.steps.tell.body")
    assert f"{{{variable}}}" in str(err) and entry in str(err)


def test_every_trigger_supplies_its_variables_and_the_members_facts() -> None:
    assert set(TRIGGER_VARIABLES) == set(EVENTS)
    for entry in EVENTS:
        # Every variable a trigger claims exists, and the member's facts serve all.
        assert TRIGGER_VARIABLES[entry] <= set(VARIABLES)
        parse_journey(journey("app_push", entry, title="{nickname:10}", body="{tier} {today}"))
    parse_journey(
        journey(
            "sms",
            "points_expiring_soon",
            params={"p": "{points}", "b": "{points_balance}", "d": "{points_expire_on}"},
        )
    )
    parse_journey(journey("wecom", "order_completed", text="Thanks for visiting {store_name}"))
