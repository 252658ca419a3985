"""kvloom: an app-embedded LLM serving SDK with vLLM's public names.

Importing kvloom changes nothing process-wide: it gives the "kvloom" logger a NullHandler and loads the
SDK modules (LLM, AsyncLLM, the server, the engine registry) on first use. An engine shows its INFO lines
when it starts unless the application configured logging (see kvloom.engine.log).
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from kvloom.engine.arg_utils import EngineArgs
from kvloom.engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from kvloom.engine.lora.request import LoRARequest
from kvloom.engine.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    PoolingOutput,
    PoolingRequestOutput,
    RequestOutput,
)
from kvloom.engine.pooling.params import PoolingParams
from kvloom.engine.sampling_params import RequestOutputKind, SamplingParams
from kvloom.engine.structured_output import GuidedDecodingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from kvloom.async_llm import AsyncLLM
    from kvloom.engine.llm_engine import LLMEngine
    from kvloom.llm import LLM
    from kvloom.registry import get_engine, shutdown_engines
    from kvloom.serving import serve

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "AsyncLLM",
    "get_engine",
    "serve",
    "shutdown_engines",
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSearchSequence",
    "CompletionOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "EngineArgs",
    "GuidedDecodingParams",
    "LLMEngine",
    "Logprob",
    "LoRARequest",
    "PoolingOutput",
    "PoolingParams",
    "PoolingRequestOutput",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "StructuredOutputsParams",
    "__version__",
]

# The library convention: records go nowhere of kvloom's choosing until the application (or an engine
# starting with nobody having configured logging, see kvloom.engine.log) says where.
if not any(type(h) is logging.NullHandler for h in logging.getLogger("kvloom").handlers):  # once, even on reload
    logging.getLogger("kvloom").addHandler(logging.NullHandler())

# name -> module that defines it. Loaded on first use, so that importing kvloom (or any kvloom.engine
# module, which imports this package first) pulls in neither the SDK modules nor torch and transformers.
_LAZY = {
    "LLM": "kvloom.llm",
    "AsyncLLM": "kvloom.async_llm",
    "LLMEngine": "kvloom.engine.llm_engine",
    "serve": "kvloom.serving",
    "get_engine": "kvloom.registry",
    "shutdown_engines": "kvloom.registry",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvloom' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
