"""Guides' WeCom client shares the corp access token with its other replicas
through Redis (servicekit/wecom.py, the client engagement's WeCom channel
uses): two WeComApi objects on one Redis fetch it once, and a token WeCom
refuses is replaced once, for both."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime

from servicekit.redis_client import create_redis
from services.guides.wecom import FAKE_URL, FakeWeCom, WeComApi
from tests.harness import Infra

# Any instant: the token's expiry is measured on this clock, not today's.
AT = datetime(2030, 6, 3, 1, 0, tzinfo=UTC)


def _replica(fake: FakeWeCom, infra: Infra, namespace: str) -> WeComApi:
    return WeComApi(
        FAKE_URL,
        fake.corp_id,
        fake.secret,
        create_redis(infra.redis_url),
        namespace,
        lambda: AT,
        transport=fake.transport(),
        owns_redis=True,
    )


async def test_two_guides_replicas_fetch_the_corp_token_once(infra: Infra) -> None:
    fake = FakeWeCom(msgid_prefix=f"tk{uuid.uuid4().hex[:6]}-")
    namespace = f"{infra.namespace}-{uuid.uuid4().hex[:8]}"
    one, two = _replica(fake, infra, namespace), _replica(fake, infra, namespace)
    try:
        msgids = await asyncio.gather(
            one.add_msg_template("g1", ["wm1", "wm2"], "hello"),
            two.add_msg_template("g2", ["wm3"], "hello"),
            one.add_msg_template("g1", ["wm4"], "again"),
            two.add_msg_template("g2", ["wm5"], "again"),
        )
        assert len(set(msgids)) == 4
        fake.msg_tasks[msgids[0]]["status"]["wm1"] = 1
        assert await two.send_results(msgids[0], "g1") == {"wm1": 1, "wm2": 0}
        assert fake.calls.count("/gettoken") == 1
        assert one.corp.tokens.fetches + two.corp.tokens.fetches == 1

        # A token WeCom refuses (40014, e.g. the secret was reset): replaced
        # once, by one replica; the other reads the new one from Redis.
        key = f"{namespace}:provider-token:wecom:{fake.corp_id}:guides"
        stale = {"token": "revoked", "expires_at": AT.timestamp() + 3600}
        await one.corp.tokens._redis.set(key, json.dumps(stale))
        one.corp.tokens._memo = two.corp.tokens._memo = None
        await asyncio.gather(
            one.add_msg_template("g1", ["wm6"], "third"),
            two.add_msg_template("g2", ["wm7"], "third"),
        )
        assert fake.calls.count("/gettoken") == 2
    finally:
        await one.close()
        await two.close()
