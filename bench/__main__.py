"""`python -m bench [--rate R --duration S --probe ...]`; `make bench` runs the same."""

import os
import sys

# Before gRPC loads: the benchmark spawns processes (servers, pg_ctl) while its
# gRPC client is active; they exec at once, so gRPC's fork handlers (and their
# "skipping fork() handlers" notice) have nothing to protect.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from .cli import main

sys.exit(main())
