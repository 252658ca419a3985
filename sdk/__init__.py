"""kvloom: an app-embedded LLM serving SDK with vLLM's public names."""

from __future__ import annotations

import logging
import os

from kvloom.engine.arg_utils import EngineArgs
from kvloom.engine.lora.request import LoRARequest
from kvloom.engine.outputs import CompletionOutput, Logprob, RequestOutput
from kvloom.engine.sampling_params import RequestOutputKind, SamplingParams
from kvloom.engine.structured_output import GuidedDecodingParams, StructuredOutputsParams
from kvloom.llm import LLM

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "AsyncLLM",
    "get_engine",
    "serve",
    "shutdown_engines",
    "CompletionOutput",
    "EngineArgs",
    "GuidedDecodingParams",
    "LLMEngine",
    "Logprob",
    "LoRARequest",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "StructuredOutputsParams",
    "__version__",
]


def __getattr__(name: str):
    # The engine pulls in torch and transformers; load it on first use.
    if name == "LLMEngine":
        from kvloom.engine.llm_engine import LLMEngine

        return LLMEngine
    if name == "AsyncLLM":
        from kvloom.async_llm import AsyncLLM

        return AsyncLLM
    if name == "serve":
        from kvloom.serving import serve

        return serve
    if name in ("get_engine", "shutdown_engines"):
        from kvloom import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'kvloom' has no attribute {name!r}")


def _configure_logging() -> None:
    """Show the engine's INFO lines (what it chose) unless the application configured logging."""
    logger = logging.getLogger("kvloom")
    if logger.handlers or os.environ.get("KVLOOM_CONFIGURE_LOGGING", "1") == "0":
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("KVLOOM_LOGGING_LEVEL", "INFO").upper())
    logger.propagate = False


_configure_logging()
