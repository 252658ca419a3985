"""The examples run as written (on the default model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow
def test_offline_batch_example():
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "offline_batch.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "KVLOOM_LOGGING_LEVEL": "WARNING"},
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
