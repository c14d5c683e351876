"""The load generators as the benchmarks drive them: wrk and the open-loop generator against a
``Target``, the request paths they read, and py-spy sampling of the gateway while they run."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import LOCATION, PYTHON, RESULTS, ROOT, SEED_SKUS, Run


@dataclass(frozen=True)
class Target:
    """What one figure loads: GETs of a paths file against ``url`` (a base URL), or POSTs of a
    bodies file to ``url`` (the full URL), each body's ``%ID%`` made unique per request."""

    url: str
    key: str | None
    paths: Path | None = None
    bodies: Path | None = None


_WRK_RESULT = re.compile(r"WRK_RESULT (.*)")
# The load generators (wrk, the open-loop generator) share the load core with Redis and
# PostgreSQL, which belong to the system under test: at a lower priority they yield the core to
# them when both are ready to run, as a generator on another machine would. Without it a Redis
# or PostgreSQL wake-up could wait out the generator's time slice (milliseconds at times).
LOAD_NICE = 10


def _lower_priority() -> None:
    os.nice(LOAD_NICE)


_run_ids = itertools.count(1)


def unique_prefix(tag: str) -> str:
    """A reservation id prefix no other load of this run uses (one Redis per run)."""
    return f"{tag}-{next(_run_ids)}-"


def run_wrk(target: Target, duration: float, tag: str = "wrk") -> dict[str, Any]:
    if target.bodies is not None:
        script, script_args = "reserve.lua", [str(target.bodies), unique_prefix(tag)]
    else:
        assert target.paths is not None
        script, script_args = "paths.lua", [str(target.paths)]
    argv = [
        "wrk",
        "-c64",
        "-t1",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(ROOT / "benchmarks" / script),
    ]
    if target.key:
        argv += ["-H", f"Authorization: Bearer {target.key}"]
    argv += [target.url, "--", *script_args]
    values = wrk_values(argv, duration)
    seconds = values["duration_us"] / 1e6
    errors = sum(values[k] for k in ("status", "connect", "read", "write", "timeout"))
    result = {
        "requests_per_s": values["requests"] / seconds,
        "requests": values["requests"],
        "seconds": seconds,
        "errors": errors,
        "non_2xx": values["status"],  # wrk counts statuses >= 400
        "p50_ms": values["p50_us"] / 1000,
        "p99_ms": values["p99_us"] / 1000,
        "max_ms": values["max_us"] / 1000,
    }
    if "created" in values:  # reserve.lua counts answers: 201, 409, anything else
        socket_errors = errors - values["status"]
        result.update(
            {
                "status_201": values["created"],
                "status_409": values["refused"],
                "status_other": values["other"],
                "socket_errors": socket_errors,
                # every answer should be a 201 (a new hold); a 200 or a 409 is an error here
                "errors": socket_errors + values["refused"] + values["other"],
            }
        )
    return result


def wrk_values(argv: list[str], duration: float) -> dict[str, int]:
    """Run wrk with a script that prints a ``WRK_RESULT k=v ...`` line; its values."""
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 60,
        preexec_fn=_lower_priority,
    )
    match = _WRK_RESULT.search(out.stdout)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    return {k: int(v) for k, v in (p.split("=") for p in match.group(1).split())}


def run_openloop(
    target: Target, rate: float, duration: float, warmup: float, tag: str = "openloop"
) -> dict[str, Any]:
    argv = [
        PYTHON,
        "-m",
        "benchmarks.openloop",
        "--url",
        target.url,
        "--rate",
        f"{rate:.1f}",
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        "--json",
    ]
    if target.bodies is not None:
        argv += ["--bodies-file", str(target.bodies), "--id-prefix", unique_prefix(tag)]
    elif target.paths is not None:
        argv += ["--paths-file", str(target.paths)]
    if target.key:
        argv += ["-H", f"Authorization: Bearer {target.key}"]
    return run_generator(argv, duration + warmup)


def run_generator(argv: list[str], seconds: float) -> dict[str, Any]:
    """Run an open-loop generator command (``--json``) of about ``seconds``; its result."""
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        cwd=ROOT,
        preexec_fn=_lower_priority,
    )
    if out.returncode != 0:
        raise RuntimeError(f"open-loop generator failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def write_paths(path: Path, skus_per_request: int, count: int = 1000, seed: int = 7) -> Path:
    """Request paths over the seeded SKUs, distinct SKUs within one request, in random order."""
    rng = random.Random(seed + skus_per_request)
    with path.open("w") as f:
        for _ in range(count):
            skus = rng.sample(range(SEED_SKUS), skus_per_request)
            query = "&".join(f"sku=SKU-{s:05d}" for s in skus)
            f.write(f"/v1/availability?{query}&location={LOCATION}\n")
    return path


@contextlib.contextmanager
def profiled(run: Run, name: str, pid: int, seconds: float) -> Iterator[None]:
    """Sample the gateway with py-spy while the block runs; keep the top functions."""
    spy = shutil.which("py-spy", path=str(Path(PYTHON).parent)) or shutil.which("py-spy")
    if not run.config.profile or spy is None:
        if run.config.profile:
            run.notes.append("--profile: py-spy not found (pip install py-spy into the venv)")
        yield
        return
    out = RESULTS / f"profile-{name}.txt"
    proc = subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, int(seconds))),
            "--rate",
            "200",
            "--nonblocking",
            "--format",
            "raw",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        try:
            proc.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if out.exists():
        run.profiles[name] = {"file": str(out.relative_to(ROOT)), **top_functions(out)}


def top_functions(path: Path, count: int = 15) -> dict[str, Any]:
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        total += int(n)
        frame = stack.split(";")[-1]
        own[frame] = own.get(frame, 0) + int(n)
    top = sorted(own.items(), key=lambda kv: -kv[1])[:count]
    return {"samples": total, "self_percent": {f: round(100 * n / total, 1) for f, n in top}}
