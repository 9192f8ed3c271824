"""The test folders are not packages (no __init__.py), so pytest imports each test file and conftest.py by its
basename: two files of one name, or a second conftest.py, shadow each other and break collection of the whole
suite (a nested tests/serve/conftest.py once hid tests/conftest.py's helpers from 11 modules)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_every_test_module_has_its_own_basename():
    names = Counter(p.name for p in TESTS.rglob("*.py"))
    assert [name for name, n in names.items() if n > 1] == []


def test_the_only_conftest_is_the_top_one():
    assert sorted(TESTS.rglob("conftest.py")) == [TESTS / "conftest.py"]
