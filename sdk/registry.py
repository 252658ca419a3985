"""The process-wide engine registry: one AsyncLLM per engine configuration."""

from __future__ import annotations

import threading

from kvloom.async_llm import AsyncLLM
from kvloom.engine.arg_utils import EngineArgs

_engines: dict[tuple, AsyncLLM] = {}
_lock = threading.Lock()


def get_engine(model: str | None = None, **engine_args) -> AsyncLLM:
    """The shared engine for this model and these engine arguments, created on first use.

    Every adapter and the local server call this, so in one process they hold one copy of the
    weights and one KV cache, and their requests are batched together.
    """
    args = EngineArgs.from_kwargs(model=model, **engine_args)
    key = args.key()
    with _lock:
        engine = _engines.get(key)
        if engine is None or not engine.is_running:
            engine = AsyncLLM(args)
            _engines[key] = engine
        return engine


def shutdown_engines() -> None:
    """Shut down every shared engine (their memory is released)."""
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.shutdown()
