"""`python -m services.engagement` serves; `python -m services.engagement migrate` migrates.

Operator commands (services/engagement/cli.py): parked-list,
parked-replay MEMBER_ID, parked-expire, wecom-results
"""

import sys

from servicekit.entrypoint import main

from .server import build

if len(sys.argv) > 1 and sys.argv[1].startswith(("parked-", "wecom-")):
    from .cli import COMMANDS, run_command

    if sys.argv[1] in COMMANDS:
        sys.exit(run_command(sys.argv[1], sys.argv[2:]))
main("engagement", build)
