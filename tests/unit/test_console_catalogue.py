"""The console's pure parts: every chart and headline figure names a metric
definition that exists (the text shown under it comes from the API), the
catalogue has both languages, yuan on screen and fen from a form are exact,
and a pivot chart sums what the API lists."""

from __future__ import annotations

import pytest

from console.charts import CHARTS, DASHBOARDS, KPIS, Chart, chart_data
from console.i18n import CATALOGUE, CODES, SERIES, fen_from_yuan, translate, yuan
from console.roles import RIGHTS, SCOPES, Right, Role, role_for
from servicekit.metrics_definitions import METRICS


def test_every_chart_and_figure_names_a_defined_metric_of_its_dashboard() -> None:
    defined = {(m.dashboard, m.key) for m in METRICS}
    assert set(CHARTS) == set(KPIS) == set(DASHBOARDS)
    for dashboard in DASHBOARDS:
        for item in (*CHARTS[dashboard], *KPIS[dashboard]):
            assert (dashboard, item.definition) in defined, (dashboard, item)


def test_the_catalogue_has_both_languages_and_chinese_is_the_default() -> None:
    for key, (zh, en) in {**CATALOGUE, **SERIES}.items():
        assert zh and en, key
    for kind, words in CODES.items():
        for code, (zh, en) in words.items():
            assert zh and en, (kind, code)
    assert translate("zh-CN", "login.title") == "登录"
    assert translate("en", "login.title") == "Sign in"
    assert translate("fr", "login.title") == "登录"


@pytest.mark.parametrize(
    ("fen", "shown"), [(0, "¥0.00"), (1800, "¥18.00"), (5, "¥0.05"), (123456789, "¥1,234,567.89")]
)
def test_yuan_shows_fen_with_two_decimals(fen: int, shown: str) -> None:
    assert yuan(fen) == shown


def test_fen_from_yuan_is_exact_and_refuses_a_third_decimal() -> None:
    assert fen_from_yuan("5.5") == 550
    assert fen_from_yuan(" 20.00 ") == 2000
    assert fen_from_yuan("0.07") == 7
    with pytest.raises(ValueError, match="two decimals"):
        fen_from_yuan("5.555")


def test_a_pivot_chart_sums_each_pair_per_day() -> None:
    chart = Chart(
        "t",
        "chart.lifecycle.transitions",
        "pivot",
        "rows",
        "day",
        ("from_stage", "to_stage", "members"),
    )
    rows = [
        {"day": "2026-11-02", "from_stage": "new", "to_stage": "active", "members": 2},
        {"day": "2026-11-01", "from_stage": "new", "to_stage": "active", "members": 1},
        {"day": "2026-11-02", "from_stage": "active", "to_stage": "at_risk", "members": 4},
    ]
    assert chart_data(chart, {"rows": rows}) == {
        "x": ["2026-11-01", "2026-11-02"],
        "series": {"new→active": [1, 2], "active→at_risk": [0, 4]},
    }


def test_each_right_acts_through_the_least_powerful_role_holding_it() -> None:
    assert role_for(["viewer", "member_admin"], Right.DASHBOARDS) is Role.VIEWER
    assert role_for(["viewer", "member_admin"], Right.MERGE_REVIEWS) is Role.MEMBER_ADMIN
    assert role_for(["viewer"], Right.UNMASK) is None
    # Only the PII reader's client holds pii:read; only it may unmask.
    assert [r for r in Role if "pii:read" in SCOPES[r]] == [Role.PII_READER]
    assert [r for r in Role if Right.UNMASK in RIGHTS[r]] == [Role.PII_READER]
    assert SCOPES[Role.VIEWER] == ("admin:analytics",)


def test_an_id_typed_by_an_operator_stays_one_path_segment() -> None:
    from console.app import segment

    assert segment("MJ99-30") == "MJ99-30"
    assert segment("a/../b?x=1#y") == "a%2F..%2Fb%3Fx%3D1%23y"
