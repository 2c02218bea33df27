"""The WeCom server API the guides service calls (contact directory, external
contacts, resigned-staff transfer, customer tags, group chats, and the message
tasks through servicekit/wecom.py, the client engagement's WeCom channel uses),
and a local fake of it.

`WeComApi` speaks WeCom's JSON API over httpx. `FakeWeCom` implements the same
endpoints as an httpx transport, in process: tests and `make run`
(WECOM_API_BASE=fake) exercise the real client code against it, with no network.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx

from servicekit.errors import PermissionDenied, Unavailable
from servicekit.provider_tokens import TokenError
from servicekit.redis_client import RedisClient
from servicekit.wecom import WeComCorp, msg_template_body

T = TypeVar("T")

FAKE_BASE = "fake"
FAKE_URL = "https://wecom.fake/cgi-bin"


# WeCom's limits of groupchat/list: at most 100 owners per call, 1000 chats per page.
GROUP_OWNERS_PER_CALL = 100
GROUP_CHATS_PER_PAGE = 1000


@dataclass(frozen=True)
class DirectoryUser:
    staff_id: str
    name: str
    store_id: str
    role: str
    active: bool


@dataclass(frozen=True)
class ExternalContact:
    external_userid: str
    name: str
    unionid: str


class WeComError(Unavailable):
    """WeCom answered an error code, or did not answer."""

    default_code = "WECOM_ERROR"


async def _wecom(path: str, call: Awaitable[T]) -> T:
    """A shared WeCom call, its failures as WeComError: "answered errcode N"
    (retries.wecom_error_code reads N) or "did not answer"."""
    try:
        return await call
    except TokenError as exc:
        if exc.code.lstrip("-").isdigit():
            raise WeComError(f"WeCom {path} answered errcode {exc.code}: {exc}") from None
        raise WeComError(f"WeCom {path} did not answer: {exc}") from None
    except httpx.HTTPError as exc:
        raise WeComError(f"WeCom {path} did not answer: {exc!r}") from None


class _CallableClock:
    """Guides' clock (a callable) as the token cache's (`now()`)."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self.now = clock


