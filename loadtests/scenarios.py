"""The scenarios' defaults: who the users are, how hard the ERP is, what the operator does.

Every number here can be overridden on the command line (``python -m loadtests --help``).
Think times are what real callers do between clicks; they are also what lets 2,000 users run on
two cores shared with the gateway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loadtests.config import Flow, Mix


@dataclass(frozen=True, kw_only=True)
class Scenario:
    shape: str
    users: int
    duration_s: float
    mix: Mix
    flow: Flow = field(default_factory=Flow)
    think: tuple[float, float] = (1.0, 3.0)
    ramp_s: float = 10.0  # the default spawn rate brings every user in within this
    hot_skus: int = 0
    hot_units: int = 100
    feed_users: int = 2
    feed_events_per_second: int = 100
    erp_rate: float = 50.0
    erp_burst: int = 10
    erp_concurrency: int = 16
    # The operator lowers the rate to this fraction at lower_at, restores it at restore_at
    # (fractions of the run): "the ERP asked us to slow down", then "back to normal".
    lower_to: float = 0.5
    lower_at: float = 0.4
    restore_at: float = 0.7
    sim_latency_ms: float = 20.0
    sim_jitter_ms: float = 10.0
    buffer_max_depth: int = 100_000
    drain_timeout_s: float = 120.0


SCENARIOS: dict[str, Scenario] = {
    "steady": Scenario(
        shape="steady",
        users=50,
        duration_s=60,
        mix=Mix(browser=6, shopper=3, marketplace=1),
    ),
    # The ERP is slow (150 ms) and its limit low (15/s), against a crowd ten times the base:
    # the buffer fills to its (small) maximum and confirms get 503 buffer_full + Retry-After.
    "promotion": Scenario(
        shape="promotion",
        users=400,
        duration_s=90,
        mix=Mix(browser=5, shopper=4, marketplace=1),
        think=(0.5, 2.0),
        erp_rate=15,
        erp_burst=5,
        erp_concurrency=8,
        lower_to=0.5,
        lower_at=0.45,
        restore_at=0.75,
        sim_latency_ms=150,
        sim_jitter_ms=50,
        buffer_max_depth=300,
    ),
    "flash-sale": Scenario(
        shape="flash-sale",
        users=2000,
        duration_s=60,
        mix=Mix(browser=3, shopper=0, marketplace=1, flash_shopper=16),
        flow=Flow(pay=70, abandon=15, walk_away=15, walk_away_ttl_seconds=5),
        think=(2.0, 6.0),
        hot_skus=10,
        hot_units=100,
    ),
    # The suite's end-to-end run: every kind of user, a small flash sale, the operator.
    "smoke": Scenario(
        shape="steady",
        users=20,
        duration_s=20,
        mix=Mix(browser=4, shopper=3, marketplace=1, flash_shopper=2),
        flow=Flow(pay=60, abandon=20, walk_away=20, walk_away_ttl_seconds=3),
        think=(0.3, 1.0),
        hot_skus=2,
        hot_units=20,
        ramp_s=3,
        feed_users=1,
        feed_events_per_second=50,
        erp_rate=20,
        erp_burst=5,
        lower_at=0.3,
        restore_at=0.6,
        drain_timeout_s=30,
    ),
}
