"""An embedded engine is a guest in its host process.

Importing kvloom, or starting and using an engine, must not change process-wide state: environment
variables, torch's global seed and RNG state, its default dtype, the root logger. Every check runs in a
fresh interpreter, so that nothing this test session imported or configured hides a change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvloom_testing import build_tiny_model

# What the suite's conftest sets for its own process, and what kvloom reads: the children start without
# them, so that a library that sets them (os.environ.setdefault) or depends on them is caught.
_UNSET = ("HF_HUB_OFFLINE", "KVLOOM_CONFIGURE_LOGGING", "KVLOOM_LOGGING_LEVEL")

# The packages an engine may load: the top-level package (whose __init__ is run by any import under it),
# the engine and the kernels. Not the SDK modules (kvloom.llm, kvloom.serving, ...) nor the integrations.
_ENGINE_SIDE = ("kvloom.engine", "kvloom.kernels")


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _UNSET}
    env.update(extra)
    return env


def _run(code: str, *args: str, timeout: float = 300, **env: str) -> tuple[dict, str]:
    """Run code in a fresh interpreter; return the JSON object it prints last, and its stderr."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=_child_env(**env)
    )
    assert out.returncode == 0, f"exit status {out.returncode}\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def _is_engine_side(name: str) -> bool:
    return name == "kvloom" or any(name == p or name.startswith(p + ".") for p in _ENGINE_SIDE)


# Shared by the children: a snapshot of the process-wide state, and a comparison with a later one.
_STATE = """
import json, logging, os, sys, warnings

def env_diff(before):
    now = dict(os.environ)
    return {
        "added": {k: now[k] for k in now.keys() - before.keys()},
        "removed": sorted(before.keys() - now.keys()),
        "changed": {k: [before[k], now[k]] for k in now.keys() & before.keys() if now[k] != before[k]},
    }

def logger_state(name=None):
    lg = logging.getLogger(name)
    return {
        "handlers": [type(h).__name__ + "@" + str(id(h)) for h in lg.handlers],
        "level": lg.level,
        "propagate": lg.propagate,
        "disabled": lg.disabled,
    }
"""

# (a) and (b): import kvloom and every module under kvloom.engine.
IMPORT_ALL = (
    _STATE
    + """
env0 = dict(os.environ)
root0 = logger_state()
import torch
seed0, rng0 = torch.initial_seed(), torch.get_rng_state()
dtype0, threads0 = torch.get_default_dtype(), torch.get_num_threads()
filters0 = list(warnings.filters)  # after torch, which adds its own

import importlib, pkgutil
import kvloom
import kvloom.engine
names = sorted(m.name for m in pkgutil.walk_packages(kvloom.engine.__path__, "kvloom.engine."))
for name in names:
    importlib.import_module(name)

print(json.dumps({
    "imported": names,
    "loaded": sorted(m for m in sys.modules if m == "kvloom" or m.startswith("kvloom.")),
    "env": env_diff(env0),
    "default_dtype": str(torch.get_default_dtype()),
    "default_dtype_before": str(dtype0),
    "initial_seed_unchanged": torch.initial_seed() == seed0,
    "rng_state_unchanged": bool(torch.equal(torch.get_rng_state(), rng0)),
    "num_threads_unchanged": torch.get_num_threads() == threads0,
    "new_warning_filters": [repr(f) for f in warnings.filters if f not in filters0],
    "root": logger_state(),
    "root_before": root0,
    "kvloom": logger_state("kvloom"),
    "kvloom_handler_types": [type(h).__name__ for h in logging.getLogger("kvloom").handlers],
}))
"""
)


@pytest.fixture(scope="module")
def imported() -> dict:
    report, _ = _run(IMPORT_ALL)
    return report


