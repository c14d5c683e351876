"""Re-take the ops console's screenshots (status, limits, dead letters, audit) into this folder.

They come from ``tests/test_ops_console.py::test_screenshots``, which starts the real thing (Redis,
PostgreSQL, the ERP simulator behind a gateway, Debian's headless Chromium) and, with
``ATP_SCREENSHOTS_DIR`` set, writes its PNGs here instead of to a temporary folder:

    .venv/bin/python docs/screenshots/make.py

PostgreSQL is the tests' (``GATEWAY_TEST_POSTGRES_DSN``, else the local ``test`` database).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def main() -> int:
    env = {**os.environ, "ATP_SCREENSHOTS_DIR": str(HERE)}
    test = "tests/test_ops_console.py::test_screenshots"
    command = [sys.executable, "-m", "pytest", test, "-q", "-p", "no:cacheprovider"]
    return subprocess.run(command, cwd=ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
