"""Fake WeCom customer contact: `GET /cgi-bin/gettoken`,
`POST /cgi-bin/externalcontact/add_msg_template` and
`POST /cgi-bin/externalcontact/get_groupmsg_send_result`.

Validation as WeCom documents it: corp id and secret (40013, 40001), the
access token (40014 unknown, 42001 expired), chat_type, a non-empty
external_userid list (40063), text or attachments (40063), text content at
most 4000 bytes (40058); a contact that is not the corp's customer lands in
`fail_list`. A task is created per call (its msgid); every contact's status is
0 (not sent) until `confirm(msgid)` (the staff member pressed send) makes it 1,
or a test sets one contact's result (`set_status`: 2 not a friend, 3 limit).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request

from . import Faults, dropped_answer


@dataclass
class FakeWeCom:
    corps: dict[str, str]
    # The corp's customers (external_userid); None = everyone is one (`make run`).
    customers: set[str] | None = None
    token_lifetime_seconds: int = 7200
    clock: Callable[[], float] = time.time
    faults: Faults = field(default_factory=Faults)
    token_requests: int = 0
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    _tokens: dict[str, tuple[str, float]] = field(default_factory=dict)
    _expired: set[str] = field(default_factory=set)

    def gettoken(self, corpid: str, corpsecret: str) -> dict[str, Any]:
        self.token_requests += 1
        if corpid not in self.corps:
            return {"errcode": 40013, "errmsg": "invalid corpid"}
        if not secrets.compare_digest(self.corps[corpid], corpsecret):
            return {"errcode": 40001, "errmsg": "invalid secret"}
        value = f"wecom-{secrets.token_hex(12)}"
        self._tokens[value] = (corpid, self.clock() + self.token_lifetime_seconds)
        return {
            "errcode": 0,
            "errmsg": "ok",
            "access_token": value,
            "expires_in": self.token_lifetime_seconds,
        }

    def _token_error(self, token: str) -> dict[str, Any] | None:
        owner = self._tokens.get(token)
        if owner is None:
            if token in self._expired:
                return {"errcode": 42001, "errmsg": "access_token expired"}
            return {"errcode": 40014, "errmsg": "invalid access_token"}
        if owner[1] <= self.clock():
            return {"errcode": 42001, "errmsg": "access_token expired"}
        return None

    def add_msg_template(self, token: str, body: dict[str, Any], fault: str) -> dict[str, Any]:
        if fault == "expired_token" and self._tokens.pop(token, None) is not None:
            self._expired.add(token)
        refused = self._token_error(token)
        if refused is not None:
            return refused
        if fault == "rate_limit":
            return {"errcode": 45033, "errmsg": "api concurrent out of limit"}
        if body.get("chat_type", "single") not in ("single", "group"):
            return {"errcode": 40058, "errmsg": "invalid chat_type"}
        contacts = body.get("external_userid")
        if not isinstance(contacts, list) or not contacts:
            return {"errcode": 40063, "errmsg": "external_userid is empty"}
        text = (body.get("text") or {}).get("content", "")
        attachments = body.get("attachments") or []
        if fault == "bad_data" or (not text and not attachments):
            return {"errcode": 40063, "errmsg": "text and attachments are empty"}
        if len(str(text).encode()) > 4000:
            return {"errcode": 40058, "errmsg": "text.content exceed max length"}
        for a in attachments:
            card = a.get("miniprogram") if isinstance(a, dict) else None
            if a.get("msgtype") == "miniprogram" and not (
                isinstance(card, dict) and card.get("appid") and card.get("page")
            ):
                return {"errcode": 40063, "errmsg": "miniprogram appid or page is empty"}
        fail = [c for c in contacts if self.customers is not None and c not in self.customers]
        ok = [c for c in contacts if c not in fail]
        msgid = f"msg{secrets.token_hex(10)}"
        if ok:
            self.tasks[msgid] = {
                "body": body,
                "sender": body.get("sender", ""),
                "status": {c: 0 for c in ok},
            }
        return {"errcode": 0, "errmsg": "ok", "fail_list": fail, "msgid": msgid}

    def confirm(self, msgid: str) -> None:
        """The staff member sent the task from their WeCom client."""
        for contact in self.tasks[msgid]["status"]:
            self.tasks[msgid]["status"][contact] = 1

    def set_status(self, msgid: str, contact: str, status: int) -> None:
        """One contact's result: 0 not sent, 1 sent, 2 not a friend, 3 over the
        contact's limit (what WeCom reports when the staff member tried)."""
        if status not in (0, 1, 2, 3):
            raise ValueError(f"WeCom send status {status} does not exist")
        self.tasks[msgid]["status"][contact] = status

    def send_result(self, token: str, body: dict[str, Any]) -> dict[str, Any]:
        refused = self._token_error(token)
        if refused is not None:
            return refused
        task = self.tasks.get(str(body.get("msgid", "")))
        if task is None:
            return {"errcode": 41063, "errmsg": "msgid not found"}
        rows = [
            {"external_userid": c, "userid": task["sender"], "status": s, "send_time": 0}
            for c, s in sorted(task["status"].items())
        ]
        limit = max(1, min(int(body.get("limit") or 500), 1000))
        start = int(body.get("cursor") or 0)
        page = rows[start : start + limit]
        cursor = str(start + limit) if start + limit < len(rows) else ""
        return {"errcode": 0, "errmsg": "ok", "send_list": page, "next_cursor": cursor}

    def app(self) -> FastAPI:
        api = FastAPI(title="fake WeCom API", openapi_url=None, docs_url=None, redoc_url=None)

        @api.get("/cgi-bin/gettoken")
        async def gettoken(corpid: str = "", corpsecret: str = "") -> dict[str, Any]:
            return self.gettoken(corpid, corpsecret)

        @api.post("/cgi-bin/externalcontact/add_msg_template", response_model=None)
        async def add_msg_template(request: Request, access_token: str = "") -> Any:
            body = await request.json()
            fault = self.faults.next(body)
            answer = self.add_msg_template(access_token, body, fault)
            if fault == "slow":
                await asyncio.sleep(self.faults.slow_seconds)
            if fault == "drop":
                return dropped_answer()
            return answer

        @api.post("/cgi-bin/externalcontact/get_groupmsg_send_result")
        async def send_result(request: Request, access_token: str = "") -> dict[str, Any]:
            return self.send_result(access_token, await request.json())

        return api
