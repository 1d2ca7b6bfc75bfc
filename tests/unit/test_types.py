"""The strict static type check of src/ is clean (scripts/test runs it too, before pytest).

The configuration is `[tool.mypy]` in pyproject.toml; its cache (.mypy_cache) makes a run
after the first take under a second.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_strict_on_src_is_clean() -> None:
    res = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Success: no issues found" in res.stdout
