"""One way for tests to run the bench app (``python -m benches.app``) in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_app(*overrides: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the app from the repository root with ``overrides``; output captured as text."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "benches.app", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
