"""kvloom.serve(): hand an OpenAI-compatible endpoint over the shared engine to agents and tools."""

from __future__ import annotations

import os

from kvloom.async_llm import AsyncLLM
from kvloom.llm import LLM


def as_engine_client(llm_or_engine_or_model=None, **engine_args) -> AsyncLLM:
    """The AsyncLLM behind an LLM, an AsyncLLM itself, or the shared engine for a model name."""
    if isinstance(llm_or_engine_or_model, AsyncLLM):
        return llm_or_engine_or_model
    if isinstance(llm_or_engine_or_model, LLM):
        return llm_or_engine_or_model.engine_client
    from kvloom.registry import get_engine

    return get_engine(llm_or_engine_or_model, **engine_args)


def serve(
    llm_or_engine_or_model=None,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    served_model_name: str | list[str] | None = None,
    allowed_origins: list[str] | None = None,
    **engine_args,
):
    """Start the server on a background thread of this process; returns a handle with base_url and stop().

    The endpoint runs on the same engine (weights and KV cache) as the rest of the application.
    Binds 127.0.0.1 unless told otherwise; api_key (or KVLOOM_API_KEY) guards /v1/*.
    """
    from kvloom.integrations.openai.server import start_server

    client = as_engine_client(llm_or_engine_or_model, **engine_args)
    return start_server(
        client, host, port, api_key or os.environ.get("KVLOOM_API_KEY"), served_model_name, allowed_origins
    )
