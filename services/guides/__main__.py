"""`python -m services.guides` serves; `... migrate` migrates; operator commands:
`... staff list|add ...`, `... sync-directory`, `... sync-communities`, `... resign STAFF --takeover STAFF`,
`... tag-batch [--window-days N]`, `... repush-tags`, `... poll-transfers` (services/guides/cli.py)."""

from __future__ import annotations

import sys

from servicekit.entrypoint import main

from .server import build

if len(sys.argv) > 1 and sys.argv[1] in (
    "staff",
    "sync-directory",
    "sync-communities",
    "resign",
    "tag-batch",
    "repush-tags",
    "poll-transfers",
):
    from .cli import run

    sys.exit(run(sys.argv[1:]))
main("guides", build)
