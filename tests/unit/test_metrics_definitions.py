"""The metric definitions are written once (servicekit/metrics_definitions.py):
docs/metrics.md is generated from them and must be current, and every
dashboard the API answers has its definitions."""

from __future__ import annotations

from pathlib import Path

from servicekit.metrics_definitions import BY_KEY, METRICS, definition_in, definitions, markdown

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


def test_every_metric_has_its_name_and_definition_in_both_languages() -> None:
    """Operators read the console in Chinese (zh-CN, the default) or English:
    a metric without both cannot be shown under its chart in the session's language."""
    for m in METRICS:
        assert m.name.strip() and m.name_zh.strip(), m.key
        assert m.definition.strip().endswith("."), m.key
        assert m.definition_zh.strip().endswith("。"), m.key
        # Chinese, not the English text pasted twice.
        assert any("\u4e00" <= ch <= "\u9fff" for ch in m.definition_zh), m.key
        assert definition_in(m.key, "zh-CN") == m.definition_zh
        assert definition_in(m.key, "en") == m.definition
