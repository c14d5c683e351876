"""Run real gateway processes (``python -m gateway serve``) for multi-process tests."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from gateway.dev.services import free_port, stop_process
from tests.conftest import KEYS


class GatewayProcess:
    # What start-up waits for: a 200 here.
    ready_path = "/readyz"

    def __init__(self, redis_url: str, postgres_dsn: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {
            **os.environ,
            "GATEWAY_PORT": str(self.port),
            "GATEWAY_REDIS_URL": redis_url,
            "GATEWAY_POSTGRES_DSN": postgres_dsn,
            "GATEWAY_API_KEYS": ",".join(f"{role}:{key}" for role, key in KEYS.items()),
            "GATEWAY_LOG_LEVEL": "warning",
            **env,
        }
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"],
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"gateway exited: {self._log.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"gateway did not answer 200 on {self.ready_path}")

    def log_text(self) -> str:
        """What the process has written to stderr so far: its log lines. Read with pread: the
        child shares the file's offset, so seeking here would move where it writes next."""
        fd = self._log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> Any:
        stop_process(self.proc, grace=15)
        self._log.close()
        return self.proc.returncode
