"""`python -m services.tiering` serves; `... migrate` migrates;
`... recompute [--chunk-size N] [--as-of ISO]` runs the batch recompute of tiers,
RFM segments and lifecycle stages with a progress bar; `... report` prints the
distribution report of the latest run."""

from __future__ import annotations

import sys

from servicekit.entrypoint import main

from .server import build

if len(sys.argv) > 1 and sys.argv[1] in ("recompute", "report"):
    from .cli import run

    sys.exit(run(sys.argv[1:]))
main("tiering", build)
