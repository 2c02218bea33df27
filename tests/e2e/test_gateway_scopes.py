"""The walk: every HTTP route and every PosService RPC is in the one policy
table, refuses a caller without its scope (403 SCOPE_MISSING) and lets one
with it through (whatever the route then answers, it is not 401 / 403).

A route or RPC added without a policy entry fails here."""

from __future__ import annotations

import re
import uuid

import grpc
import httpx
import pytest

from gateway.app import Gateway
from gateway.auth import policy
from gateway.auth.admin import ClientAdmin, IssuedKey
from gateway.auth.client import HmacAuth, StoreKeyInterceptor
from gateway.auth.http import RouteTable
from gateway.auth.model import (
    ADMIN_ALL,
    KNOWN_SCOPES,
    MEMBER_ANY,
    MEMBER_SELF,
    POS_CHECKOUT,
    ClientKind,
    operator_only,
)
from loyalty.pos.v1 import pos_pb2
from servicekit.errors import error_info

from .doors import UNLIMITED

pytestmark = pytest.mark.e2e

APP_ID = "wx-walk"
STORE = "SH001"
DUMMY_ID = "00000000-0000-4000-8000-000000000000"


def without(scope: str) -> list[str]:
    """Every scope except `scope` and those that would grant it."""
    wider = {MEMBER_SELF: {MEMBER_ANY}}.get(scope, set())
    if scope.startswith("admin:"):
        wider = {ADMIN_ALL}
    return sorted(KNOWN_SCOPES - {scope} - wider)


def fill(template: str, member_id: str) -> str:
    path = template.replace("{member_id}", member_id)
    return re.sub(r"\{[^}]+\}", DUMMY_ID, path)


@pytest.fixture(scope="module")
async def walk_member(http: httpx.AsyncClient) -> tuple[str, str]:
    openid = f"o-walk-{uuid.uuid4().hex[:10]}"
    reply = await http.post(
        "/v1/members/identify",
        json={"request_key": str(uuid.uuid4()), "app_id": APP_ID, "openid": openid},
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["member"]["member_id"], openid


async def test_every_route_is_in_the_policy(gateway: Gateway) -> None:
    assert gateway.http_app is not None
    routes = RouteTable(gateway.http_app).routes()
    assert len(routes) > 40
    missing = [
        (m, template)
        for methods, template, _, _ in routes
        for m in methods
        if m != "HEAD"
        and not policy.is_public(m, template)
        and policy.route_scope(m, template) is None
    ]
    assert missing == []
    # Nothing public writes without proof: the token exchange checks the key in
    # its body, WeCom's callback WeCom's signature over its encrypted body
    # (tests/integration/test_guides_callbacks.py: tampered and forged refused),
    # Aliyun's SMS reports the callback token configured with the URL.
    assert {r for r in policy.PUBLIC_ROUTES if r[0] != "GET"} == {
        ("POST", "/v1/auth/token"),
        ("POST", "/v1/wecom/callback"),
        ("POST", "/v1/callbacks/sms/aliyun"),
    }


async def test_every_route_refuses_without_its_scope_and_admits_with_it(
    gateway: Gateway, client_admin: ClientAdmin, walk_member: tuple[str, str]
) -> None:
    assert gateway.http_app is not None
    member_id, openid = walk_member
    base = f"http://127.0.0.1:{gateway.http_port}"
    keys: dict[tuple[str, bool], IssuedKey] = {}

    async def key(scope: str, granted: bool) -> IssuedKey:
        if (scope, granted) not in keys:
            keys[(scope, granted)] = await client_admin.create(
                ClientKind.OPS_TOOLING,
                f"walk {'with' if granted else 'without'} {scope}",
                scopes=[scope] if granted else without(scope),
                **UNLIMITED,  # type: ignore[arg-type]
            )
        return keys[(scope, granted)]

    asserted = {"X-Member-Appid": APP_ID, "X-Member-Openid": openid}
    walk = [
        (method, template, scope)
        for methods, template, _, _ in RouteTable(gateway.http_app).routes()
        for method in sorted(methods - {"HEAD"})
        # None: public; test_every_route_is_in_the_policy covers the rest.
        if (scope := policy.route_scope(method, template)) is not None
    ]
    # Every key first: each registration makes the gateway reload its cache once.
    for scope in sorted({scope for _, _, scope in walk}):
        await key(scope, False)
        await key(scope, True)
    walked = 0
    # One connection pool for the walk; each request carries its own key.
    async with httpx.AsyncClient(base_url=base, timeout=10, headers=asserted) as client:
        for method, template, scope in walk:
            path = fill(template, member_id)
            body = {} if method in ("POST", "PUT", "PATCH") else None
            refused_key, admitted_key = await key(scope, False), await key(scope, True)
            refused = await client.request(
                method, path, json=body, auth=HmacAuth(refused_key.key_id, refused_key.secret)
            )
            assert refused.status_code == 403, (method, template, refused.text)
            assert refused.json()["code"] == "SCOPE_MISSING", (method, template)
            admitted = await client.request(
                method, path, json=body, auth=HmacAuth(admitted_key.key_id, admitted_key.secret)
            )
            # Past the door: validation, 404 or the route's own answer, never 401/403.
            assert admitted.status_code not in (401, 403), (method, template, admitted.text)
            walked += 1
    assert walked > 40


async def test_every_pos_rpc_refuses_without_its_scope_and_admits_with_it(
    gateway: Gateway, client_admin: ClientAdmin
) -> None:
    service = pos_pb2.DESCRIPTOR.services_by_name["PosService"]
    granted = await client_admin.create(
        ClientKind.POS,
        "walk till",
        store_id=STORE,
        **UNLIMITED,  # type: ignore[arg-type]
    )
    denied = await client_admin.create(
        ClientKind.POS,
        "walk till without pos:checkout",
        store_id=STORE,
        # Every scope a POS may hold but pos:checkout (admin scopes and
        # pii:read are for operator kinds only).
        scopes=[s for s in without(POS_CHECKOUT) if not operator_only(s)],
        **UNLIMITED,  # type: ignore[arg-type]
    )
    target = f"127.0.0.1:{gateway.pos_grpc_port}"
    assert service.methods
    for method in service.methods:
        full = f"/{service.full_name}/{method.name}"
        assert policy.rpc_scope(full) is not None, full
        request_type = getattr(pos_pb2, method.input_type.name)
        response_type = getattr(pos_pb2, method.output_type.name)
        request = request_type(store_id=STORE)
        outcomes = {}
        for name, issued in (("denied", denied), ("granted", granted)):
            async with grpc.aio.insecure_channel(
                target, interceptors=[StoreKeyInterceptor(STORE, issued.api_key)]
            ) as channel:
                call = channel.unary_unary(
                    full,
                    request_serializer=request_type.SerializeToString,
                    response_deserializer=response_type.FromString,
                )
                try:
                    await call(request, timeout=10)
                    outcomes[name] = (grpc.StatusCode.OK, "")
                except grpc.aio.AioRpcError as exc:
                    outcomes[name] = (exc.code(), error_info(exc)[0])
        assert outcomes["denied"] == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING"), full
        assert outcomes["granted"][0] not in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
        ), (full, outcomes["granted"])
