"""The deployable stack, checked without a container engine (none runs on the development machine:
the images were never built or started here).

- ``docker-compose.yml``: it parses; every service names an image or a build; every file it mounts
  exists; every ``${VAR}`` has a default and is documented in its header; every ``GATEWAY_*``
  variable is one :class:`Settings` accepts, with a value it accepts; ``depends_on`` names services
  that exist, with a health check where it waits for health and a one-shot where it waits for
  completion; every long-running service has a health check; images are pinned; only the gateway,
  Grafana and Prometheus are published; Kafka's one-shot creates the topics the gateway consumes
  and their dead-letter topics; the gateway's ERP is the simulator.
- Prometheus: ``promtool check config`` (which loads the rule files too), its scrape target is the
  gateway's service and port, under the job name the rules and dashboard select.
- Grafana: the datasource (uid ``prometheus``) names the Prometheus service and port, the provider's
  path and the home dashboard lie in what the service mounts.
- ``requirements.lock``: pins exactly what ``.venv`` runs, the whole runtime closure and no more.
- ``Dockerfile``: its pip steps run here for real (``test_image_steps``, 20-25 s here with pip's
  cache warm): a build context filtered by ``.dockerignore``, ``pip wheel`` with the lock, a fresh
  venv installed from those wheels alone; then the installed ``gateway --help``, ``gateway
  migrate``, ``gateway erp-sim`` and ``gateway serve`` with two workers (the compose commands and
  settings, as a non-root user when the tests run as root) against the test Redis and PostgreSQL,
  probed by the Dockerfile's HEALTHCHECK and the compose erp-sim health check, which must fail
  once they stop.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from packaging.requirements import Requirement

from gateway.adapters.dead_letters import DLQ_SUFFIX
from gateway.dev.services import free_port, stop_process
from gateway.settings import _PARSERS, Settings
from tests.conftest import KEYS

ROOT: Final = Path(__file__).resolve().parent.parent
COMPOSE: Final = ROOT / "docker-compose.yml"
DOCKERFILE: Final = ROOT / "Dockerfile"
DOCKERIGNORE: Final = ROOT / ".dockerignore"
LOCK: Final = ROOT / "requirements.lock"
PROMETHEUS_CONFIG: Final = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROMTOOL: Final = "/usr/bin/promtool"
GATEWAY_SERVICE: Final = "gateway"
PUBLISHED: Final = {8080: "gateway", 3000: "grafana", 9090: "prometheus"}
# The Dockerfile's commands that test_image_steps runs (with its own /wheels and /opt/venv).
WHEEL_STEP: Final = "pip wheel --wheel-dir /wheels --constraint requirements.lock ."
INSTALL_STEP: Final = (
    "/opt/venv/bin/pip install --no-index --find-links /wheels "
    "--constraint /tmp/requirements.lock atp-gateway"
)
NOBODY: Final = 65534
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ...; $$ is a literal dollar.
VARIABLE: Final = re.compile(
    r"(?<!\$)((?:\$\$)*)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}"
)
BARE_VARIABLE: Final = re.compile(r"(?<!\$)((?:\$\$)*)\$([A-Za-z_])")


# --- compose ----------------------------------------------------------------------------------


@functools.cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def interpolate(text: str, environ: dict[str, str] | None = None) -> str:
    """What compose makes of a value: ``${VAR:-default}`` and friends, ``$$`` as ``$``."""
    environ = environ or {}

    def one(match: re.Match[str]) -> str:
        dollars, name, op, arg = match.groups()
        value = environ.get(name)
        if op in (":-", "-") and (value is None or (op == ":-" and not value)):
            value = arg
        if value is None:
            raise AssertionError(f"${{{name}}} has no value and no default")
        return dollars + value

    return VARIABLE.sub(one, text).replace("$$", "$")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): interpolate(str(v)) for k, v in env.items()}


def one_shot(service: dict[str, Any]) -> bool:
    return service.get("restart") == "no"


def image_healthcheck() -> list[str] | None:
    for instruction, args in dockerfile_stages()[-1]:
        if instruction == "HEALTHCHECK":
            exec_form = args.split(" CMD ", 1)[1].strip()
            command = json.loads(exec_form)
            assert isinstance(command, list)
            return [str(part) for part in command]
    return None


def has_healthcheck(service: dict[str, Any]) -> bool:
    check = service.get("healthcheck")
    if check is not None:
        return not check.get("disable", False) and bool(check.get("test"))
    # A service built from the Dockerfile inherits its HEALTHCHECK, which probes the gateway's
    # port: right for `serve` (the image's CMD), wrong for `erp-sim` on another port.
    serves = [str(part) for part in service.get("command", ["serve"])] == ["serve"]
    return "build" in service and serves and image_healthcheck() is not None


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of each bind mount; named volumes are left out."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") != "bind":
                continue
            source, target = volume["source"], volume["target"]
        else:
            source, target = volume.split(":")[:2]
            if not source.startswith((".", "/", "~")):
                continue
        mounts.append(((ROOT / source).resolve(), target))
    return mounts


def host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The file in the repository that ``container_path`` shows inside the service, if mounted."""
    for source, target in bind_mounts(service):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / container_path[len(target) :].lstrip("/")
    return None


