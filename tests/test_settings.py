"""Configuration: defaults, environment over TOML, and one clear line for a bad value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.settings import Settings, SettingsError


def test_defaults() -> None:
    s = Settings.from_env({})
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.redis_cluster is False
    assert s.postgres_dsn == "postgresql://postgres@127.0.0.1:5432/postgres"
    assert s.kafka_bootstrap == ""
    assert s.kafka_topics == ("inventory-events",)
    assert s.kafka_group == "atp-gateway"
    assert s.api_keys == ()
    assert s.event_horizon_seconds == 7 * 24 * 3600


def test_env_wins_over_toml(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('port = 9000\nkafka_topics = ["a", "b"]\nGATEWAY_LOG_LEVEL = "debug"\n')
    s = Settings.from_env({"GATEWAY_PORT": "9100"}, config)
    assert s.port == 9100
    assert s.kafka_topics == ("a", "b")
    assert s.log_level == "debug"


def test_api_keys_roles() -> None:
    s = Settings.from_env({"GATEWAY_API_KEYS": "storefront:k1, storefront:k2,ops:k3"})
    assert [(k.role, k.key) for k in s.api_keys] == [
        ("storefront", "k1"),
        ("storefront", "k2"),
        ("ops", "k3"),
    ]
    assert "k1" not in repr(s)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GATEWAY_PORT", "eighty"),
        ("GATEWAY_PORT", "70000"),
        ("GATEWAY_REDIS_CLUSTER", "maybe"),
        ("GATEWAY_REDIS_URL", "http://x"),
        ("GATEWAY_POSTGRES_DSN", "mysql://x"),
        ("GATEWAY_POSTGRES_DSN", "postgresql://u@h:abc/db"),
        ("GATEWAY_REDIS_URL", "redis://h:6379x/0"),
        ("GATEWAY_POSTGRES_TIMEOUT_SECONDS", "0"),
        ("GATEWAY_KAFKA_BOOTSTRAP", "nohostport"),
        ("GATEWAY_KAFKA_TOPICS", " , "),
        ("GATEWAY_API_KEYS", "admin:secret"),
        ("GATEWAY_API_KEYS", "nocolon"),
        ("GATEWAY_LOG_LEVEL", "loud"),
        ("GATEWAY_EVENT_HORIZON_SECONDS", "5"),
        ("GATEWAY_WORKERS", "0"),
        ("GATEWAY_SHUTDOWN_TIMEOUT_SECONDS", "0"),
        ("GATEWAY_WORKERS", "many"),
        ("GATEWAY_WORKERS", "257"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_workers_default_count_and_auto() -> None:
    assert Settings.from_env({}).workers == 1
    assert Settings.from_env({"GATEWAY_WORKERS": "4"}).workers == 4
    # auto: one per core this process may run on (a container's cpuset, not the host's).
    assert Settings.from_env({"GATEWAY_WORKERS": "auto"}).workers == len(os.sched_getaffinity(0))


def test_secret_not_echoed() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"GATEWAY_API_KEYS": "admin:supersecret"})
    assert "supersecret" not in str(info.value)


def test_cli_bad_value_stops_with_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env={"GATEWAY_PORT": "nope", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "GATEWAY_PORT" in lines[0]


def test_dsn_with_a_non_numeric_port_is_named_not_echoed() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"GATEWAY_POSTGRES_DSN": "postgresql://u:pw@h:abc/db"})
    assert "GATEWAY_POSTGRES_DSN" in str(info.value)
    assert "port" in str(info.value)
    assert "pw" not in str(info.value)


def test_cli_bad_dsn_stops_serve_with_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env={"GATEWAY_POSTGRES_DSN": "postgresql://u@h:abc/db", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "GATEWAY_POSTGRES_DSN" in lines[0]
    assert "Traceback" not in proc.stderr
