"""Fake WeCom customer contact: `GET /cgi-bin/gettoken`,
`POST /cgi-bin/externalcontact/add_msg_template`,
`POST /cgi-bin/externalcontact/get_groupmsg_task` and
`POST /cgi-bin/externalcontact/get_groupmsg_send_result`.

Validation as WeCom documents it: corp id and secret (40013, 40001), the
access token (40014 unknown, 42001 expired), chat_type, a non-empty
external_userid list (40063), text or attachments (40063), text content at
most 4000 bytes (40058). Customers belong to staff members (`add_customer`):
a task with a `sender` goes to that staff member, and a contact who is not
their customer lands in `fail_list`; a task without one goes to every staff
member who has the contact (a contact nobody has lands in `fail_list`).
`get_groupmsg_task` lists the task's senders; `get_groupmsg_send_result`
needs one sender's `userid` (an empty one is refused, 40003 invalid userid,
as WeCom does) and answers that sender's rows only, paged by cursor. Every
contact's status is 0 (not sent) until `confirm(msgid)` (the staff member
pressed send) makes it 1, or a test sets one (`set_status`: 2 not a friend, 3
limit). With `customers=None` (`make run`) everyone is every staff member's
customer.
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
    # The corp's customers (external_userid) -> the staff members (userid) who
    # have each; None = everyone is everyone's customer (`make run`).
    customers: dict[str, set[str]] | None = None
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
        sender = str(body.get("sender") or "")
        senders: dict[str, dict[str, int]] = {}
        fail: list[str] = []
        for c in contacts:
            if self.customers is None:
                staff = {sender or "fake-staff"}
            else:
                followers = self.customers.get(c, set())
                staff = ({sender} & followers) if sender else set(followers)
            if not staff:
                fail.append(c)
            for userid in staff:
                senders.setdefault(userid, {})[c] = 0
        msgid = f"msg{secrets.token_hex(10)}"
        if senders:
            self.tasks[msgid] = {"body": body, "senders": senders}
        return {"errcode": 0, "errmsg": "ok", "fail_list": fail, "msgid": msgid}

    def add_customer(self, contact: str, *staff: str) -> None:
        """The contact is a customer of these staff members (they added them)."""
        if self.customers is None:
            raise ValueError("a make-run fake treats everyone as a customer")
        self.customers.setdefault(contact, set()).update(staff)

    def confirm(self, msgid: str, userid: str | None = None) -> None:
        """The staff member (every one, when None) sent the task from their client."""
        for sender, statuses in self.tasks[msgid]["senders"].items():
            if userid is None or sender == userid:
                for contact in statuses:
                    statuses[contact] = 1

    def set_status(self, msgid: str, contact: str, status: int, userid: str | None = None) -> None:
        """One contact's result for a sender (every one, when None): 0 not sent,
        1 sent, 2 not a friend, 3 over the contact's limit."""
        if status not in (0, 1, 2, 3):
            raise ValueError(f"WeCom send status {status} does not exist")
        for sender, statuses in self.tasks[msgid]["senders"].items():
            if (userid is None or sender == userid) and contact in statuses:
                statuses[contact] = status

    @staticmethod
    def _page(rows: list[dict[str, Any]], body: dict[str, Any], most: int) -> tuple[list[Any], str]:
        limit = max(1, min(int(body.get("limit") or most), most))
        start = int(body.get("cursor") or 0)
        cursor = str(start + limit) if start + limit < len(rows) else ""
        return rows[start : start + limit], cursor

    def task_list(self, token: str, body: dict[str, Any]) -> dict[str, Any]:
        refused = self._token_error(token)
        if refused is not None:
            return refused
        task = self.tasks.get(str(body.get("msgid", "")))
        if task is None:
            return {"errcode": 41063, "errmsg": "msgid not found"}
        rows = [
            # The sender's status: 0 not sent yet, 2 sent.
            {"userid": u, "status": 2 if any(v for v in st.values()) else 0, "send_time": 0}
            for u, st in sorted(task["senders"].items())
        ]
        page, cursor = self._page(rows, body, 1000)
        return {"errcode": 0, "errmsg": "ok", "task_list": page, "next_cursor": cursor}

    def send_result(self, token: str, body: dict[str, Any]) -> dict[str, Any]:
        refused = self._token_error(token)
        if refused is not None:
            return refused
        userid = str(body.get("userid") or "")
        if not userid:
            return {"errcode": 40003, "errmsg": "invalid userid"}
        task = self.tasks.get(str(body.get("msgid", "")))
        if task is None:
            return {"errcode": 41063, "errmsg": "msgid not found"}
        rows = [
            {"external_userid": c, "userid": userid, "status": st, "send_time": 0}
            for c, st in sorted(task["senders"].get(userid, {}).items())
        ]
        page, cursor = self._page(rows, body, 1000)
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

        @api.post("/cgi-bin/externalcontact/get_groupmsg_task")
        async def task_list(request: Request, access_token: str = "") -> dict[str, Any]:
            return self.task_list(access_token, await request.json())

        @api.post("/cgi-bin/externalcontact/get_groupmsg_send_result")
        async def send_result(request: Request, access_token: str = "") -> dict[str, Any]:
            return self.send_result(access_token, await request.json())

        return api