def test_compose_parses_and_every_service_has_an_image_or_a_build() -> None:
    assert services(), "no services"
    for name, service in services().items():
        assert "image" in service or "build" in service, f"{name}: neither image nor build"
        if "build" in service:
            assert (ROOT / str(service["build"]) / "Dockerfile").is_file(), name


def test_every_mounted_path_exists_and_every_volume_is_declared() -> None:
    declared = set(compose().get("volumes") or {})
    for name, service in services().items():
        for source, target in bind_mounts(service):
            assert source.exists(), f"{name} mounts {source} (at {target}): not in the repository"
            assert ROOT in source.parents, f"{name} mounts {source}, outside the repository"
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/", "~")):
                assert volume.split(":")[0] in declared, f"{name}: volume {volume} not declared"


def test_every_variable_has_a_default_and_is_documented() -> None:
    text = COMPOSE.read_text()
    header = text.split("\nname:", 1)[0]
    uses = VARIABLE.findall(text)
    assert uses, "expected the documented settings (API keys, passwords) to come from ${VAR}"
    for _, name, op, _ in uses:
        assert op in (":-", "-"), f"${{{name}}} has no default (use ${{{name}:-...}})"
        assert re.search(rf"^#\s+{name}\s", header, re.M), f"{name} not documented in the header"
    bare = [m.group(0) for m in BARE_VARIABLE.finditer(VARIABLE.sub("", text))]
    assert not bare, f"unbraced variables (compose would interpolate them): {bare}"


def test_gateway_settings_are_ones_the_gateway_accepts() -> None:
    image_env = {k: v for k, v in dockerfile_env().items() if k.startswith("GATEWAY_")}
    checked = 0
    for name, service in services().items():
        env = environment(service)
        for key in env:
            if key.startswith("GATEWAY_"):
                assert key in _PARSERS, f"{name}: {key} is not a gateway setting"
                checked += 1
        if "build" in service:
            Settings.from_env({**image_env, **env})  # raises SettingsError on a bad value
    assert checked, "no GATEWAY_* settings found"
    for key in image_env:
        assert key in _PARSERS, f"Dockerfile: {key} is not a gateway setting"
    gateway = Settings.from_env({**image_env, **environment(services()[GATEWAY_SERVICE])})
    assert gateway.workers >= 2, "the compose gateway should run several workers"
    assert gateway.api_keys, "the compose gateway needs API keys (demo defaults)"


def test_depends_on_names_services_ready_for_the_condition() -> None:
    conditions = {"service_healthy", "service_completed_successfully", "service_started"}
    for name, service in services().items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {target: {"condition": "service_started"} for target in depends}
        for target, spec in depends.items():
            assert target in services(), f"{name} depends on {target}: no such service"
            condition = spec.get("condition", "service_started")
            assert condition in conditions, f"{name} -> {target}: {condition}"
            if condition == "service_healthy":
                assert has_healthcheck(services()[target]), f"{name} waits for {target}'s health"
            if condition == "service_completed_successfully":
                assert one_shot(services()[target]), f"{name} waits for {target} to finish"


def test_long_running_services_have_health_checks_and_one_shots_are_awaited() -> None:
    awaited = {
        target
        for service in services().values()
        for target, spec in (service.get("depends_on") or {}).items()
        if spec.get("condition") == "service_completed_successfully"
    }
    for name, service in services().items():
        if one_shot(service):
            assert name in awaited, f"one-shot {name}: nothing waits for it to succeed"
        else:
            assert has_healthcheck(service), f"{name} has no health check"
    assert {"migrate", "kafka-init"} <= awaited


