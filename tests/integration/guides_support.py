"""Helpers of the guides tests: WeCom's side of a callback (encrypt, sign, wrap)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import datetime

import grpc

from loyalty.guides.v1 import guides_pb2, guides_pb2_grpc
from servicekit.db import Database, create_pool
from services.guides.handlers import GuidesHandlers
from services.guides.server import build
from services.guides.settings import GuidesSettings
from services.guides.wecom_crypto import WeComCrypto

from ..harness import Infra, ServiceClock


def wecom_crypto(corp_id: str) -> WeComCrypto:
    s = GuidesSettings()
    return WeComCrypto(s.wecom_callback_token, s.wecom_encoding_aes_key, corp_id)


def contact_event(
    change: str, staff_id: str, external_userid: str, created: datetime, state: str = ""
) -> bytes:
    return (
        "<xml><ToUserName><![CDATA[corp]]></ToUserName>"
        "<FromUserName><![CDATA[sys]]></FromUserName>"
        f"<CreateTime>{int(created.timestamp())}</CreateTime>"
        "<MsgType><![CDATA[event]]></MsgType>"
        "<Event><![CDATA[change_external_contact]]></Event>"
        f"<ChangeType><![CDATA[{change}]]></ChangeType>"
        f"<UserID><![CDATA[{staff_id}]]></UserID>"
        f"<ExternalUserID><![CDATA[{external_userid}]]></ExternalUserID>"
        f"<State><![CDATA[{state}]]></State></xml>"
    ).encode()


def signed_callback(
    crypto: WeComCrypto, message: bytes, sent_at: datetime, nonce: str | None = None
) -> guides_pb2.CallbackRequest:
    encrypted = crypto.encrypt(message)
    ts = str(int(sent_at.timestamp()))
    nonce = nonce or uuid.uuid4().hex[:10]
    body = (
        f"<xml><ToUserName><![CDATA[{crypto.receive_id}]]></ToUserName>"
        f"<Encrypt><![CDATA[{encrypted}]]></Encrypt><AgentID>1</AgentID></xml>"
    ).encode()
    return guides_pb2.CallbackRequest(
        msg_signature=crypto.signature(ts, nonce, encrypted), timestamp=ts, nonce=nonce, body=body
    )


async def add_customer(
    stub: guides_pb2_grpc.GuidesServiceStub,
    crypto: WeComCrypto,
    clock: ServiceClock,
    staff_id: str,
    external_userid: str,
) -> guides_pb2.CallbackResponse:
    now = clock()
    return await stub.ReceiveCallback(
        signed_callback(
            crypto, contact_event("add_external_contact", staff_id, external_userid, now), now
        ),
        timeout=5,
    )


def uid(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def new_staff(
    stub: guides_pb2_grpc.GuidesServiceStub,
    store_id: str,
    role: int = guides_pb2.STAFF_ROLE_GUIDE,
    code: str = "",
) -> guides_pb2.Staff:
    return await stub.UpsertStaff(
        guides_pb2.Staff(
            staff_id=uid("g"),
            name="导购",
            store_id=store_id,
            role=role,
            staff_code=code,
            actor="op",
        ),
        timeout=5,
    )


def rpc_reason(err: grpc.aio.AioRpcError) -> str:
    from servicekit.errors import error_info

    return error_info(err)[0]


@contextlib.asynccontextmanager
async def guides_handlers(
    infra: Infra, clock: ServiceClock
) -> AsyncIterator[tuple[GuidesHandlers, Database]]:
    """The guides use cases on their own pool, unserved (no consumer, no loops):
    a test hands them events itself, on a pinned clock."""
    settings = GuidesSettings(**infra.service_settings().model_dump(), member_addr="127.0.0.1:1")
    app = build(settings, clock=clock)
    pool = await create_pool(infra.database_url, 1, 4)
    try:
        yield app.handlers, Database(pool, "guides", "guides")
    finally:
        await pool.close()
        await app.handlers.wecom.close()
        await app.handlers.members.close()
        if app.handlers.coupons is not None:
            await app.handlers.coupons.close()
