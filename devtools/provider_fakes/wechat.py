"""Fake WeChat mini-program subscribe messages: `POST /cgi-bin/stable_token`
(gateway/wechat_fake.py's token store) and `POST /cgi-bin/message/subscribe/send`.

Validation as WeChat documents it: the access token (40001 unknown, 42001
expired), the template id (40037), the openid (40003), the member's
subscription credit for that template (43101, one credit per message: a
member's tap), `miniprogram_state` (47003), and every keyword of the template:
present, and the value fitting its type (`thing` <= 20 characters, `number`
digits, `date` a date, ...; 47003 "argument invalid! data.thing1.value ...").
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request

from gateway.wechat_fake import FakeWeChat

from . import Faults, dropped_answer

# Keyword type -> (max characters, pattern of a valid value).
KEYWORD_RULES: dict[str, tuple[int, re.Pattern[str] | None]] = {
    "thing": (20, None),
    "number": (32, re.compile(r"^[0-9.]+$")),
    "letter": (32, re.compile(r"^[A-Za-z]+$")),
    "symbol": (5, None),
    "character_string": (32, re.compile(r"^[\x21-\x7e]+$")),
    "time": (19, re.compile(r"^\d{4}")),
    "date": (19, re.compile(r"^\d{4}")),
    "amount": (13, re.compile(r"^[¥$￥]?[0-9.]+元?$")),
    "phone_number": (17, re.compile(r"^[0-9+\-]+$")),
    "car_number": (8, None),
    "name": (10, None),
    "phrase": (5, None),
}
_KEY = re.compile(r"^([a-z_]+?)(\d+)$")


@dataclass
class FakeWeChatMessages:
    wechat: FakeWeChat
    # template_id -> its keywords (e.g. ["thing1", "number2", "date3"]).
    templates: dict[str, list[str]] = field(default_factory=dict)
    # False (`make run`): every openid has credit unless refused with no_credit.
    strict_credits: bool = True
    faults: Faults = field(default_factory=Faults)
    credits: Counter[tuple[str, str]] = field(default_factory=Counter)
    sent: list[dict[str, Any]] = field(default_factory=list)
    send_requests: int = 0

    def grant(self, openid: str, template_id: str, n: int = 1) -> None:
        """The member tapped "allow" n times for this template."""
        self.credits[(openid, template_id)] += n

    def check_data(self, template_id: str, data: object) -> str:
        """ "" when the data fits the template, else WeChat's 47003 message."""
        if not isinstance(data, dict):
            return "argument invalid! data is not an object"
        for key in self.templates.get(template_id, []):
            item = data.get(key)
            value = item.get("value") if isinstance(item, dict) else None
            if not isinstance(value, str) or not value:
                return f"argument invalid! data.{key}.value is empty"
            m = _KEY.match(key)
            rule = KEYWORD_RULES.get(m.group(1)) if m else None
            if rule is None:
                continue
            limit, pattern = rule
            if len(value) > limit or (pattern is not None and not pattern.match(value)):
                return f"argument invalid! data.{key}.value invalid"
        return ""

    def send(self, access_token: str, body: dict[str, Any], fault: str) -> dict[str, Any]:
        self.send_requests += 1
        if fault == "expired_token":
            self.wechat.expire_token(access_token)
        refused = self.wechat.token_error(access_token)
        if refused is not None:
            return refused
        if fault == "rate_limit":
            return {"errcode": 45009, "errmsg": "reach max api daily quota limit"}
        template_id = str(body.get("template_id", ""))
        if template_id not in self.templates:
            return {"errcode": 40037, "errmsg": "invalid template_id"}
        openid = str(body.get("touser", ""))
        if not openid:
            return {"errcode": 40003, "errmsg": "invalid openid"}
        if body.get("miniprogram_state", "formal") not in ("developer", "trial", "formal"):
            return {"errcode": 47003, "errmsg": "argument invalid! miniprogram_state"}
        problem = "argument invalid! bad data" if fault == "bad_data" else ""
        problem = problem or self.check_data(template_id, body.get("data"))
        if problem:
            return {"errcode": 47003, "errmsg": problem}
        if fault == "no_credit" or (
            self.strict_credits and self.credits[(openid, template_id)] <= 0
        ):
            return {"errcode": 43101, "errmsg": "user refuse to accept the msg"}
        if self.strict_credits:
            self.credits[(openid, template_id)] -= 1
        msgid = secrets.randbelow(10**15)
        self.sent.append({**body, "msgid": msgid})
        return {"errcode": 0, "errmsg": "ok", "msgid": msgid}

    def app(self) -> FastAPI:
        api = self.wechat.app()

        @api.post("/cgi-bin/message/subscribe/send", response_model=None)
        async def subscribe_send(request: Request, access_token: str = "") -> Any:
            body = await request.json()
            fault = self.faults.next(body)
            answer = self.send(access_token, body, fault)
            if fault == "slow":
                await asyncio.sleep(self.faults.slow_seconds)
            if fault == "drop":
                return dropped_answer()
            return answer

        @api.get("/stats")
        async def stats() -> dict[str, int]:
            return {"sent": len(self.sent), "requests": self.send_requests}

        return api
