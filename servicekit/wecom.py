"""The WeCom corp API calls both engagement (its WeCom channel) and guides (its
guide tasks and directory) make, written once: the corp access token through
the Redis-shared `TokenCache` (one fetch for every replica, refreshed before it
expires, forced after 40001/40014/42001), the errcode call wrapper, the
message-task body (add_msg_template), and the cursor-paged reads of a task
(get_groupmsg_task, get_groupmsg_send_result).

`WeComCorp` takes the API's root (https://qyapi.weixin.qq.com); paths start
with /cgi-bin. Errors are `TokenError(code, message)`: `code` is WeCom's
errcode as text (or HTTP_<status> when something else answered); httpx errors
pass through. Each service maps them to its own outcomes (engagement: a
`Delivery`; guides: `WeComError`).
"""

from __future__ import annotations

from typing import Any

import httpx

from .provider_tokens import TOKEN_ERRCODES, Clock, TokenCache, TokenError, response_json
from .redis_client import RedisClient

ADD_MSG_TEMPLATE = "/cgi-bin/externalcontact/add_msg_template"
GET_GROUPMSG_TASK = "/cgi-bin/externalcontact/get_groupmsg_task"
GET_GROUPMSG_SEND_RESULT = "/cgi-bin/externalcontact/get_groupmsg_send_result"

# add_msg_template errcodes that mean the task was not taken and asking later can
# succeed (-1 busy, 45009/45011 frequency limits, 45033 too many concurrent calls).
WECOM_RETRY = frozenset({-1, 45009, 45011, 45033})


def msg_template_body(
    sender: str,
    external_userids: list[str],
    text: str = "",
    miniprogram: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """add_msg_template's body for customers (chat_type single): text and an
    optional mini-program card; no sender = every staff member who has them."""
    out: dict[str, Any] = {"chat_type": "single", "external_userid": list(external_userids)}
    if sender:
        out["sender"] = sender
    if text:
        out["text"] = {"content": text}
    if miniprogram:
        out["attachments"] = [{"msgtype": "miniprogram", "miniprogram": miniprogram}]
    return out


class WeComCorp:
    """One WeCom corp app (corp id + secret) with its token shared in Redis."""

    def __init__(
        self,
        base_url: str,
        corp_id: str,
        corp_secret: str,
        client: httpx.AsyncClient,
        redis: RedisClient,
        namespace: str,
        clock: Clock,
        app: str = "",
    ) -> None:
        self.base = base_url.rstrip("/")
        self._corp_id = corp_id
        self._secret = corp_secret
        self.client = client
        # One key per corp app: two apps of one corp (two secrets) have two tokens.
        key = f"{namespace}:provider-token:wecom:{corp_id}" + (f":{app}" if app else "")
        self.tokens = TokenCache(redis, key, self.fetch_token, clock)

    async def fetch_token(self, force: bool) -> tuple[str, int]:
        reply = await self.client.get(
            f"{self.base}/cgi-bin/gettoken",
            params={"corpid": self._corp_id, "corpsecret": self._secret},
        )
        data = await response_json(reply) or {}
        if int(data.get("errcode", 0) or 0) != 0 or not data.get("access_token"):
            code = str(data.get("errcode", f"HTTP {reply.status_code}"))
            raise TokenError(code, f"gettoken refused: {code}")
        return str(data["access_token"]), int(data.get("expires_in", 7200))

    async def post(self, path: str, token: str, body: dict[str, Any]) -> httpx.Response:
        """One POST with this token, the reply as it came (engagement classifies it)."""
        return await self.client.post(
            f"{self.base}{path}", params={"access_token": token}, json=body
        )

    async def call(self, method: str, path: str, body: Any = None, **params: Any) -> dict[str, Any]:
        """One call with the shared token; a token errcode refreshes it (once,
        across replicas) and calls again. Any other errcode, a non-2xx or a
        reply that is not JSON: TokenError."""
        token = await self.tokens.get()
        for attempt in (1, 2):
            reply = await self.client.request(
                method, f"{self.base}{path}", params={"access_token": token, **params}, json=body
            )
            data = await response_json(reply) if reply.is_success else None
            if data is None:
                raise TokenError(f"HTTP_{reply.status_code}", f"{path}: HTTP {reply.status_code}")
            code = int(data.get("errcode", 0) or 0)
            if code in TOKEN_ERRCODES and attempt == 1:
                token = await self.tokens.refresh(token)
                continue
            if code != 0:
                raise TokenError(str(code), str(data.get("errmsg", ""))[:200])
            return data
        raise AssertionError("unreachable")

    async def add_msg_template(self, body: dict[str, Any]) -> dict[str, Any]:
        """A message task (body: msg_template_body); WeCom's answer (msgid, fail_list)."""
        return await self.call("POST", ADD_MSG_TEMPLATE, body)

    async def pages(
        self, path: str, body: dict[str, Any], rows: str, limit: int
    ) -> list[dict[str, Any]]:
        """Every page of one of WeCom's cursor-paged reads."""
        out: list[dict[str, Any]] = []
        cursor = ""
        refreshed = False
        for _ in range(1000):
            token = await self.tokens.get()
            reply = await self.post(path, token, {**body, "limit": limit, "cursor": cursor})
            data = await response_json(reply) or {}
            code = int(data.get("errcode", -1) or 0)
            if code in TOKEN_ERRCODES and not refreshed:
                await self.tokens.refresh(token)
                refreshed = True
                continue
            if code != 0:
                raise TokenError(str(code), f"{path.rsplit('/', 1)[-1]}: {code}")
            out += list(data.get(rows) or [])
            cursor = str(data.get("next_cursor") or "")
            if not cursor:
                break
        return out

    async def task_senders(self, msgid: str, limit: int = 1000) -> list[str]:
        """The staff members a task was given to (`get_groupmsg_task`, every
        page): a task without a sender goes to every staff member who has the
        customer, so its results are read per sender."""
        rows = await self.pages(GET_GROUPMSG_TASK, {"msgid": msgid}, "task_list", limit)
        return sorted({str(r["userid"]) for r in rows if r.get("userid")})

    async def send_result(self, msgid: str, userid: str, limit: int = 500) -> list[dict[str, Any]]:
        """Per-contact outcomes of one task for one sender (status 0 not sent,
        1 sent, 2 not a friend, 3 over the contact's limit), every page. WeCom
        requires the sender's userid (40003 without it)."""
        return await self.pages(
            GET_GROUPMSG_SEND_RESULT, {"msgid": msgid, "userid": userid}, "send_list", limit
        )

    async def task_results(self, msgid: str) -> list[dict[str, Any]]:
        """Every sender's per-contact outcomes of one task, as WeCom documents
        the reading: get_groupmsg_task for its senders, then
        get_groupmsg_send_result per sender."""
        out: list[dict[str, Any]] = []
        for userid in await self.task_senders(msgid):
            out += await self.send_result(msgid, userid)
        return out
