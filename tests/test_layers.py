"""The layering is enforced, not hoped for: the import-linter contracts in pyproject.toml (the
domain imports no transport and no adapter, the product no dev services, HTTP above the
adapters above the domain) hold, and this suite fails the moment an import breaks one."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold() -> None:
    # The venv's own script, so the check runs whatever interpreter runs the tests; no cache,
    # so an import added a moment ago is never judged by an older graph.
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # Every contract written was checked (none skipped or lost from the configuration).
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    assert len(contracts) >= 3
    assert f"Contracts: {len(contracts)} kept, 0 broken." in done.stdout, done.stdout


def test_the_domain_speaks_no_redis_commands() -> None:
    """The ports are named for what the domain asks (gateway/ports.py): no Python module of a
    domain package spells a Redis command for an adapter to send."""
    command = re.compile(
        r"""["'](GET|SET|MGET|HGET|HMGET|HSET|HDEL|HINCRBY|ZADD|ZREM|ZSCORE|ZRANGEBYSCORE|"""
        r"""EVAL|EVALSHA|SCRIPT|TIME|EXPIRE|DEL|PING)["']"""
    )
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for package in ("atp", "reservation", "buffering")
        for path in sorted((ROOT / "gateway" / package).glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if command.search(line)
    ]
    assert offenders == []
