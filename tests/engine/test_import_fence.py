"""The scheduler and KV cache bookkeeping import without torch."""

import subprocess
import sys

CODE = """
import sys
sys.modules["torch"] = None
import kvloom.engine.scheduler.scheduler
import kvloom.engine.kv_cache.manager
import kvloom.engine.request
import kvloom.engine.config
import kvloom.engine.arg_utils
print("ok")
"""


def test_scheduler_and_kv_cache_import_without_torch():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
