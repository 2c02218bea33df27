"""Production refuses development secrets (issue 15 item 8).

LOYALTY_ENV is `production` unless set: `python -m ...` is production by
default; `make run`, the benchmark (devtools/supervisor.py) and the tests set
`development`. In production a process refuses to start, with one log line
naming every offending setting, when a secret it uses is missing, too short,
or a value known from this repository (the defaults, the demo's), and when
AUTH_ENABLED=false is set on an address other than loopback.

Each process names its own secrets (`secret_problems`); `refuse_unsafe` is
called where the process is built (services/member/server.py,
gateway/app.py), so nothing is served first.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

DEVELOPMENT = "development"
PRODUCTION = "production"
# Base64 keys decode to this many bytes at least; text secrets are this long.
MIN_KEY_BYTES = 32
MIN_TEXT_SECRET = 32
# Words that mark a value as a placeholder wherever it appears.
_DEV_MARKERS = ("dev-only", "change-me", "changeme", "example", "e2e-")


def _decoded(value: str) -> bytes | None:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def secret_problem(
    name: str, value: str, known: Iterable[str] = (), *, base64_key: bool = False
) -> str | None:
    """Why `value` may not be the production value of setting `name`; None if fine."""
    text = value.strip()
    if not text:
        return f"{name} is missing"
    decoded = _decoded(text)
    readable = (decoded or b"").decode("latin-1").lower()
    if text in set(known) or any(m in text.lower() or m in readable for m in _DEV_MARKERS):
        return f"{name} is a development value from the repository"
    if base64_key:
        if decoded is None or len(decoded) < MIN_KEY_BYTES:
            return f"{name} must be base64 of at least {MIN_KEY_BYTES} random bytes"
    elif len(text) < MIN_TEXT_SECRET:
        return f"{name} is shorter than {MIN_TEXT_SECRET} characters"
    return None


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class UnsafeForProduction(SystemExit):
    """Raised (exit status 2) after the one log line; carries the problems."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(2)
        self.problems = problems


def refuse_unsafe(process: str, environment: str, problems: list[str]) -> None:
    """In production, log one line naming every problem and stop the process."""
    if environment != PRODUCTION or not problems:
        return
    log.critical(
        "%s refuses to start with LOYALTY_ENV=production: %s (set real secrets, or "
        "LOYALTY_ENV=development on a developer machine)",
        process,
        "; ".join(problems),
    )
    raise UnsafeForProduction(problems)