def test_images_are_pinned_and_only_useful_ports_published() -> None:
    for name, service in services().items():
        if "build" in service:
            continue
        image = str(service["image"])
        tag = image.rsplit("@", 1)[0].rpartition(":")[2]
        assert "@sha256:" in image or re.fullmatch(r"v?\d+\.\d+(\.\d+)?(-.*)?", tag), (
            f"{name}: {image} is not pinned to a release (x.y.z; x.y for PostgreSQL) or a digest"
        )
    published: dict[int, str] = {}
    for name, service in services().items():
        for port in service.get("ports", []):
            host = int(str(port).split(":")[-2]) if ":" in str(port) else int(port)
            published[host] = name
    assert published == PUBLISHED


def test_kafka_topics_exist_with_their_dead_letter_topics() -> None:
    script = " ".join(str(part) for part in services()["kafka-init"]["command"])
    created = set(re.findall(r"--create\b[^\n]*?--topic\s+(\S+)", script.replace("\\\n", " ")))
    gateway = Settings.from_env(environment(services()[GATEWAY_SERVICE]))
    assert gateway.kafka_bootstrap, "the compose gateway should consume Kafka"
    for topic in gateway.kafka_topics:
        assert topic in created, f"{topic} is consumed but not created"
        assert topic + DLQ_SUFFIX in created, f"{topic}'s dead-letter topic is not created"
    kafka_env = environment(services()["kafka"])
    assert kafka_env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert "broker" in kafka_env["KAFKA_PROCESS_ROLES"]
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"], "single node in KRaft mode"
    host, _, port = gateway.kafka_bootstrap.partition(":")
    assert host == "kafka"
    assert f"://kafka:{port}" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]


def test_gateway_feeds_the_erp_simulator() -> None:
    gateway = Settings.from_env(environment(services()[GATEWAY_SERVICE]))
    sim = services()["erp-sim"]
    command = [str(part) for part in sim["command"]]
    assert command[0] == "erp-sim"
    port = command[command.index("--port") + 1]
    assert gateway.erp_url == f"http://erp-sim:{port}"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert f":{port}/healthz" in " ".join(sim["healthcheck"]["test"])


# --- Prometheus and Grafana ---------------------------------------------------------------------


def prometheus_config() -> dict[str, Any]:
    data = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert isinstance(data, dict)
    return data


def test_promtool_checks_the_config_and_its_rule_files() -> None:
    if not Path(PROMTOOL).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{PROMTOOL} missing (apt-get install prometheus)")
        pytest.skip(f"{PROMTOOL} missing (apt-get install prometheus)")
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS: [1-9]\d* rule files? found", result.stdout), result.stdout


def test_rule_files_are_rules_not_their_unit_tests() -> None:
    loaded = [
        path
        for pattern in prometheus_config()["rule_files"]
        for path in PROMETHEUS_CONFIG.parent.glob(pattern)
    ]
    assert loaded, "rule_files matches nothing"
    for path in loaded:
        assert "groups" in yaml.safe_load(path.read_text()), f"{path} is not a rules file"


def test_prometheus_scrapes_the_gateway_service_under_the_job_the_assets_select() -> None:
    service = services()["prometheus"]
    command = [str(part) for part in service["command"]]
    config_in_container = next(a.split("=", 1)[1] for a in command if "--config.file=" in a)
    assert host_path(service, config_in_container) == PROMETHEUS_CONFIG.resolve()
    gateway_port = Settings.from_env(
        {**dockerfile_env(), **environment(services()[GATEWAY_SERVICE])}
    ).port
    jobs = {job["job_name"]: job for job in prometheus_config()["scrape_configs"]}
    targets = {
        target
        for job in jobs.values()
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    assert f"{GATEWAY_SERVICE}:{gateway_port}" in targets
    for target in targets:
        host, _, _ = target.partition(":")
        assert host in services() or host == "localhost", f"{target}: no such compose service"
    gateway_jobs = [
        name
        for name, job in jobs.items()
        if any(f"{GATEWAY_SERVICE}:{gateway_port}" in s["targets"] for s in job["static_configs"])
    ]
    assert len(gateway_jobs) == 1
    assert jobs[gateway_jobs[0]].get("metrics_path", "/metrics") == "/metrics"
    # The job label the alert rules and the dashboard select must be the one scraped.
    assets = [*PROMETHEUS_CONFIG.parent.glob("rules/*.yml"), *dashboards()]
    selected = {m for path in assets for m in re.findall(r'job=\\?"([^"\\]+)', path.read_text())}
    assert selected <= set(jobs), f"assets select jobs {selected - set(jobs)} nobody scrapes"


def dashboards() -> list[Path]:
    return sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))