class WeComApi:
    """Calls WeCom with the corp access token shared by every guides replica in
    Redis (servicekit/wecom.py's `WeComCorp`: refreshed before it expires, one
    fetch at a time, forced on 40001/40014/42001). The message-task calls are
    the shared ones engagement's WeCom channel makes; the directory, contacts,
    transfers, tags and group chats are guides' own."""

    def __init__(
        self,
        base_url: str,
        corp_id: str,
        secret: str,
        redis: RedisClient,
        namespace: str,
        clock: Callable[[], datetime] | None = None,
        store_attr: str = "store_id",
        role_attr: str = "role",
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 5.0,
        owns_redis: bool = False,
    ) -> None:
        self._client = httpx.AsyncClient(transport=transport, timeout=timeout)
        self._store_attr = store_attr
        self._role_attr = role_attr
        self._redis = redis if owns_redis else None
        # base_url is WeCom's .../cgi-bin; the shared client takes the root.
        self.corp = WeComCorp(
            base_url.rstrip("/").removesuffix("/cgi-bin"),
            corp_id,
            secret,
            self._client,
            redis,
            namespace,
            _CallableClock(clock or (lambda: datetime.now(UTC))),
            app="guides",
        )

    async def close(self) -> None:
        await self._client.aclose()
        if self._redis is not None:
            await self._redis.aclose()

    async def _call(
        self, method: str, path: str, body: Any = None, **params: Any
    ) -> dict[str, Any]:
        return await _wecom(path, self.corp.call(method, f"/cgi-bin{path}", body, **params))

    async def list_users(self) -> list[DirectoryUser]:
        reply = await self._call("GET", "/user/list", department_id=1, fetch_child=1)
        users = []
        for u in reply.get("userlist", []):
            attrs = {
                a.get("name"): a.get("text", {}).get("value", "")
                for a in u.get("extattr", {}).get("attrs", [])
            }
            users.append(
                DirectoryUser(
                    staff_id=u["userid"],
                    name=u.get("name", ""),
                    store_id=attrs.get(self._store_attr, ""),
                    role=attrs.get(self._role_attr, "") or "guide",
                    # 1 active; 2 disabled, 4 not activated, 5 left.
                    active=int(u.get("status", 1)) in (1, 4),
                )
            )
        return users

    async def user_of_code(self, code: str) -> str:
        """The staff member behind a WeCom OAuth code (the sidebar page's login)."""
        reply = await self._call("GET", "/auth/getuserinfo", code=code)
        user = str(reply.get("userid") or reply.get("UserId") or "")
        if not user:
            # A refusal, not an outage (WeComError is UNAVAILABLE): the caller
            # answers it as INVALID_OAUTH_CODE.
            raise PermissionDenied("the OAuth code is not a member of the corp", code="NOT_STAFF")
        return user

    async def owned_group_chats(self, owners: list[str]) -> list[str]:
        """The customer group chats these staff members own (groupchat/list,
        every status, page by page): their chat ids."""
        chats: list[str] = []
        for start in range(0, len(owners), GROUP_OWNERS_PER_CALL):
            cursor = ""
            while True:
                reply = await self._call(
                    "POST",
                    "/externalcontact/groupchat/list",
                    {
                        "status_filter": 0,
                        "owner_filter": {
                            "userid_list": owners[start : start + GROUP_OWNERS_PER_CALL]
                        },
                        "cursor": cursor,
                        "limit": GROUP_CHATS_PER_PAGE,
                    },
                )
                chats += [g["chat_id"] for g in reply.get("group_chat_list", [])]
                cursor = str(reply.get("next_cursor") or "")
                if not cursor:
                    break
        return chats

    async def group_owner(self, chat_id: str) -> str:
        """The staff member who owns a customer group chat (groupchat/get)."""
        reply = await self._call(
            "POST", "/externalcontact/groupchat/get", {"chat_id": chat_id, "need_name": 0}
        )
        return str(reply.get("group_chat", {}).get("owner", ""))

    async def group_members(self, chat_id: str) -> dict[str, int]:
        """A customer group chat's customers: external_userid -> join time (unix)."""
        reply = await self._call(
            "POST", "/externalcontact/groupchat/get", {"chat_id": chat_id, "need_name": 0}
        )
        return {
            m["userid"]: int(m.get("join_time", 0))
            for m in reply.get("group_chat", {}).get("member_list", [])
            if int(m.get("type", 0)) == 2  # 1: staff, 2: customer
        }

    async def add_msg_template(self, sender: str, external_userids: list[str], text: str) -> str:
        """A message task for the staff member to send to these customers
        (WeCom asks them to confirm it); returns WeCom's msgid."""
        body = msg_template_body(sender, external_userids, text)
        reply = await _wecom("/externalcontact/add_msg_template", self.corp.add_msg_template(body))
        return str(reply["msgid"])

    async def send_results(self, msgid: str, sender: str) -> dict[str, int]:
        """external_userid -> WeCom's status: 0 not sent yet, 1 sent, 2 not a
        contact any more, 3 the customer already got a mass message today."""
        rows = await _wecom(
            "/externalcontact/get_groupmsg_send_result",
            self.corp.send_result(msgid, sender, limit=1000),
        )
        return {row["external_userid"]: int(row.get("status", 0)) for row in rows}

    async def get_external_contact(self, external_userid: str) -> ExternalContact:
        reply = await self._call("GET", "/externalcontact/get", external_userid=external_userid)
        c = reply.get("external_contact", {})
        return ExternalContact(external_userid, c.get("name", ""), c.get("unionid", ""))

    async def transfer_resigned(
        self, handover: str, takeover: str, external_userids: list[str]
    ) -> dict[str, int]:
        """external_userid -> WeCom errcode (0: transferred)."""
        out: dict[str, int] = {}
        # WeCom takes at most 100 customers per call.
        for i in range(0, len(external_userids), 100):
            reply = await self._call(
                "POST",
                "/externalcontact/resigned/transfer_customer",
                {
                    "handover_userid": handover,
                    "takeover_userid": takeover,
                    "external_userid": external_userids[i : i + 100],
                },
            )
            for c in reply.get("customer", []):
                out[c["external_userid"]] = int(c.get("errcode", 0))
        return out

    async def transfer_result(self, handover: str, takeover: str) -> dict[str, tuple[int, int]]:
        """external_userid -> (status, takeover unix time) of the customers
        handed from a resigned staff member to a takeover (resigned/transfer_result):
        1 taken over, 2 waiting (WeCom takes over 24 hours after the request),
        3 the customer refused, 4 the takeover has reached its customer limit."""
        out: dict[str, tuple[int, int]] = {}
        cursor = ""
        while True:
            reply = await self._call(
                "POST",
                "/externalcontact/resigned/transfer_result",
                {"handover_userid": handover, "takeover_userid": takeover, "cursor": cursor},
            )
            for c in reply.get("customer", []):
                out[c["external_userid"]] = (
                    int(c.get("status", 0)),
                    int(c.get("takeover_time", 0)),
                )
            cursor = str(reply.get("next_cursor") or "")
            if not cursor:
                return out

    async def mark_tags(
        self, staff_id: str, external_userid: str, add: list[str], remove: list[str]
    ) -> None:
        """Tags by name under the corp tag group "loyalty"; ids come from WeCom."""
        ids = await self._tag_ids([*add, *remove])
        await self._call(
            "POST",
            "/externalcontact/mark_tag",
            {
                "userid": staff_id,
                "external_userid": external_userid,
                "add_tag": [ids[t] for t in add],
                "remove_tag": [ids[t] for t in remove],
            },
        )

    async def _tag_ids(self, names: list[str]) -> dict[str, str]:
        if not names:
            return {}
        reply = await self._call("POST", "/externalcontact/get_corp_tag_list", {})
        ids = {
            t["name"]: t["id"]
            for g in reply.get("tag_group", [])
            if g.get("group_name") == "loyalty"
            for t in g.get("tag", [])
        }
        missing = [n for n in dict.fromkeys(names) if n not in ids]
        if missing:
            created = await self._call(
                "POST",
                "/externalcontact/add_corp_tag",
                {"group_name": "loyalty", "tag": [{"name": n} for n in missing]},
            )
            for t in created.get("tag_group", {}).get("tag", []):
                ids[t["name"]] = t["id"]
        return ids


