"""The test suite's own layout: a test module's helpers are its own. What several modules share
lives in the non-test modules of ``tests/`` (helpers, kafka_feed, reservation_scenarios, ...), so
no module here imports a test module: renaming or deleting a test never breaks another file."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_test_module(dotted: str) -> bool:
    """A module of this suite (``tests.x`` or relative) named ``test_*``."""
    package, _, name = dotted.rpartition(".")
    return name.startswith("test_") and (package == "tests" or package.strip(".") == "")


def imported_test_modules(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _is_test_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            if node.module and _is_test_module(base):
                found.append(base)
            elif node.module in (None, "tests"):  # from tests import test_x / from . import test_x
                found += [f"{base}.{a.name}" for a in node.names if _is_test_module(a.name)]
    return found


def test_the_check_sees_each_spelling() -> None:
    spellings = [
        "from tests.test_api import availability",
        "import tests.test_api",
        "from tests import test_api as single",
        "from . import test_api",
        "from .test_api import availability",
    ]
    for line in spellings:
        assert imported_test_modules(line), line
    others = "from tests.helpers import event\nimport tests.proxy\nfrom aiohttp import test_utils"
    assert not imported_test_modules(others + "\nfrom aiohttp.test_utils import TestClient")


def test_no_module_imports_a_test_module() -> None:
    offenders = {
        path.name: imported
        for path in sorted(TESTS.glob("*.py"))
        if (imported := imported_test_modules(path.read_text()))
    }
    assert offenders == {}, "move what they share into a non-test module of tests/"
