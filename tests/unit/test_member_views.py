"""The member views' pure rules (servicekit/member_views.py,
gateway/member_views.py): key naming and slots, which members a relay batch
bumps, how long a view may be served, and which writes bump."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.member_views import MemberWriteBumps, centre_boundaries
from servicekit.events import make_envelope, stream_name
from servicekit.member_views import (
    KEY_TTL_SECONDS,
    VERSION,
    bump_for_envelopes,
    namespace_of_stream,
    next_local_midnight,
    valid_until,
    views_key,
)
from servicekit.redis_client import slot_of

SHANGHAI = ZoneInfo("Asia/Shanghai")
# 2031-03-04 10:30 in Shanghai (02:30 UTC): a fixed instant, never today.
NOW = datetime(2031, 3, 4, 2, 30, tzinfo=UTC)


def test_a_members_views_are_one_hash_tagged_key_in_the_namespace() -> None:
    key = views_key("loyalty", "m-1")
    assert key == "{loyalty:member-views:m-1}"
    assert slot_of(key) == slot_of("{loyalty:member-views:m-1}:anything")
    assert views_key("other", "m-1") != key


def test_the_relay_finds_the_namespace_in_its_stream_name() -> None:
    assert namespace_of_stream(stream_name("loyalty", "rewards")) == "loyalty"
    assert namespace_of_stream(stream_name("t-1:x", "tiering")) == "t-1:x"


class Pipe:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def hincrby(self, *args: Any) -> None:
        self.calls.append(("hincrby", *args))

    def expire(self, *args: Any) -> None:
        self.calls.append(("expire", *args))


def test_a_relay_batch_bumps_each_member_it_names_once() -> None:
    from loyalty.events.v1 import events_pb2

    def event(member: str) -> bytes:
        return make_envelope("rewards", events_pb2.OrderCompleted(), member).SerializeToString()

    pipe = Pipe()
    envelopes = [event("b"), event("a"), event("b"), event(""), b"\xff not protobuf"]
    bump_for_envelopes(pipe, stream_name("ns", "rewards"), envelopes)
    assert pipe.calls == [
        ("hincrby", views_key("ns", "a"), VERSION, 1),
        ("expire", views_key("ns", "a"), KEY_TTL_SECONDS),
        ("hincrby", views_key("ns", "b"), VERSION, 1),
        ("expire", views_key("ns", "b"), KEY_TTL_SECONDS),
    ]


def test_the_next_local_midnight() -> None:
    assert next_local_midnight(NOW, SHANGHAI) == datetime(2031, 3, 5, tzinfo=SHANGHAI)
    # 23:59 local is one minute before it; 00:00 local is a whole day before the next.
    late = datetime(2031, 3, 4, 15, 59, tzinfo=UTC)
    assert next_local_midnight(late, SHANGHAI) - late == timedelta(minutes=1)
    midnight = datetime(2031, 3, 4, 16, 0, tzinfo=UTC)
    assert next_local_midnight(midnight, SHANGHAI) - midnight == timedelta(days=1)
    # A zone with summer time: the day before the change is 23 hours long.
    ny = ZoneInfo("America/New_York")
    before = datetime(2031, 3, 9, 5, 0, tzinfo=UTC)  # 00:00 EST, the change is at 02:00
    assert next_local_midnight(before, ny) - before == timedelta(hours=23)


def test_a_view_is_served_until_the_earliest_of_ttl_midnight_and_its_boundaries() -> None:
    assert valid_until(NOW, 120, SHANGHAI) == NOW + timedelta(seconds=120)
    # Ten seconds before local midnight: the window slides, the view goes.
    late = datetime(2031, 3, 4, 15, 59, 50, tzinfo=UTC)
    assert valid_until(late, 120, SHANGHAI) == late + timedelta(seconds=10)
    expiry = NOW + timedelta(seconds=30)
    assert valid_until(NOW, 120, SHANGHAI, [None, expiry, NOW + timedelta(hours=1)]) == expiry
    # A boundary already passed is not one the view waits for.
    assert valid_until(NOW, 120, SHANGHAI, [NOW - timedelta(days=1), NOW]) == NOW + timedelta(
        seconds=120
    )


def test_the_centre_names_override_grace_and_expiry_boundaries() -> None:
    class Obj:
        def __init__(self, **kw: Any) -> None:
            self.__dict__.update(kw)

    o, g, e = (NOW + timedelta(hours=h) for h in (1, 2, 3))
    centre = Obj(
        tier=Obj(override_until=o, grace_until=g),
        points=Obj(expiring_soon=[Obj(expires_at=e)]),
    )
    assert centre_boundaries(centre) == [o, g, e]
    assert centre_boundaries(Obj(tier=None, points=None)) == []


class Views:
    def __init__(self) -> None:
        self.bumped: list[str] = []

    async def bump(self, *member_ids: str) -> None:
        self.bumped.extend(member_ids)


@pytest.mark.parametrize(
    ("method", "path", "status", "bumped"),
    [
        ("POST", "/v1/members/m-1/points/holds", 200, ["m-1"]),
        ("POST", "/v1/members/m-1/growth-actions", 201, ["m-1"]),
        ("DELETE", "/v1/workstation/members/m-2/tags/vip", 204, ["m-2"]),
        ("POST", "/v1/admin/members/m-3/points/adjustments", 200, ["m-3"]),
        # A timeout may follow a committed write.
        ("POST", "/v1/members/m-1/points/holds", 504, ["m-1"]),
        ("POST", "/v1/members/m-1/points/holds", 409, []),
        ("GET", "/v1/members/m-1/centre", 200, []),
        ("POST", "/v1/admin/coupons:issue", 200, []),
        ("POST", "/v1/members/identify", 200, []),
    ],
)
async def test_member_scoped_writes_bump_before_the_reply_starts(
    method: str, path: str, status: int, bumped: list[str]
) -> None:
    views = Views()
    sent: list[tuple[str, list[str]]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message: Any) -> None:
        sent.append((message["type"], list(views.bumped)))

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    middleware = MemberWriteBumps(app, views)  # type: ignore[arg-type]
    await middleware({"type": "http", "method": method, "path": path}, receive, send)
    assert views.bumped == bumped
    # Bumped before the response started: the caller's next read sees it.
    assert sent[0] == ("http.response.start", bumped)
