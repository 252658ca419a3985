"""kvloom.serve(): hand an OpenAI-compatible endpoint over the shared engine to agents and tools."""

from __future__ import annotations

import json
import os

from kvloom.async_llm import AsyncLLM
from kvloom.engine.lora.request import LoRARequest
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
    api_key: str | list[str] | None = None,
    served_model_name: str | list[str] | None = None,
    allowed_origins: list[str] | None = None,
    lora_modules: dict[str, str] | list | None = None,
    allow_runtime_lora_updating: bool = False,
    tool_call_parser: str | None = None,
    enable_auto_tool_choice: bool = True,
    max_request_body_bytes: int | None = None,
    lora_root: str | None = None,
    public_metrics: bool = False,
    **engine_args,
):
    """Start the server on a background thread of this process; returns a handle with base_url and stop().

    The endpoint runs on the same engine (weights and KV cache) as the rest of the application.
    Binds 127.0.0.1 unless told otherwise; api_key (or KVLOOM_API_KEY) guards /v1/*.
    lora_modules ({name: path} or LoRARequests) registers adapters that requests select by model
    name; adapters already registered on the engine are served too. tool_call_parser names the
    tool-call format (vLLM's --tool-call-parser; default: the chat template's, else hermes).
    Request bodies over max_request_body_bytes (default 8 MiB) get a 413; runtime LoRA loading takes
    paths under lora_root only, when given; public_metrics serves /metrics without the API key.
    """
    from kvloom.integrations.openai.server import start_server

    client = as_engine_client(llm_or_engine_or_model, **engine_args)
    return start_server(
        client,
        host,
        port,
        api_key or os.environ.get("KVLOOM_API_KEY"),
        served_model_name,
        allowed_origins,
        lora_requests(lora_modules, client.list_loras()),
        allow_runtime_lora_updating or _env_flag("KVLOOM_ALLOW_RUNTIME_LORA_UPDATING"),
        tool_call_parser=tool_call_parser,
        enable_auto_tool_choice=enable_auto_tool_choice,
        lora_root=lora_root,
        public_metrics=public_metrics,
        **({"max_request_body_bytes": max_request_body_bytes} if max_request_body_bytes else {}),
    )


def lora_requests(modules, taken_ids=()) -> list[LoRARequest]:
    """LoRARequests from {name: path}, "name=path" strings, vLLM's JSON form, or LoRARequests.

    New adapters get ids after the largest id in taken_ids.
    """
    if not modules:
        return []
    if isinstance(modules, dict):
        modules = [f"{name}={path}" for name, path in modules.items()]
    next_id = max(taken_ids, default=0) + 1
    out: list[LoRARequest] = []
    for m in modules:
        if isinstance(m, LoRARequest):
            out.append(m)
            continue
        m = str(m).strip()
        if m.startswith("{"):
            spec = json.loads(m)
            name, path, base = spec["name"], spec["path"], spec.get("base_model_name")
        elif "=" in m:
            name, path = m.split("=", 1)
            base = None
        else:
            raise ValueError(f"a LoRA module must be name=path or a JSON object, got {m!r}")
        out.append(LoRARequest(name, next_id, path, base_model_name=base))
        next_id += 1
    return out


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