def test_engine_modules_import_no_sdk_module_or_integration(imported):
    """(a) `import kvloom.engine.<anything>` loads only kvloom itself, kvloom.engine* and kvloom.kernels*."""
    # The walk found the engine, so the check below means something.
    for name in ("kvloom.engine.llm_engine", "kvloom.engine.scheduler.scheduler", "kvloom.engine.sampling_params"):
        assert name in imported["imported"]
    assert "kvloom.engine.log" in imported["loaded"]
    others = [m for m in imported["loaded"] if not _is_engine_side(m)]
    assert others == [], f"importing the engine's modules loaded SDK or integration modules: {others}"


def test_import_changes_no_process_wide_state(imported):
    """(b) `import kvloom` and every kvloom.engine module: no env var, seed, dtype or root logging change."""
    assert imported["env"] == {"added": {}, "removed": [], "changed": {}}
    assert imported["default_dtype"] == imported["default_dtype_before"] == "torch.float32"
    assert imported["initial_seed_unchanged"]
    assert imported["rng_state_unchanged"]
    assert imported["num_threads_unchanged"]
    assert imported["new_warning_filters"] == []
    assert imported["root"] == imported["root_before"]
    # The library convention: a NullHandler, no level, records propagate to whatever the application set up.
    assert imported["kvloom_handler_types"] == ["NullHandler"]
    assert imported["kvloom"]["level"] == 0 and imported["kvloom"]["propagate"] is True


LAZY_NAMES = """
import json, sys
import kvloom
before = sorted(m for m in sys.modules if m.startswith("kvloom."))
from kvloom import LLM, AsyncLLM, SamplingParams, RequestOutputKind, EngineArgs, serve, get_engine, shutdown_engines
import kvloom.async_llm, kvloom.llm, kvloom.registry, kvloom.serving
from kvloom.engine.llm_engine import LLMEngine
ns = {}
exec("from kvloom import *", ns)
print(json.dumps({
    "sdk_before": [m for m in before if not m.startswith(("kvloom.engine", "kvloom.kernels"))],
    "same": [
        LLM is kvloom.llm.LLM, AsyncLLM is kvloom.async_llm.AsyncLLM, serve is kvloom.serving.serve,
        get_engine is kvloom.registry.get_engine, shutdown_engines is kvloom.registry.shutdown_engines,
        kvloom.LLMEngine is LLMEngine,
    ],
    "star_missing": [n for n in kvloom.__all__ if n not in ns],
    "dir_missing": [n for n in kvloom.__all__ if n not in dir(kvloom)],
    "unknown_raises": not hasattr(kvloom, "no_such_name"),
}))
"""


def test_sdk_names_load_on_first_use():
    """`import kvloom` loads no SDK module, yet every public name still imports from kvloom."""
    report, _ = _run(LAZY_NAMES)
    assert report["sdk_before"] == []
    assert all(report["same"]), report["same"]
    assert report["star_missing"] == [] and report["dir_missing"] == []
    assert report["unknown_raises"]


# ---- configure_default_logging ---------------------------------------------------------------------

DEFAULT_LOGGING = """
import json, logging, sys
setup = sys.argv[1]
if setup == "root":
    logging.basicConfig(level=logging.WARNING)
elif setup == "kvloom":
    class AppHandler(logging.Handler):
        def emit(self, record):
            pass

    logging.getLogger("kvloom").addHandler(AppHandler())
from kvloom.engine.log import configure_default_logging
root_before = list(logging.getLogger().handlers), logging.getLogger().level
configure_default_logging()
configure_default_logging()  # idempotent
lg = logging.getLogger("kvloom")
logging.getLogger("kvloom.engine.test").info("an engine line")
print(json.dumps({
    "handlers": sorted(type(h).__name__ for h in lg.handlers),
    "level": logging.getLevelName(lg.level),
    "propagate": lg.propagate,
    "root_unchanged": (list(logging.getLogger().handlers), logging.getLogger().level) == root_before,
}))
"""


