"""The metric definitions are written once (servicekit/metrics_definitions.py):
docs/metrics.md is generated from them and must be current, and every
dashboard the API answers has its definitions."""

from __future__ import annotations

from pathlib import Path

from servicekit.metrics_definitions import BY_KEY, METRICS, definitions, markdown

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = (
    "overview",
    "tiers",
    "segments",
    "lifecycle",
    "points",
    "coupons",
    "referral",
    "journeys",
)


def test_docs_metrics_page_is_generated_from_the_definitions() -> None:
    page = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    assert page == markdown(), "run: python -m servicekit.metrics_definitions > docs/metrics.md"


def test_every_dashboard_has_definitions_and_keys_are_unique() -> None:
    assert len(BY_KEY) == len(METRICS)
    assert {m.dashboard for m in METRICS} == set(DASHBOARDS)
    for name in DASHBOARDS:
        texts = definitions(name)
        assert texts and all(t.strip().endswith(".") for t in texts.values()), name
    for key in ("repurchase_rate", "fission_ratio", "points_liability", "holdout_lift"):
        assert key in BY_KEY
