"""The load kit end to end, as ``./run loadtest`` runs it: a real stack (private Redis, the
PostgreSQL database ``test_load``, the ERP simulator, the gateway), real Locust processes, the
report and the invariants. Then the same kit against an ERP whose own limit is below the
gateway's rate: the run must fail, and say which invariant broke.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _dsn() -> str:
    """``LOADTEST_TEST_POSTGRES_DSN``, else the suite's server with the database ``test_load``
    (the kit resets its database, and refuses one whose name lacks 'load')."""
    explicit = os.environ.get("LOADTEST_TEST_POSTGRES_DSN")
    if explicit:
        return explicit
    base = os.environ.get("GATEWAY_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    return urlunsplit(urlsplit(base)._replace(path="/test_load"))


def _loadtest(out: Path, *args: str, limit: float) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "loadtests", *args, "--out", str(out)]
    command += ["--postgres-dsn", _dsn()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit, check=False
    )


def _checks(out: Path) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in json.loads((out / "invariants.json").read_text())}


@pytest.mark.timeout(150)
def test_the_smoke_scenario_runs_end_to_end_and_every_invariant_holds(tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    done = _loadtest(out, "smoke", limit=140)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "ALL INVARIANTS HOLD" in summary
    checks = _checks(out)
    assert {name: c["status"] for name, c in checks.items()} == {
        "no oversell": "ok",
        "exactly once": "ok",
        "ERP rate": "ok",
        "contract": "ok",
        "the run": "ok",
    }
    for name in (
        "locust.html",
        "locust_stats.csv",
        "locust_stats_history.csv",
        "load.png",
        "erp.png",
    ):
        assert (out / name).stat().st_size > 0, name
    # Every kind of user took part: the report's tables name each endpoint with answers.
    for row in (
        "| reserve | 201 |",
        "| confirm | 202 |",
        "| release | 200 |",
        "| order | 202 |",
        "| stock-events | 200 |",
        "| ops limits | 200 |",
        "| availability | 200 |",
    ):
        assert row in summary, row
    acked = [
        line
        for path in out.glob("orders-*.jsonl")
        for line in path.read_text().splitlines()
        if '"k"' in line
    ]
    assert len(acked) >= 10, "too few orders to say anything about the ERP side"


@pytest.mark.timeout(120)
def test_a_run_whose_erp_limit_is_below_the_gateways_rate_fails_and_says_why(
    tmp_path: Path,
) -> None:
    """The simulator answers 429 above 3 calls a second while the gateway may send 20 + 5:
    the ERP-rate invariant breaks, the exit status says so, and the summary names it."""
    out = tmp_path / "broken"
    done = _loadtest(
        out,
        "smoke",
        "--duration",
        "8s",
        "--erp-sim-rate-limit",
        "3",
        "--drain-timeout",
        "20s",
        limit=110,
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    checks = _checks(out)
    assert checks["ERP rate"]["status"] == "broken"
    assert "429" in checks["ERP rate"]["detail"]
    assert "broken  ERP rate" in done.stdout
    assert "BROKEN: " in (out / "summary.md").read_text().splitlines()[0]


def test_the_contract_table_allows_only_the_documented_refusals() -> None:
    from loadtests.contract import allowed

    assert allowed("reserve", 409, "insufficient_stock")
    assert allowed("confirm", 503, "buffer_full")
    assert allowed("confirm", 409, "reservation_not_held")
    assert not allowed("confirm", 503, "buffer_full without Retry-After")
    assert not allowed("order", 503, "dependency_unavailable")
    assert not allowed("order", 500, "internal_error")
    assert not allowed("availability", 0, "connection error ConnectionRefusedError")
    assert not allowed("reserve", 201, "not a JSON object")


def test_the_promotion_shape_spikes_tenfold_at_the_drop_and_decays() -> None:
    from loadtests.shapes import target

    def users(t: float) -> int:
        wanted = target("promotion", t, 100, 1000, 50)
        assert wanted is not None
        return wanted[0]

    assert users(10) == 100
    assert users(35) == 1000
    assert users(59) == 1000
    assert 100 < users(72) < 1000
    assert users(90) == 100
    assert target("promotion", 100, 100, 1000, 50) is None
    assert target("flash-sale", 0, 60, 2000, 200) == (2000, 200)
