"""`python -m bench [SCENARIO] [options]`; `make bench BENCH_ARGS='SCENARIO ...'` runs the same.

Scenarios: `checkout` (the default: POS CompleteOrder through the gateway, with
an empty-gRPC and a raw-asyncpg baseline) and one module per capability,
`bench/<scenario>.py`, each with `main(argv) -> int`. `python -m bench list`
names them. Each scenario prints its table and writes JSON to bench/results/.
"""

import importlib
import os
import pkgutil
import sys

# Before gRPC loads: the benchmark spawns processes (servers, pg_ctl) while its
# gRPC client is active; they exec at once, so gRPC's fork handlers (and their
# "skipping fork() handlers" notice) have nothing to protect.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

# Modules in bench/ that are helpers, not scenarios.
NOT_SCENARIOS = {"cli", "loadgen", "echo_server", "sql_baseline", "cpu", "profile", "stepping"}


def scenarios() -> list[str]:
    here = os.path.dirname(__file__)
    found = {m.name for m in pkgutil.iter_modules([here]) if not m.name.startswith("_")}
    return ["checkout", *sorted(found - NOT_SCENARIOS)]


def main(argv: list[str]) -> int:
    if argv and argv[0] == "list":
        print("\n".join(scenarios()))
        return 0
    if argv and not argv[0].startswith("-"):
        # `member-centre` and `member_centre` name the same module.
        name, rest = argv[0].replace("-", "_"), argv[1:]
        if name not in scenarios():
            print(f"unknown scenario {name!r}; one of: {', '.join(scenarios())}", file=sys.stderr)
            return 2
    else:
        name, rest = "checkout", argv
    module = importlib.import_module("bench.cli" if name == "checkout" else f"bench.{name}")
    return int(module.main(rest))


sys.exit(main(sys.argv[1:]))
