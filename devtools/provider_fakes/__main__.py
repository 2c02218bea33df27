"""`python -m devtools.provider_fakes --port 8098 [--report-url URL]`: every
provider fake on one port for `make run`, lenient (every openid has credit,
every WeCom contact is a customer); accepted SMS get a delivery report pushed
to --report-url (the gateway's callback) a second later. Never deploy this."""

from __future__ import annotations

import argparse
import asyncio
import logging

from .stack import build_stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8098)
    parser.add_argument("--report-url", default="", help="where SMS delivery reports go")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stack = build_stack(strict=False, report_url=args.report_url, host=args.host, port=args.port)
    logging.getLogger(__name__).info("provider fakes on %s", stack.server.base_url)
    asyncio.run(stack.server.serve_forever())


if __name__ == "__main__":
    main()