@pytest.mark.parametrize(
    ("setup", "env", "handlers", "level", "propagate"),
    [
        ("none", {}, ["NullHandler", "StreamHandler"], "INFO", False),
        ("none", {"KVLOOM_LOGGING_LEVEL": "warning"}, ["NullHandler", "StreamHandler"], "WARNING", False),
        ("none", {"KVLOOM_CONFIGURE_LOGGING": "0"}, ["NullHandler"], "NOTSET", True),
        ("root", {}, ["NullHandler"], "NOTSET", True),
        ("kvloom", {}, ["AppHandler", "NullHandler"], "NOTSET", True),
    ],
    ids=["nobody-configured", "level-from-env", "opted-out", "app-configured-root", "app-configured-kvloom"],
)
def test_configure_default_logging(setup, env, handlers, level, propagate):
    report, stderr = _run(DEFAULT_LOGGING, setup, **env)
    assert report["handlers"] == handlers
    assert report["level"] == level and report["propagate"] is propagate
    assert report["root_unchanged"]
    assert ("INFO" in stderr and "[kvloom.engine.test] an engine line" in stderr) == (level == "INFO")


CLI_LOGGING = """
import json, logging
import kvloom.cli as cli
cli._generate = lambda args: None  # no engine: only the command line's own set-up
cli.main(["generate", "hi"])
print(json.dumps([type(h).__name__ for h in logging.getLogger("kvloom").handlers]))
"""


def test_command_line_shows_info_lines():
    """`kvloom serve` / `kvloom bench` own their process: they turn the engine's INFO lines on."""
    handlers, _ = _run(CLI_LOGGING)
    assert handlers == ["NullHandler", "StreamHandler"]


# ---- (c) an engine at work -------------------------------------------------------------------------

ENGINE_AT_WORK = (
    _STATE
    + """
import copy, functools
model_dir, mode = sys.argv[1], sys.argv[2]
# torch._dynamo's import sets TORCHINDUCTOR_CACHE_DIR (torch's own doing, in any host that imports it), and
# transformers imports it with any Llama config, as the tokenizer's loading does: import it before the snapshot.
import torch._dynamo
env0 = dict(os.environ)
if mode == "app-logging":
    logging.basicConfig(level=logging.INFO, format="APP %(levelname)s [%(name)s] %(message)s")
root0 = logger_state()
import importlib.util
import torch
seed0, rng0 = torch.initial_seed(), torch.get_rng_state()
dtype0, threads0 = torch.get_default_dtype(), torch.get_num_threads()

import kvloom
from kvloom import LLM, RequestOutputKind, SamplingParams

# Calls from kvloom's own files to torch's process-wide setters (restored or not: other threads see them).
ours = tuple(
    os.path.realpath(p)
    for pkg in ("kvloom", "kvloom.engine", "kvloom.kernels", "kvloom.integrations")
    for p in importlib.util.find_spec(pkg).submodule_search_locations
)
setter_calls = []

def spy(owner, name):
    real = getattr(owner, name)

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        code = sys._getframe(1).f_code
        if os.path.realpath(code.co_filename).startswith(ours):
            where = f"{os.path.relpath(code.co_filename)}:{sys._getframe(1).f_lineno}"
            setter_calls.append(f"torch.{name}{args!r} from {where}")
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)

for name in ("manual_seed", "seed", "set_default_dtype", "set_default_device", "set_num_threads"):
    spy(torch, name)
torch.random.manual_seed = torch.manual_seed

params = {
    "seeded": SamplingParams(temperature=0.8, top_p=0.9, max_tokens=4, seed=1, stop=["zzz"]),
    "unseeded": SamplingParams(temperature=1.0, max_tokens=4),
    "greedy-final": SamplingParams(temperature=0.0, max_tokens=4, output_kind=RequestOutputKind.FINAL_ONLY),
    "sampled-final": SamplingParams(temperature=1.0, max_tokens=4, output_kind=RequestOutputKind.FINAL_ONLY),
    "n2-final": SamplingParams(n=2, temperature=1.0, max_tokens=3, output_kind=RequestOutputKind.FINAL_ONLY),
}
before = {k: copy.deepcopy(vars(p)) for k, p in params.items()}
llm = LLM(model_dir, num_gpu_blocks_override=32)
n_tokens = 0
for p in params.values():
    outs = llm.generate(["The quick brown fox", "Hello world"], p, use_tqdm=False)
    n_tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
mutated = {
    k: {f: [repr(before[k][f]), repr(v)] for f, v in vars(p).items() if before[k].get(f) != v}
    for k, p in params.items()
}

print(json.dumps({
    "n_tokens": n_tokens,
    "env": env_diff(env0),
    "default_dtype": str(torch.get_default_dtype()),
    "default_dtype_before": str(dtype0),
    "initial_seed_unchanged": torch.initial_seed() == seed0,
    "rng_state_unchanged": bool(torch.equal(torch.get_rng_state(), rng0)),
    "num_threads_unchanged": torch.get_num_threads() == threads0,
    "setter_calls": setter_calls,
    "root": logger_state(),
    "root_before": root0,
    "kvloom_handler_types": [type(h).__name__ for h in logging.getLogger("kvloom").handlers],
    "kvloom_propagate": logging.getLogger("kvloom").propagate,
    "mutated_params": {k: v for k, v in mutated.items() if v},
}))
"""
)


