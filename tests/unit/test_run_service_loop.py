"""`python -m services.<name> serve` builds the service on the loop that serves
it: a grpc.aio channel made in build (guides' and rewards' member clients) is
bound to the loop current when it is made, and one made before the serving
loop ran failed every call with "attached to a different loop"."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from servicekit.server import run_service


class _App:
    def __init__(self, built_on: asyncio.AbstractEventLoop, channel: grpc.aio.Channel) -> None:
        self.built_on = built_on
        self.channel = channel
        self.served_on: asyncio.AbstractEventLoop | None = None
        self.state: Any = None

    async def run_until_signalled(self) -> None:
        self.served_on = asyncio.get_running_loop()
        # A call on a channel bound to another loop raises here.
        self.state = self.channel.get_state(try_to_connect=False)
        await self.channel.close()


def test_the_service_is_built_on_the_loop_that_serves_it() -> None:
    apps: list[_App] = []

    def build(settings: Any) -> _App:
        app = _App(asyncio.get_running_loop(), grpc.aio.insecure_channel("127.0.0.1:1"))
        apps.append(app)
        return app

    run_service(build, "loop-test")  # type: ignore[arg-type]
    [app] = apps
    assert app.served_on is app.built_on
    assert app.state == grpc.ChannelConnectivity.IDLE
