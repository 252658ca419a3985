"""POST /v1/embeddings: OpenAI's embeddings API (float or base64 vectors) over an embedding model's engine.

The server's engine must run an embedding model (`kvloom serve MODEL --runner pooling`; a BERT
model is one by default). A server of a generative model answers /v1/embeddings with a 400, and an
embedding model's server answers the generation routes with a 400, each naming the reason.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Literal

from fastapi import FastAPI, Request
from pydantic import Field

from kvloom import PoolingParams
from kvloom.integrations.openai.context import APIError, ServerContext
from kvloom.integrations.openai.protocol import OpenAIModel, new_id, now
from kvloom.integrations.openai.streams import run_until_disconnected

# The generation routes an embedding model's server refuses (registered ahead of their handlers).
_GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")


class EmbeddingRequest(OpenAIModel):
    """OpenAI's embeddings body, with vLLM's extras (truncate_prompt_tokens, add_special_tokens, normalize)."""

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    add_special_tokens: bool = True
    normalize: bool | None = None


def register(app: FastAPI, ctx: ServerContext, responses: dict) -> None:
    pooling = ctx.client.runner_type == "pooling"

    if pooling:

        async def generation_refused():
            raise APIError(
                f"The model `{ctx.names[0]}` is an embedding model (runner='pooling'): it does not generate text; "
                "use /v1/embeddings",
                param="model",
            )

        for path in _GENERATION_PATHS:
            app.add_api_route(path, generation_refused, methods=["POST"], include_in_schema=False)

    @app.post("/v1/embeddings", responses=responses)
    async def embeddings(body: EmbeddingRequest, raw: Request):
        model, _ = ctx.resolve_model(body.model)
        if not pooling:
            raise APIError(
                f"The model `{model}` is a generative model and does not support the embeddings API; serve an "
                "embedding model (kvloom serve MODEL --runner pooling)",
                param="model",
            )
        unsupported = body.unsupported_fields()
        if unsupported:
            raise APIError(
                f"unsupported field(s): {', '.join(unsupported)}; kvloom does not implement them", param=unsupported[0]
            )
        try:
            params = PoolingParams(body.dimensions, body.normalize, body.truncate_prompt_tokens, task="embed")
        except ValueError as e:
            raise APIError(str(e)) from None
        prompts = await _prompts(body, ctx)
        rid = new_id("embd")
        streams = []
        try:
            for i, prompt in enumerate(prompts):
                streams.append(await ctx.client.open_stream(prompt, params, f"{rid}-{i}"))
        except ValueError as e:  # the engine's checks (too long, dimensions): the request's fault
            for s in streams:
                await s.aclose()
            # The served name, as vLLM reports it (and no server path).
            raise APIError(str(e).replace(f'"{ctx.client.model_name}"', f'"{model}"')) from None
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        outs = await run_until_disconnected(asyncio.gather(*(_final(s) for s in streams)), raw)
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(out.outputs.data, body.encoding_format)}
            for i, out in enumerate(outs)
        ]
        num_tokens = sum(len(out.prompt_token_ids) for out in outs)
        return {
            "id": rid,
            "object": "list",
            "created": now(),
            "model": model,
            "data": data,
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
        }


async def _prompts(body: EmbeddingRequest, ctx: ServerContext) -> list:
    """The inputs as texts or token-id lists (OpenAI: a string, strings, token ids, or lists of them)."""
    inputs = body.input
    if isinstance(inputs, str) or (inputs and all(isinstance(t, int) for t in inputs)):
        inputs = [inputs]
    if not inputs or any(len(item) == 0 for item in inputs):
        raise APIError("input must not be empty (nor contain an empty string or token list)", param="input")
    prompts = []
    for item in inputs:
        if isinstance(item, str):
            # Without special tokens the text is tokenized here; otherwise the engine does it (and truncates).
            prompts.append(item if body.add_special_tokens else await ctx.encode(item, add_special_tokens=False))
        else:
            prompts.append(ctx.check_token_ids(list(item), "input"))
    return prompts


async def _final(stream):
    """The last (for an embedding request, the only) output of a stream."""
    return [out async for out in stream][-1]


def _encode(vector, encoding_format: str):
    """The vector as JSON floats, or as base64 of little-endian float32 (what OpenAI's client decodes)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