def provisioning(kind: str) -> list[dict[str, Any]]:
    service = services()["grafana"]
    folder = host_path(service, f"/etc/grafana/provisioning/{kind}")
    assert folder is not None, f"/etc/grafana/provisioning/{kind} is not mounted"
    files = sorted(folder.glob("*.yml")) + sorted(folder.glob("*.yaml"))
    assert files, f"no provisioning files in {folder}"
    return [yaml.safe_load(path.read_text()) for path in files]


def test_grafana_datasource_is_the_prometheus_service() -> None:
    sources = [s for doc in provisioning("datasources") for s in doc["datasources"]]
    prometheus = [s for s in sources if s["uid"] == "prometheus"]
    assert len(prometheus) == 1, sources
    assert prometheus[0]["type"] == "prometheus"
    command = " ".join(str(part) for part in services()["prometheus"]["command"])
    listen = re.search(r"--web\.listen-address=\S*:(\d+)", command)
    assert prometheus[0]["url"] == f"http://prometheus:{listen.group(1) if listen else 9090}"


def test_grafana_loads_the_dashboards_it_mounts() -> None:
    service = services()["grafana"]
    providers = [p for doc in provisioning("dashboards") for p in doc["providers"]]
    assert providers
    for provider in providers:
        folder = host_path(service, provider["options"]["path"])
        assert folder is not None, f"{provider['options']['path']} is not mounted"
        assert sorted(folder.glob("*.json")) == dashboards()
    assert dashboards(), "no dashboard to provision"
    home = environment(service).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home is not None:
        home_file = host_path(service, home)
        assert home_file is not None, f"{home} not mounted"
        assert home_file.is_file(), home_file


# --- the lock -----------------------------------------------------------------------------------


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"requirements.lock: {line!r} is not name==version"
            pins[canonical(name)] = version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(project: str = "atp-gateway") -> set[str]:
    """The distributions ``project`` needs at run time, from the installed metadata."""
    seen: set[str] = set()
    visited: set[tuple[str, str]] = set()
    todo: list[tuple[str, str]] = [(project, "")]
    while todo:
        name, extra = todo.pop()
        if (canonical(name), extra) in visited:
            continue
        visited.add((canonical(name), extra))
        for text in importlib.metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                seen.add(canonical(requirement.name))
                todo += [(requirement.name, e) for e in ("", *requirement.extras)]
    return seen


def test_lock_pins_the_runtime_closure_at_the_tested_versions() -> None:
    pins = lock_pins()
    closure = runtime_closure()
    assert set(pins) == closure, (
        f"unpinned: {sorted(closure - set(pins))}, not needed: {sorted(set(pins) - closure)}"
    )
    for name, version in pins.items():
        assert importlib.metadata.version(name) == version, f"{name}: .venv runs another version"


# --- the Dockerfile -----------------------------------------------------------------------------


@functools.cache
def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions per stage (ARGs before the first FROM in a stage of their own)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), " ".join(args.split())))
    return stages


def dockerfile_env(venv: Path | None = None) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in dockerfile_stages()[-1]:
        if instruction == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                if venv is not None:
                    value = value.replace("/opt/venv", str(venv))
                env[key] = value.replace("$PATH", os.environ.get("PATH", ""))
    return env


