"""bench coupons counts an issue's CPU in every process: each CouponIssued is
read by the four consumer groups of rewards' stream (engagement, guides,
tiering and rewards' own), and the issue target counts Redis too. The
scenario used to meter the rewards process alone (and PostgreSQL), leaving
~0.9 ms per issue of the consumers' CPU and Redis's out of its figure."""

from __future__ import annotations

from bench.coupons import SERVER, row, with_server

SUMMARY = {
    "offered_rate_per_s": 150.0,
    "achieved_rate_per_s": 150.0,
    "errors_by_status": {},
    "latency_ms": {"p50": 5.0, "p99": 20.0},
}


def test_the_server_figure_is_every_process_but_the_load_generator() -> None:
    cpu = with_server(
        {
            "rewards": 1.2,
            "tiering": 0.3,
            "engagement": 0.3,
            "guides": 0.3,
            "pg backends": 1.0,
            "redis": 0.1,
            "loadgen": 0.5,
            "total": 3.7,
        }
    )
    assert cpu[SERVER] == 3.2
    text = row("IssueCoupon", SUMMARY, cpu)
    for part in ("server 3.20", "rewards 1.20", "tiering 0.30", "pg 1.00", "redis 0.10"):
        assert part in text, text
    assert "client 0.50" in text


def test_the_echo_server_keeps_its_own_figure() -> None:
    assert with_server({SERVER: 0.4, "loadgen": 0.5, "total": 0.9})[SERVER] == 0.4
