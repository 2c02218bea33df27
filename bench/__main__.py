"""`python -m bench [--rate R --duration S --probe ...]`; `make bench` runs the same."""

import sys

from .cli import main

sys.exit(main())
