"""Open-loop benchmark of the POS checkout path, with same-run baselines (see bench/cli.py)."""