@pytest.fixture(scope="module")
def two_eos_llama(tmp_path_factory) -> str:
    """The tiny Llama with a second end id (<|im_start|>) in its config and generation config, as Qwen2.5 has."""
    return build_tiny_model(str(tmp_path_factory.mktemp("host-llama")), eos_token_id=[2, 1])


@pytest.fixture(scope="module")
def at_work(two_eos_llama) -> tuple[dict, str]:
    """An engine started and used in a script that configured no logging."""
    return _run(ENGINE_AT_WORK, two_eos_llama, "no-logging")


@pytest.fixture(scope="module")
def at_work_app_logging(two_eos_llama) -> tuple[dict, str]:
    """The same in an application that configured logging (basicConfig at INFO) first."""
    return _run(ENGINE_AT_WORK, two_eos_llama, "app-logging")


def test_engine_leaves_environment_unchanged(at_work):
    report, _ = at_work
    assert report["n_tokens"] > 0
    assert report["env"] == {"added": {}, "removed": [], "changed": {}}


def test_engine_leaves_torch_global_state_unchanged(at_work):
    report, _ = at_work
    assert report["default_dtype"] == report["default_dtype_before"] == "torch.float32"
    assert report["num_threads_unchanged"]
    assert report["initial_seed_unchanged"], "torch.manual_seed was called: the host's global seed changed"
    assert report["rng_state_unchanged"], "the global torch RNG was reseeded or consumed"


def test_engine_calls_no_process_wide_torch_setter(at_work):
    """Even a change that is undone later is seen, meanwhile, by every other thread of the host."""
    report, _ = at_work
    assert report["setter_calls"] == []


def test_engine_leaves_root_logger_unchanged(at_work, at_work_app_logging):
    for report, _ in (at_work, at_work_app_logging):
        assert report["root"] == report["root_before"]


def test_engine_shows_its_info_lines_when_nobody_configured_logging(at_work):
    report, stderr = at_work
    assert report["kvloom_handler_types"] == ["NullHandler", "StreamHandler"]
    assert report["kvloom_propagate"] is False
    assert "INFO" in stderr and "[kvloom" in stderr


def test_engine_defers_to_the_applications_logging(at_work_app_logging):
    report, stderr = at_work_app_logging
    assert report["kvloom_handler_types"] == ["NullHandler"]
    assert report["kvloom_propagate"] is True
    assert "APP INFO [kvloom" in stderr  # the engine's records reach the application's handler


def test_generate_does_not_mutate_the_callers_sampling_params(at_work):
    report, _ = at_work
    assert report["mutated_params"] == {}