def test_dockerfile_shape() -> None:
    preamble, *stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage"
    image = next(args for op, args in preamble if op == "ARG").split("=", 1)[1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), image
    assert f"{sys.version_info.major}.{sys.version_info.minor}" == "3.11", "lock made on 3.11"
    final = dict(stages[-1])
    user = final["USER"].split(":")[0]
    assert user.isdigit(), "the runtime runs as a numeric user (Kubernetes' runAsNonRoot)"
    assert int(user) != 0, "the runtime runs as a non-root user"
    assert json.loads(final["ENTRYPOINT"]) == ["gateway"]
    assert json.loads(final["CMD"]) == ["serve"]
    env = dockerfile_env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    health = image_healthcheck()
    assert health is not None
    assert health[0] == "python", "no curl in slim images"
    assert "/healthz" in health[-1]
    runs = " ".join(args for stage in stages for op, args in stage if op == "RUN")
    assert WHEEL_STEP in runs, "test_image_steps runs this; keep them the same"
    assert INSTALL_STEP in runs, "test_image_steps runs this; keep them the same"
    assert not any(op == "COPY" and "--from" not in args for op, args in stages[-1]), (
        "the runtime stage takes nothing from the build context"
    )


def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (exception, regex): the last rule matching a path or a parent wins."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((exception, re.compile(regex)))
    return rules


def ignored(relative: str) -> bool:
    parts = relative.split("/")
    result = False
    for exception, regex in ignore_rules():
        for n in range(1, len(parts) + 1):
            if regex.fullmatch("/".join(parts[:n])):
                result = not exception
                break
    return result


def test_dockerignore_keeps_the_context_small() -> None:
    for path in (".venv/bin/python", ".git/config", "tests/conftest.py", "benchmarks/run.py"):
        assert ignored(path), f".dockerignore lets {path} into the build context"
    for path in ("pyproject.toml", "requirements.lock", "gateway/app.py"):
        assert not ignored(path), f".dockerignore keeps {path} out"
    assert ignored("gateway/__pycache__/app.cpython-311.pyc")


