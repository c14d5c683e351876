"""Self-checks of the benchmark's report for issue 10: the hot-SKU verdict and the core split of
scaling (pure functions over recorded figures; the measurements themselves run in
``python -m benchmarks.run``)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from benchmarks.baseline_report import baseline_rows, hot_verdict, scaling_rows
from benchmarks.common import Config, Run
from benchmarks.orders import median_run, order_rows
from benchmarks.scaling import split


def _run(gateway: dict[str, Any], baseline: dict[str, Any]) -> Run:
    config = Config(
        duration=4,
        warmup=1,
        rounds=1,
        openloop_duration=4,
        http_events=1,
        kafka_events=1,
        kafka_partitions=1,
        http_connections=1,
        redis_requests=1,
        postgres_dsn="postgresql://x/test_bench",
        phases=frozenset({"baseline"}),
        profile=False,
        wait_quiet=0,
        retries=0,
        retry_budget=0,
    )
    run = Run(config=config)
    run.saturation["ceiling"] = {"requests_per_s": 20_000.0}
    run.baseline["pg_ceiling"] = {"rows_per_s": 10_000.0, "connections": 16}
    run.baseline["hot"] = {"gateway": gateway, "baseline": baseline}
    return run


def _figure(rate: float, p99: float, errors: int = 0) -> dict[str, Any]:
    return {"requests_per_s": rate, "p99_ms": p99, "p50_ms": p99 / 3, "errors": errors}


@pytest.mark.parametrize(
    ("gateway", "baseline", "met"),
    [
        (_figure(8_000, 15), _figure(700, 170), True),
        (_figure(6_900, 15), _figure(700, 170), False),  # 9.9x
        (_figure(8_000, 171), _figure(700, 170), False),  # p99 worse
        (_figure(8_000, 15, errors=3), _figure(700, 170), False),  # errors void it
    ],
)
def test_hot_sku_verdict(gateway: dict[str, Any], baseline: dict[str, Any], met: bool) -> None:
    run = _run(gateway, baseline)
    verdict = hot_verdict(run)
    assert verdict is not None
    assert verdict[0] is met
    rows = baseline_rows(run)
    judged = [r for r in rows if r.target.startswith(">= 10x")]
    assert len(judged) == 1
    assert judged[0].met.startswith("yes" if met else "NO")
    assert any(("MET" if met else "NOT MET") in note for note in run.notes)


def test_scaling_split_pins_apart_only_with_spare_cores() -> None:
    assert split(1, 2) == ({0}, {1}, True)
    assert split(2, 2) == ({0, 1}, {1}, False)  # shares the cores with the load
    assert split(4, 8) == ({0, 1, 2, 3}, {4, 5, 6, 7}, True)


def test_scaling_rows_say_when_the_gateway_shares_the_cores() -> None:
    run = _run(_figure(1, 1), _figure(1, 1))
    for n, apart, rate in (("1", True, 9_000.0), ("2", False, 13_500.0)):
        figure = {
            **_figure(rate, 12),
            "gateway_cpu_percent": 95.0,
            "server_cores": [0] if apart else [0, 1],
            "apart": apart,
        }
        run.scaling.setdefault("avail_1", {})[n] = figure
    rows = scaling_rows(run)
    assert "1.50x 1 worker" in rows[1].ratio
    assert "unpinned" in rows[1].figure
    assert any("not pinned" in note for note in run.notes)


def test_the_confirm_latency_is_the_median_run_and_names_every_run() -> None:
    run = _run(_figure(1, 1), _figure(1, 1))
    p99s = iter([40.0, 12.0, 150.0])

    def one_run() -> dict[str, Any]:
        p99 = next(p99s)
        return {"p50_ms": p99 / 4, "p99_ms": p99, "errors": 0, "unfinished": 0}

    run.saturation["confirm"] = {
        "requests_per_s": 5_000.0,
        "errors": 0,
        "exhausted": 0,
        "cpu_percent": {"gateway": 80.0},
    }
    run.openloop["ceiling"] = {"p50_ms": 1.0, "p99_ms": 3.0}
    run.openloop["confirm"] = {**median_run(one_run), "target_rate": 2_500.0}
    assert run.openloop["confirm"]["p99_ms"] == 40.0  # neither the best nor the worst run
    (latency,) = [row for row in order_rows(run) if "half saturation" in row.figure]
    assert "the median of 3 runs (p99s 12.0 / 40.0 / 150.0)" in latency.figure
    assert latency.met.startswith("NO")  # 40 ms > 25 ms: the median decides


def test_the_confirm_ratio_is_the_lower_of_the_paired_rounds_and_the_run_ceiling() -> None:
    from benchmarks.orders import _paired

    def ceilings(*rates: float) -> list[dict[str, Any]]:
        return [{"requests_per_s": r, "errors": 0} for r in rates]

    def confirm_row(run: Run) -> Any:
        (row,) = [row for row in order_rows(run) if row.figure.startswith("confirm of")]
        return row

    run = _run(_figure(1, 1), _figure(1, 1))  # the run's ceiling: 20,000 req/s
    samples = [{"requests_per_s": r} for r in (6_000.0, 7_800.0, 7_000.0)]
    run.saturation["confirm"] = {
        "requests_per_s": 7_000.0,
        "errors": 0,
        "exhausted": 0,
        "cpu_percent": {"gateway": 80.0},
        # 6,000 beside 30,000 (20%), 7,800 beside 30,000 (26%), 7,000 beside 28,000 (25%)
        **_paired(samples, ceilings(30_000.0, 30_000.0, 28_000.0)),
    }
    rate = confirm_row(run)
    # 7,000 / 20,000 would be 35%: the pairs' median is lower, so it decides
    assert rate.ratio == "25%"
    assert rate.ceiling == "30,000"
    assert "ratios 20.0% / 26.0% / 25.0%, median 25.0%" in rate.figure
    assert "against the run's ceiling 35.0%" in rate.figure
    assert rate.met == "yes"

    run.saturation["confirm"].update(_paired(samples, ceilings(30_000.0, 32_000.0, 29_000.0)))
    rate = confirm_row(run)
    assert rate.ratio == "24%"  # 24.1%: below 25%
    assert rate.met.startswith("NO")

    # Paired ceilings that came out low never flatter the figure: the run's ceiling decides.
    run.saturation["ceiling"] = {"requests_per_s": 30_000.0}
    run.saturation["confirm"].update(_paired(samples, ceilings(24_000.0, 24_000.0, 24_000.0)))
    rate = confirm_row(run)
    assert rate.ratio == "23%"  # 7,000 / 30,000, not the pairs' 29.2%
    assert rate.ceiling == "30,000"
    assert rate.met.startswith("NO")

    # A failed or disturbed ceiling round: no verdict of yes.
    run.saturation["ceiling"] = {"requests_per_s": 20_000.0}
    failed = _paired(samples, ceilings(0.0, 30_000.0, 28_000.0))
    assert math.isnan(failed["paired_ratio"])
    run.saturation["confirm"].update(failed)
    assert confirm_row(run).met.startswith("NO")
    noisy = ceilings(30_000.0, 30_000.0, 28_000.0)
    noisy[1]["disturbed"] = "steal"
    run.saturation["confirm"].update(_paired(samples, noisy))
    assert confirm_row(run).met == "yes (noisy)"
