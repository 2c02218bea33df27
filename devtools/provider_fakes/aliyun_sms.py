"""Fake Aliyun SMS: `SendSms` (dysmsapi 2017-05-25, RPC style, GET or form
POST) and the delivery-report push (SmsReport) to a callback URL.

Validation as Aliyun documents it, in its order: the signature (v1,
HMAC-SHA1, recomputed here the way Aliyun's own Java sample does it:
SignatureDoesNotMatch, InvalidAccessKeyId.NotFound), the timestamp within 15
minutes (InvalidTimeStamp.Expired), a nonce used once (SignatureNonceUsed), the
phone number (isv.MOBILE_NUMBER_ILLEGAL), sign name (isv.SMS_SIGNATURE_ILLEGAL),
template code (isv.SMS_TEMPLATE_ILLEGAL), its parameters (
isv.TEMPLATE_MISSING_PARAMETERS, isv.PARAM_LENGTH_LIMIT: at most 35 characters)
and Aliyun's own per-phone control (isv.BUSINESS_LIMIT_CONTROL: 1 a minute).
An accepted message answers Code OK with a BizId; its report is pushed later.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import FastAPI, Request

from . import Faults, dropped_answer


def _encode(value: str) -> str:
    # Aliyun's specialUrlEncode: URLEncoder, then + -> %20, * -> %2A, %7E -> ~.
    return (
        urllib.parse.quote_plus(value, safe="")
        .replace("+", "%20")
        .replace("*", "%2A")
        .replace("%7E", "~")
    )


def expected_signature(method: str, params: dict[str, str], secret: str) -> str:
    query = "&".join(_encode(k) + "=" + _encode(params[k]) for k in sorted(params))
    string_to_sign = method + "&" + _encode("/") + "&" + _encode(query)
    mac = hmac.new((secret + "&").encode(), string_to_sign.encode(), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()


@dataclass
class Accepted:
    biz_id: str
    out_id: str
    phone: str
    template_code: str
    params: dict[str, str]
    sent_at: float


@dataclass
class FakeAliyunSms:
    access_keys: dict[str, str]
    sign_names: set[str]
    # TemplateCode -> its parameter names.
    templates: dict[str, list[str]]
    clock: Callable[[], float] = time.time
    faults: Faults = field(default_factory=Faults)
    # Aliyun's own per-phone control: this many a minute.
    per_phone_minute: int = 1
    # `make run`: push each report here this many seconds after accepting.
    report_url: str = ""
    report_delay_seconds: float = 1.0
    accepted: list[Accepted] = field(default_factory=list)
    requests: int = 0
    _nonces: set[str] = field(default_factory=set)
    _phone_minutes: dict[tuple[str, int], int] = field(default_factory=dict)

    def send_sms(self, method: str, params: dict[str, str], fault: str) -> dict[str, Any]:
        self.requests += 1
        rid = secrets.token_hex(8).upper()

        def refuse(code: str, message: str) -> dict[str, Any]:
            return {"Code": code, "Message": message, "RequestId": rid}

        key_id = params.get("AccessKeyId", "")
        if key_id not in self.access_keys:
            return refuse("InvalidAccessKeyId.NotFound", "Specified access key is not found.")
        signature = params.pop("Signature", "")
        if not hmac.compare_digest(
            signature, expected_signature(method, params, self.access_keys[key_id])
        ):
            return refuse("SignatureDoesNotMatch", "Specified signature is not matched.")
        try:
            stamp = datetime.strptime(params.get("Timestamp", ""), "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            return refuse("InvalidTimeStamp.Format", "Specified time stamp is not valid.")
        if abs(stamp.replace(tzinfo=UTC).timestamp() - self.clock()) > 900:
            return refuse("InvalidTimeStamp.Expired", "Specified time stamp is expired.")
        nonce = params.get("SignatureNonce", "")
        if not nonce or nonce in self._nonces:
            return refuse("SignatureNonceUsed", "Specified signature nonce was used already.")
        self._nonces.add(nonce)
        if params.get("Action") != "SendSms" or params.get("Version") != "2017-05-25":
            return refuse("InvalidAction.NotFound", "Specified api is not found.")
        if fault == "rate_limit":
            return refuse("Throttling.User", "Request was denied due to user flow control.")
        if fault == "no_credit":
            return refuse("isv.AMOUNT_NOT_ENOUGH", "account balance is not enough")
        phone = params.get("PhoneNumbers", "")
        if not (len(phone) == 11 and phone.isdigit() and phone.startswith("1")):
            return refuse("isv.MOBILE_NUMBER_ILLEGAL", "invalid mobile number")
        if params.get("SignName") not in self.sign_names:
            return refuse("isv.SMS_SIGNATURE_ILLEGAL", "invalid sign name")
        code = params.get("TemplateCode", "")
        if code not in self.templates:
            return refuse("isv.SMS_TEMPLATE_ILLEGAL", "invalid template code")
        try:
            values = json.loads(params.get("TemplateParam") or "{}")
        except ValueError:
            return refuse("isv.INVALID_JSON_PARAM", "TemplateParam is not JSON")
        if fault == "bad_data" or any(n not in values for n in self.templates[code]):
            return refuse("isv.TEMPLATE_MISSING_PARAMETERS", "template parameters are missing")
        if any(len(str(v)) > 35 for v in values.values()):
            return refuse("isv.PARAM_LENGTH_LIMIT", "a parameter exceeds 35 characters")
        minute = (phone, int(self.clock() // 60))
        if self._phone_minutes.get(minute, 0) >= self.per_phone_minute:
            return refuse("isv.BUSINESS_LIMIT_CONTROL", "business limit control")
        self._phone_minutes[minute] = self._phone_minutes.get(minute, 0) + 1
        biz_id = f"{secrets.randbelow(10**15)}^{secrets.randbelow(10**10)}"
        self.accepted.append(
            Accepted(biz_id, params.get("OutId", ""), phone, code, values, self.clock())
        )
        return {"Code": "OK", "Message": "OK", "BizId": biz_id, "RequestId": rid}

    def report(
        self, a: Accepted, success: bool = True, err_code: str = "DELIVERED"
    ) -> dict[str, Any]:
        """One SmsReport item, as Aliyun's HTTP batch push sends it."""
        fmt = "%Y-%m-%d %H:%M:%S"
        return {
            "phone_number": a.phone,
            "send_time": datetime.fromtimestamp(a.sent_at, UTC).strftime(fmt),
            "report_time": datetime.fromtimestamp(self.clock(), UTC).strftime(fmt),
            "success": success,
            "err_code": err_code if not success else "DELIVERED",
            "err_msg": "用户接收成功" if success else "failed",
            "sms_size": "1",
            "biz_id": a.biz_id,
            "out_id": a.out_id,
        }

    async def push(self, url: str, reports: list[dict[str, Any]]) -> httpx.Response:
        async with httpx.AsyncClient(timeout=5) as client:
            return await client.post(url, json=reports)

    def app(self) -> FastAPI:
        api = FastAPI(title="fake Aliyun SMS", openapi_url=None, docs_url=None, redoc_url=None)

        async def handle(request: Request, params: dict[str, str]) -> Any:
            fault = self.faults.next(dict(params))
            answer = self.send_sms(request.method, params, fault)
            if answer.get("Code") == "OK" and self.report_url:
                accepted = self.accepted[-1]
                asyncio.get_running_loop().call_later(
                    self.report_delay_seconds,
                    lambda: asyncio.ensure_future(
                        self.push(self.report_url, [self.report(accepted)])
                    ),
                )
            if fault == "slow":
                await asyncio.sleep(self.faults.slow_seconds)
            if fault == "drop":
                return dropped_answer()
            return answer

        @api.get("/", response_model=None)
        async def send_get(request: Request) -> Any:
            return await handle(request, dict(request.query_params))

        @api.post("/", response_model=None)
        async def send_post(request: Request) -> Any:
            # application/x-www-form-urlencoded, as Aliyun's SDKs post it.
            form = urllib.parse.parse_qsl((await request.body()).decode(), keep_blank_values=True)
            return await handle(request, dict(form))

        return api
