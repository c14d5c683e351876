"""What one load run is: the values the runner decides and every Locust process reads.

The runner (``python -m loadtests``) writes one ``config.json`` into the run's folder and points
``ATP_LOADTEST_CONFIG`` at it; the locustfile reads it at import, in every worker process. Plain
JSON through a file, not many environment variables, so the users and the report agree on each
value by construction. Nothing here imports Locust (it monkeypatches the process with gevent).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

ENV_VAR: Final = "ATP_LOADTEST_CONFIG"

CATALOGUE: Final = [f"SKU-{n:04d}" for n in range(1, 301)]
# Sold online from the DCs: shoppers and marketplaces hold and order these there.
ONLINE_SKUS: Final = CATALOGUE[:250]
# Not sold online: the ERP feed's DC snapshots go to these, so a snapshot never moves a
# position that holds or commitments count against (the oversell check stays exact).
FEED_DC_SKUS: Final = CATALOGUE[250:]
DCS: Final = ["DC-EAST", "DC-WEST"]
STORES: Final = [f"STORE-{n:02d}" for n in range(1, 11)]
LOCATIONS: Final = [*DCS, *STORES]
GROUPS: Final = {
    "east": ["DC-EAST", *STORES[:5]],
    "west": ["DC-WEST", *STORES[5:]],
    "stores": STORES,
    "dcs": DCS,
}
SAFETY_STOCK: Final = {"DC-EAST": 10, "DC-WEST": 10, **{s: 2 for s in STORES}}


@dataclass(frozen=True, kw_only=True)
class Limits:
    rate_per_second: float
    burst: int
    max_concurrency: int

    @property
    def per_second_cap(self) -> float:
        """The most calls any one second may see begin under these limits."""
        return self.rate_per_second + self.burst


@dataclass(frozen=True, kw_only=True)
class LimitChange:
    """The operator's ``PUT /v1/ops/erp/limits`` at ``at`` seconds after the run starts: the
    limits it found at the start with the rate times ``rate_factor`` (relative, so a run
    against a deployed stack ends with that stack's own limits back)."""

    at: float
    rate_factor: float

    def applied_to(self, base: Limits) -> Limits:
        return Limits(
            rate_per_second=max(0.1, round(base.rate_per_second * self.rate_factor, 3)),
            burst=base.burst,
            max_concurrency=base.max_concurrency,
        )


@dataclass(frozen=True, kw_only=True)
class Mix:
    """Relative weights of the user kinds (0: none of that kind)."""

    browser: int
    shopper: int
    marketplace: int
    flash_shopper: int = 0


@dataclass(frozen=True, kw_only=True)
class Flow:
    """What a shopper does with a hold, in percent: pay (confirm), abandon (release) or walk
    away (a short TTL, never released; ``late_payers`` percent of those come back after it
    expired and try to pay, which must be a clean 409 ``reservation_not_held``)."""

    pay: int = 60
    abandon: int = 25
    walk_away: int = 15
    late_payers: int = 30
    ttl_seconds: int = 600
    walk_away_ttl_seconds: int = 5


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    scenario: str
    shape: str  # steady | promotion | flash-sale
    host: str
    users: int
    spawn_rate: float
    duration_s: float
    out_dir: str
    run_id: str
    started_at: float  # wall clock (time.time()) the shape and the operator count from
    storefront_key: str
    feed_key: str
    ops_key: str
    mix: Mix
    flow: Flow
    think_min_s: float
    think_max_s: float
    hot_skus: list[str]
    hot_units: int
    hot_location: str
    feed_users: int
    feed_events_per_second: int
    operator: bool
    erp_limits: Limits
    limit_changes: list[LimitChange] = field(default_factory=list)
    local_stack: bool = True  # False with --host: the ERP limits are the deployed stack's

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, path: Path) -> RunConfig:
        raw = json.loads(path.read_text())
        raw["mix"] = Mix(**raw["mix"])
        raw["flow"] = Flow(**raw["flow"])
        raw["erp_limits"] = Limits(**raw["erp_limits"])
        raw["limit_changes"] = [LimitChange(**c) for c in raw["limit_changes"]]
        return cls(**raw)

    @classmethod
    def from_env(cls) -> RunConfig:
        path = os.environ.get(ENV_VAR)
        if not path:
            raise SystemExit(f"{ENV_VAR} is not set: run the kit with `python -m loadtests`")
        return cls.read(Path(path))
