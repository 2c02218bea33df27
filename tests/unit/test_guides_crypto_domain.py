"""WeCom's callback scheme and the pure rules of the guides service."""

from __future__ import annotations

import base64
import hashlib
import os
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from servicekit.errors import InvalidArgument, PermissionDenied
from services.guides import domain
from services.guides.domain import AttributionRule, Candidate, OrderFact, TagRules
from services.guides.wecom_crypto import WeComCrypto

KEY = base64.b64encode(os.urandom(32)).decode().rstrip("=")
TZ = ZoneInfo("Asia/Shanghai")
T0 = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)  # 09:00 in Shanghai


def crypto(corp: str = "wwcorp") -> WeComCrypto:
    return WeComCrypto("tok", KEY, corp)


def test_signature_is_sha1_of_the_sorted_parts() -> None:
    c = crypto()
    expected = hashlib.sha1("".join(sorted(["tok", "1700000000", "n1", "ENC"])).encode())
    assert c.signature("1700000000", "n1", "ENC") == expected.hexdigest()
    c.verify(expected.hexdigest(), "1700000000", "n1", "ENC")
    with pytest.raises(PermissionDenied) as err:
        c.verify(expected.hexdigest(), "1700000000", "n2", "ENC")
    assert err.value.code == "BAD_SIGNATURE"


def test_round_trip_and_wecom_framing() -> None:
    c = crypto()
    msg = b"<xml><Event>change_external_contact</Event></xml>"
    enc = c.encrypt(msg)
    assert c.decrypt(enc) == msg
    # The framing by hand: random(16) + length + message + corp id, padded to 32.
    key = base64.b64decode(KEY + "=")
    raw = base64.b64decode(enc)
    plain = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor().update(raw)
    pad = plain[-1]
    assert len(plain) % 32 == 0 and 1 <= pad <= 32
    body = plain[:-pad]
    assert int.from_bytes(body[16:20], "big") == len(msg)
    assert body[20 : 20 + len(msg)] == msg and body[20 + len(msg) :] == b"wwcorp"


def test_another_corps_message_and_garbage_are_refused() -> None:
    enc = crypto("wwother").encrypt(b"<xml/>")
    with pytest.raises(PermissionDenied) as err:
        crypto().decrypt(enc)
    assert err.value.code == "WRONG_RECEIVER"
    with pytest.raises(InvalidArgument) as bad:
        crypto().decrypt(base64.b64encode(b"x" * 32).decode())
    assert bad.value.code == "UNDECRYPTABLE_CALLBACK"


def test_a_bad_encoding_aes_key_stops_start_up() -> None:
    with pytest.raises(ValueError):
        WeComCrypto("tok", "short", "wwcorp")


def test_age_check_both_ways() -> None:
    now = T0
    domain.check_age(str(int(now.timestamp()) - 299), now, timedelta(seconds=300))
    for off in (-301, 301):
        with pytest.raises(InvalidArgument) as err:
            domain.check_age(str(int(now.timestamp()) + off), now, timedelta(seconds=300))
        assert err.value.code == "CALLBACK_TOO_OLD"


def test_xml_with_a_doctype_is_refused() -> None:
    with pytest.raises(InvalidArgument) as err:
        domain.parse_xml(b'<!DOCTYPE x [<!ENTITY a "b">]><xml><A>&a;</A></xml>', "body")
    assert err.value.code == "INVALID_XML"


def test_the_same_event_has_the_same_dedup_key() -> None:
    xml = (
        b"<xml><Event>change_external_contact</Event><ChangeType>add_external_contact"
        b"</ChangeType><UserID>g1</UserID><ExternalUserID>wm1</ExternalUserID>"
        b"<CreateTime>1700000000</CreateTime></xml>"
    )
    a, b = domain.parse_event(xml), domain.parse_event(xml)
    assert a.dedup_key == b.dedup_key
    assert a.dedup_key != domain.parse_event(xml.replace(b"wm1", b"wm2")).dedup_key


def test_guide_link_verifies_and_rejects_forgery() -> None:
    ref = domain.sign_guide_ref(b"s", "g.1", T0)
    parsed = domain.verify_guide_ref(b"s", ref, TZ)
    assert parsed is not None and parsed.staff_id == "g.1" and parsed.issued_at == T0
    assert domain.verify_guide_ref(b"other", ref, TZ) is None
    assert domain.verify_guide_ref(b"s", ref.replace("g.1", "g.2"), TZ) is None
    assert domain.verify_guide_ref(b"s", "nonsense", TZ) is None