def build_context(into: Path) -> None:
    """The build stage's COPY steps, from the context .dockerignore lets through."""
    build = next(stage for stage in dockerfile_stages()[1:] if "build" in stage[0][1].lower())
    for op, args in build:
        if op != "COPY":
            continue
        *sources, target = shlex.split(args)
        for source in sources:
            origin = ROOT / source
            files = [origin] if origin.is_file() else sorted(origin.rglob("*"))
            for path in files:
                relative = path.relative_to(ROOT).as_posix()
                if not path.is_file() or ignored(relative):
                    continue
                if origin.is_file():
                    dest = into / target / path.name if target.endswith("/") else into / target
                else:
                    dest = into / target / path.relative_to(origin)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
        assert sources


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary directory other users can read: the venv is run as ``nobody`` under root
    (pytest's tmp_path lies in a directory only its owner may enter)."""
    path = Path(tempfile.mkdtemp(prefix="atp-stack-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run(args: list[str], timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


def others_can_run(path: str) -> bool:
    """Whether a user without privileges may execute ``path`` (every folder above it searchable)."""
    real = Path(os.path.realpath(path))
    return real.is_file() and all(p.stat().st_mode & 0o001 for p in (real, *real.parents))


def interpreter() -> tuple[str, dict[str, Any]]:
    """The Python 3.11 to build the venv from, and Popen arguments to run what it installs as a
    non-root user like the image does: ``nobody`` when the tests run as root and some Python 3.11
    is executable by others (pyenv's under /root is not), else the current user."""
    if os.geteuid() != 0:
        return sys.executable, {}
    candidates = [
        sys.executable,
        *(shutil.which(name) for name in ("python3.11", "python3")),
        "/usr/local/bin/python3.11",  # outside pyenv's shims, which lead into /root
        "/usr/bin/python3.11",
    ]
    for candidate in filter(None, candidates):
        if not others_can_run(candidate):
            continue
        probe = [candidate, "-c", "import sys, venv, ensurepip; print(sys.version_info[:2])"]
        answer = subprocess.run(probe, capture_output=True, text=True, check=False)
        if answer.stdout.strip() == "(3, 11)":
            return candidate, {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    return sys.executable, {}


def wait_for(url: str, proc: subprocess.Popen[bytes], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url}: the process exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer 200 within {seconds} s")


def compose_env_for_test(redis_url: str, postgres_dsn: str, erp_port: int) -> dict[str, str]:
    """The compose gateway's settings with the test's Redis, PostgreSQL and simulator."""
    env = environment(services()[GATEWAY_SERVICE])
    env.update(
        GATEWAY_REDIS_URL=redis_url,
        GATEWAY_POSTGRES_DSN=postgres_dsn,
        GATEWAY_ERP_URL=f"http://127.0.0.1:{erp_port}",
        GATEWAY_API_KEYS=",".join(f"{role}:{key}" for role, key in KEYS.items()),
        GATEWAY_LOG_LEVEL="warning",
    )
    env.pop("GATEWAY_KAFKA_BOOTSTRAP")  # the broker of the stack is not part of this test
    return env


@pytest.mark.timeout(600)
def test_image_steps(redis_url: str, postgres_dsn: str, shared_tmp: Path) -> None:
    """The Dockerfile's steps, run directly: 20-25 s here with pip's cache warm (measured
    2026-12-03, 2 shared cores), most of it pip wheel and install; a cold cache downloads the
    wheels of requirements.lock from the index first."""
    context, wheels, venv = shared_tmp / "src", shared_tmp / "wheels", shared_tmp / "venv"
    build_context(context)
    assert not (context / "tests").exists()
    pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    wheel = WHEEL_STEP.replace("/wheels", str(wheels)).split()
    run([sys.executable, "-m", *wheel], cwd=context, env=pip_env)
    python, user = interpreter()
    run([python, "-m", "venv", str(venv)])
    lock_copy = shared_tmp / "requirements.lock"
    shutil.copy2(context / "requirements.lock", lock_copy)
    install = INSTALL_STEP.replace("/opt/venv", str(venv)).replace("/wheels", str(wheels))
    run(install.replace("/tmp/requirements.lock", str(lock_copy)).split(), env=pip_env)

    # The venv holds exactly the lock's pins, plus the gateway and the data files it loads.
    frozen = run([str(venv / "bin" / "pip"), "freeze", "--exclude", "atp-gateway"]).stdout
    pins = {canonical(n): v for n, _, v in (x.partition("==") for x in frozen.split())}
    assert pins == lock_pins()
    site = next((venv / "lib").glob("python3*/site-packages"))
    data_files = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "gateway").rglob("*")
        if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
    ]
    missing = [f for f in data_files if not (site / f).is_file()]
    assert data_files
    assert not missing, f"the wheel leaves out {missing}"

    env = {**os.environ, **dockerfile_env(venv), "HOME": "/nonexistent"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    gateway = str(venv / "bin" / "gateway")
    assert "serve" in run([gateway, "--help"], env=env, **user).stdout

    erp_port, port = free_port(), free_port()
    env.update(compose_env_for_test(redis_url, postgres_dsn, erp_port), GATEWAY_PORT=str(port))
    run([gateway, *services()["migrate"]["command"]], env=env, timeout=60, **user)

    sim_command = [str(part) for part in services()["erp-sim"]["command"]]
    sim_command[sim_command.index("--port") + 1] = str(erp_port)
    sim_check = [
        part.replace(":8090/", f":{erp_port}/")
        for part in services()["erp-sim"]["healthcheck"]["test"][1:]
    ]
    health = image_healthcheck()
    assert health is not None
    sim = subprocess.Popen([gateway, *sim_command], env=env, **user)
    serve = subprocess.Popen([gateway, "serve"], env=env, **user)
    try:
        wait_for(f"http://127.0.0.1:{erp_port}/healthz", sim)
        wait_for(f"http://127.0.0.1:{port}/readyz", serve)
        if user:
            assert Path(f"/proc/{serve.pid}").stat().st_uid == NOBODY
        run(health, env=env, timeout=10, **user)  # Docker runs a HEALTHCHECK as the image's USER
        run(sim_check, env=env, timeout=10, **user)
        # One scrape shows the whole group (what Prometheus relies on): every worker's counter.
        workers = {str(i) for i in range(Settings.from_env(env).workers)}
        assert len(workers) >= 2
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                scraped = answer.read().decode()
            shown = set(re.findall(r'gateway_worker_cpu_seconds_total\{worker="(\d+)"', scraped))
            if shown == workers or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert shown == workers, scraped[-2000:]
    finally:
        stop_process(serve, grace=30)
        stop_process(sim, grace=10)
    assert serve.returncode == 0, f"serve exited with {serve.returncode}"
    # The checks can fail: nothing listens any more.
    for check in (health, sim_check):
        stopped = subprocess.run(
            check, env=env, capture_output=True, timeout=10, check=False, **user
        )
        assert stopped.returncode != 0, f"{check} passed with nothing listening"
