"""`python -m gateway`: serve HTTP and POS gRPC until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio

from servicekit.logs import configure_logging

from .app import NAME, build
from .settings import GatewaySettings


def main() -> None:
    settings = GatewaySettings()
    configure_logging(NAME, settings.log_level, settings.log_json)
    gateway = build(settings)
    try:
        import uvloop
    except ImportError:
        asyncio.run(gateway.run_until_signalled())
    else:
        uvloop.run(gateway.run_until_signalled())


if __name__ == "__main__":
    main()