def test_attribution_precedence_and_window() -> None:
    rules = domain.parse_rules("guide_link,staff_code,binding")
    at = T0
    link = Candidate(AttributionRule.GUIDE_LINK, "g1", "S1", at - timedelta(days=2))
    code = Candidate(AttributionRule.STAFF_CODE, "g2", "S2", at)
    bind = Candidate(AttributionRule.BINDING, "g3", "S3", at - timedelta(days=40))
    w = timedelta(days=30)
    assert domain.attribute([bind, code, link], rules, at, w) == link
    assert domain.attribute([bind, code], rules, at, w) == code
    # The binding began 40 days ago: outside a 30-day window, inside none.
    assert domain.attribute([bind], rules, at, w) is None
    assert domain.attribute([bind], rules, at, timedelta(0)) == bind
    stale_link = Candidate(AttributionRule.GUIDE_LINK, "g1", "S1", at - timedelta(days=31))
    assert domain.attribute([stale_link, bind], rules, at, w) is None
    assert (
        domain.attribute([bind, code], domain.parse_rules("binding,staff_code"), at, timedelta(0))
        == bind
    )
    with pytest.raises(ValueError):
        domain.parse_rules("guide_link,telepathy")


def _order(n: int, hour: int, store: str, channel: str, fen: int, cat: str) -> OrderFact:
    at = datetime(2026, 3, 1 + n, hour, 0, tzinfo=TZ)
    return OrderFact(str(n), store, channel, fen, at, ((cat, 1),))


def test_rule_tags_from_orders() -> None:
    orders = [
        _order(1, 8, "S1", "mini_program", 1200, "fruit_tea"),
        _order(2, 9, "S1", "mini_program", 1300, "fruit_tea"),
        _order(3, 15, "S2", "store", 1400, "milk_tea"),
    ]
    assert domain.rule_tags(orders, TZ, TagRules()) == {
        "category:fruit_tea",
        "price:low",
        "habit:morning",
        "store:S1",
        "channel:mini_program",
    }
    # One order is not a habit.
    assert domain.rule_tags(orders[:1], TZ, TagRules()) == frozenset()
    # No majority: no store tag; mean 3000+: high.
    mixed = [
        _order(1, 12, "S1", "store", 3000, "coffee"),
        _order(2, 18, "S2", "delivery", 3500, "coffee"),
    ]
    tags = domain.rule_tags(mixed, TZ, TagRules())
    assert "price:high" in tags and not any(
        t.startswith(("store:", "habit:", "channel:")) for t in tags
    )


def test_suggested_actions() -> None:
    from datetime import date

    from gateway.api.guides import suggested_actions

    today = date(2026, 5, 1)
    recent = datetime(2026, 4, 25, 3, 0, tzinfo=UTC)
    assert suggested_actions(today, "", recent, 0, "2026-12-31") == []
    assert suggested_actions(today, "1990-05-07", recent, None, None) == ["birthday_this_week"]
    assert suggested_actions(today, "1990-05-08", recent, None, None) == []
    assert suggested_actions(today, "", None, None, None) == ["silent_30_days"]
    old = datetime(2026, 4, 1, 3, 0, tzinfo=UTC)
    assert suggested_actions(today, "", old, None, None) == ["silent_30_days"]
    assert suggested_actions(today, "", recent, 12000, "2026-05-31") == ["tier_at_risk"]
    assert suggested_actions(today, "", recent, 12000, "2026-06-01") == []
    # New Year's week wraps into January.
    assert suggested_actions(date(2026, 12, 29), "2000-01-02", recent, None, None) == [
        "birthday_this_week",
        "silent_30_days",
    ]