@dataclass
class FakeWeCom:
    """WeCom's server API in memory, as an httpx transport."""

    corp_id: str = "wwfakecorp"
    secret: str = "fake-secret"
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    contacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    # external_userid -> errcode the transfer answers (default 0).
    transfer_errors: dict[str, int] = field(default_factory=dict)
    transfers: list[dict[str, Any]] = field(default_factory=list)
    tag_groups: dict[str, str] = field(default_factory=dict)  # name -> id
    # (staff, external_userid) -> tag names currently marked
    marked: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    # OAuth code -> staff user id (each code works once, as WeCom's do).
    oauth_codes: dict[str, str] = field(default_factory=dict)
    # chat_id -> {external_userid: join time}
    groups: dict[str, dict[str, int]] = field(default_factory=dict)
    # chat_id -> the staff member who owns the group (groupchat/list).
    group_owners: dict[str, str] = field(default_factory=dict)
    # msgid -> the task as sent, and per customer the send status (0 until the guide sends)
    msg_tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Faults a test sets: sender -> errcode add_msg_template answers;
    # staff -> errcode mark_tag answers. msgids start with msgid_prefix.
    template_errors: dict[str, int] = field(default_factory=dict)
    mark_errors: dict[str, int] = field(default_factory=dict)
    msgid_prefix: str = "msg"
    # external_userid -> resigned/transfer_result status (default 2, waiting).
    transfer_status: dict[str, int] = field(default_factory=dict)

    def add_user(
        self, staff_id: str, name: str, store_id: str, role: str = "guide", status: int = 1
    ) -> None:
        self.users[staff_id] = {
            "userid": staff_id,
            "name": name,
            "status": status,
            "extattr": {
                "attrs": [
                    {"type": 0, "name": "store_id", "text": {"value": store_id}},
                    {"type": 0, "name": "role", "text": {"value": role}},
                ]
            },
        }

    def add_contact(self, external_userid: str, name: str, unionid: str = "") -> None:
        self.contacts[external_userid] = {
            "external_userid": external_userid,
            "name": name,
            "unionid": unionid,
        }

    def _fault(self, path: str, body: dict[str, Any]) -> httpx.Response | None:
        """What WeCom answers that is not a success: a test's injected errcode,
        a tag name over WeCom's 30 characters, and transfer_result."""
        code = 0
        if path == "/externalcontact/add_msg_template":
            code = self.template_errors.get(body.get("sender", ""), 0)
        elif path == "/externalcontact/mark_tag":
            code = self.mark_errors.get(body.get("userid", ""), 0)
        elif path == "/externalcontact/add_corp_tag":
            if any(len(t.get("name", "")) > 30 for t in body.get("tag", [])):
                code = 40071  # WeCom: the tag name is too long
        elif path == "/externalcontact/resigned/transfer_result":
            pair = (body.get("handover_userid"), body.get("takeover_userid"))
            exts = [
                e
                for t in self.transfers
                if (t["handover_userid"], t["takeover_userid"]) == pair
                for e in t["external_userid"]
                if self.transfer_errors.get(e, 0) == 0
            ]
            rows = [
                {"external_userid": e, "status": self.transfer_status.get(e, 2),
                 "takeover_time": 1_700_000_000 if self.transfer_status.get(e, 2) == 1 else 0}
                for e in dict.fromkeys(exts)
            ]  # fmt: skip
            return httpx.Response(200, json={"errcode": 0, "customer": rows, "next_cursor": ""})
        if code:
            return httpx.Response(200, json={"errcode": code, "errmsg": f"fake fault {code}"})
        return None

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/cgi-bin")
        self.calls.append(path)
        params = request.url.params
        body = json.loads(request.content) if request.content else {}
        if path == "/gettoken":
            if params.get("corpid") != self.corp_id or params.get("corpsecret") != self.secret:
                return httpx.Response(200, json={"errcode": 40001, "errmsg": "invalid credential"})
            return httpx.Response(
                200, json={"errcode": 0, "access_token": "fake-token", "expires_in": 7200}
            )
        if params.get("access_token") != "fake-token":
            return httpx.Response(200, json={"errcode": 40014, "errmsg": "invalid access_token"})
        if path == "/auth/getuserinfo":
            user = self.oauth_codes.pop(params.get("code", ""), None)
            if user is None:
                return httpx.Response(200, json={"errcode": 40029, "errmsg": "invalid code"})
            return httpx.Response(200, json={"errcode": 0, "userid": user})
        if path == "/externalcontact/groupchat/list":
            owners = set(body.get("owner_filter", {}).get("userid_list", []))
            owned = sorted(c for c, o in self.group_owners.items() if not owners or o in owners)
            start, limit = int(body.get("cursor") or 0), int(body.get("limit", 100))
            page = owned[start : start + limit]
            more = start + limit < len(owned)
            return httpx.Response(
                200,
                json={
                    "errcode": 0,
                    "group_chat_list": [{"chat_id": c, "status": 0} for c in page],
                    "next_cursor": str(start + limit) if more else "",
                },
            )
        if path == "/externalcontact/groupchat/get":
            chat = self.groups.get(body.get("chat_id", ""))
            if chat is None:
                return httpx.Response(200, json={"errcode": 701008, "errmsg": "no such chat"})
            members = [{"userid": u, "type": 2, "join_time": t} for u, t in chat.items()]
            return httpx.Response(
                200,
                json={
                    "errcode": 0,
                    "group_chat": {
                        "chat_id": body["chat_id"],
                        "owner": self.group_owners.get(body["chat_id"], ""),
                        "member_list": members,
                    },
                },
            )
        fault = self._fault(path, body)
        if fault is not None:
            return fault
        if path == "/externalcontact/add_msg_template":
            msgid = f"{self.msgid_prefix}{len(self.msg_tasks) + 1:06d}"
            self.msg_tasks[msgid] = {
                "sender": body["sender"],
                "text": body["text"]["content"],
                "status": dict.fromkeys(body["external_userid"], 0),
            }
            return httpx.Response(200, json={"errcode": 0, "fail_list": [], "msgid": msgid})
        if path == "/externalcontact/get_groupmsg_send_result":
            if body["msgid"] not in self.msg_tasks:
                return httpx.Response(200, json={"errcode": 41063, "errmsg": "msgid not found"})
            task = self.msg_tasks[body["msgid"]]
            rows = [
                {"external_userid": e, "userid": task["sender"], "status": s}
                for e, s in task["status"].items()
            ]
            return httpx.Response(200, json={"errcode": 0, "send_list": rows, "next_cursor": ""})
        if path == "/user/list":
            return httpx.Response(200, json={"errcode": 0, "userlist": list(self.users.values())})
        if path == "/externalcontact/get":
            contact = self.contacts.get(params.get("external_userid", ""))
            if contact is None:
                return httpx.Response(
                    200, json={"errcode": 84061, "errmsg": "not external contact"}
                )
            return httpx.Response(200, json={"errcode": 0, "external_contact": contact})
        if path == "/externalcontact/resigned/transfer_customer":
            self.transfers.append(body)
            return httpx.Response(
                200,
                json={
                    "errcode": 0,
                    "customer": [
                        {"external_userid": e, "errcode": self.transfer_errors.get(e, 0)}
                        for e in body["external_userid"]
                    ],
                },
            )
        if path == "/externalcontact/get_corp_tag_list":
            tags = [{"id": i, "name": n} for n, i in self.tag_groups.items()]
            return httpx.Response(
                200, json={"errcode": 0, "tag_group": [{"group_name": "loyalty", "tag": tags}]}
            )
        if path == "/externalcontact/add_corp_tag":
            made = []
            for t in body["tag"]:
                tag_id = self.tag_groups.setdefault(t["name"], f"et{len(self.tag_groups) + 1:04d}")
                made.append({"id": tag_id, "name": t["name"]})
            return httpx.Response(200, json={"errcode": 0, "tag_group": {"tag": made}})
        if path == "/externalcontact/mark_tag":
            names = {i: n for n, i in self.tag_groups.items()}
            key = (body["userid"], body["external_userid"])
            marked = self.marked.setdefault(key, set())
            marked.update(names[i] for i in body.get("add_tag", []))
            marked.difference_update(names[i] for i in body.get("remove_tag", []))
            return httpx.Response(200, json={"errcode": 0})
        return httpx.Response(404, json={"errcode": 404, "errmsg": f"no fake for {path}"})