# WeCom's published example (the callback crypto library's sample, 加解密库):
# corp wx5823bf96d3bd56c7, Token QDG6eK, its EncodingAESKey, a URL check and a
# text message as WeCom signed and encrypted them. Our scheme must read both.
SAMPLE_CORP = "wx5823bf96d3bd56c7"
SAMPLE_TOKEN = "QDG6eK"
SAMPLE_KEY = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
SAMPLE_ECHO = (
    "P9nAzCzyDtyTWESHep1vC5X9xho/qYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp+4RPcs8TgAE7OaBO+FZXvnaqQ=="
)
SAMPLE_ENCRYPT = (
    "RypEvHKD8QQKFhvQ6QleEB4J58tiPdvo+rtK1I9qca6aM/wvqnLSV5zEPeusUiX5L5X/0lWfrf0QADHHhGd3Qczc"
    "dCUpj911L3vg3W/sYYvuJTs3TUUkSUXxaccAS0qhxchrRYt66wiSpGLYL42aM6A8dTT+6k4aSknmPj48kzJs8qLj"
    "vd4Xgpue06DOdnLxAUHzM6+kDZ+HMZfJYuR+LtwGc2hgf5gsijff0ekUNXZiqATP7PF5mZxZ3Izoun1s4zG4LUMn"
    "vw2r+KqCKIw+3IQH03v+BCA9nMELNqbSf6tiWSrXJB3LAVGUcallcrw8V2t9EL4EhzJWrQUax5wLVMNS0+rUPA3k"
    "22Ncx4XXZS9o0MBH27Bo6BpNelZpS+/uh9KsNlY6bHCmJU9p8g7m3fVKn28H3KDYA5Pl/T8Z1ptDAVe0lXdQ2Yoy"
    "yH2uyPIGHBZZIs2pDBS8R07+qN+E7Q=="
)


def test_wecoms_published_url_check_vector() -> None:
    c = WeComCrypto(SAMPLE_TOKEN, SAMPLE_KEY, SAMPLE_CORP)
    assert c.signature("1409659589", "263014780", SAMPLE_ECHO) == (
        "5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3"
    )
    c.verify("5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3", "1409659589", "263014780", SAMPLE_ECHO)
    assert c.decrypt(SAMPLE_ECHO) == b"1616140317555161061"


def test_wecoms_published_message_vector() -> None:
    c = WeComCrypto(SAMPLE_TOKEN, SAMPLE_KEY, SAMPLE_CORP)
    assert c.signature("1409659813", "1372623149", SAMPLE_ENCRYPT) == (
        "477715d11cdb4164915debcba66cb864d751f3e6"
    )
    message = c.decrypt(SAMPLE_ENCRYPT)
    fields = domain.parse_xml(message, "Encrypt")
    assert (fields["ToUserName"], fields["FromUserName"]) == (SAMPLE_CORP, "mycreate")
    assert (fields["CreateTime"], fields["MsgType"], fields["Content"]) == (
        "1409659813",
        "text",
        "hello",
    )
    assert (fields["MsgId"], fields["AgentID"]) == ("4561255354251345929", "218")
    # One character changed anywhere: the signature no longer matches.
    with pytest.raises(PermissionDenied) as err:
        c.verify(
            "477715d11cdb4164915debcba66cb864d751f3e6", "1409659814", "1372623149", SAMPLE_ENCRYPT
        )
    assert err.value.code == "BAD_SIGNATURE"
    # Read for another corp: refused by the receive id inside.
    with pytest.raises(PermissionDenied) as other:
        WeComCrypto(SAMPLE_TOKEN, SAMPLE_KEY, "wwsomeoneelse").decrypt(SAMPLE_ENCRYPT)
    assert other.value.code == "WRONG_RECEIVER"


def test_rule_tags_reach_wecom_by_display_name_within_its_limit() -> None:
    from services.guides.retries import RULE_TAG_NAMES, wecom_tag_name

    assert wecom_tag_name("price:low") == "价格敏感"
    assert wecom_tag_name("category:fruit_tea") == "偏好品类:fruit_tea"
    assert wecom_tag_name("store:SH001") == "常去门店:SH001"
    assert wecom_tag_name("果茶爱好者") == "果茶爱好者"  # manual tags as they are
    assert all(len(n) <= 30 for n in RULE_TAG_NAMES.values())
    assert wecom_tag_name("x" * 30) == "x" * 30
    with pytest.raises(InvalidArgument) as err:
        wecom_tag_name("x" * 31)
    assert err.value.code == "TAG_NAME_TOO_LONG"
    with pytest.raises(InvalidArgument):
        wecom_tag_name("store:" + "S" * 30)  # 常去门店: + 30 = 35
