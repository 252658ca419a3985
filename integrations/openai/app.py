"""The OpenAI-compatible HTTP app over one engine client (AsyncLLM): setup, errors and the side endpoints.

The generation routes live in serving_completion.py and serving_chat.py; what they share (model and
length checks, off-loop tokenization, queueing) in context.py; SSE and stream helpers in streams.py.
"""

from __future__ import annotations

import asyncio
import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import kvloom
from kvloom import AsyncLLM, LoRARequest
from kvloom.integrations.openai import serving_chat, serving_completion, serving_embedding, serving_responses
from kvloom.integrations.openai.context import APIError, ServerContext
from kvloom.integrations.openai.metrics import ServerMetrics
from kvloom.integrations.openai.middleware import PUBLIC_PATHS, GuardMiddleware
from kvloom.integrations.openai.protocol import (
    DetokenizeRequest,
    ErrorResponse,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
    error_body,
    now,
)
from kvloom.integrations.openai.serving_chat import chat_prompt_extras
from kvloom.tool_parsers import ToolParserManager

logger = logging.getLogger("kvloom.integrations.openai")

DEFAULT_MAX_BODY_BYTES = 8 * 2**20


def error_responses(streams: bool = False) -> dict:
    """The OpenAPI description of the error responses a route really returns (and SSE when it streams)."""
    out: dict = {
        code: {"model": ErrorResponse, "description": what}
        for code, what in (
            (400, "Bad request: invalid field values, unsupported fields, a prompt that is too long"),
            (401, "Missing or wrong API key"),
            (404, "Unknown model or adapter"),
            (413, "Request body larger than the server's limit"),
            (500, "The engine failed on this request"),
        )
    }
    if streams:
        out[200] = {
            "description": "The response; with stream=true, server-sent events (data: {chunk} ... data: [DONE])",
            "content": {"application/json": {}, "text/event-stream": {}},
        }
    return out


def build_app(
    client: AsyncLLM,
    served_model_names: list[str] | None = None,
    api_key: str | list[str] | None = None,
    allowed_origins: list[str] | None = None,
    lora_modules: list[LoRARequest] | None = None,
    allow_runtime_lora_updating: bool = False,
    tool_call_parser: str | None = None,
    enable_auto_tool_choice: bool = True,
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    lora_root: str | None = None,
    public_metrics: bool = False,
    max_stored_responses: int = serving_responses.DEFAULT_MAX_STORED_RESPONSES,
) -> FastAPI:
    """A FastAPI app serving /v1/completions, /v1/chat/completions and the vLLM side endpoints.

    Every adapter in lora_modules is registered on the engine; a request's `model` may name any
    adapter registered there (by this app, another adapter, or the application), which selects it
    for that request. With allow_runtime_lora_updating, /v1/load_lora_adapter and
    /v1/unload_lora_adapter add and remove adapters while serving (only from under lora_root, when
    given). With an api_key every path but /health and /version (and /metrics if public_metrics)
    needs it. Bodies above max_request_body_bytes get a 413.

    Tool calls are read with `tool_call_parser` (vLLM's parser names; by default the one the model's
    chat template teaches, else hermes); enable_auto_tool_choice=False refuses tool_choice="auto".
    /v1/responses keeps the last max_stored_responses stored responses in memory (LRU) for
    previous_response_id and GET /v1/responses/{id}.
    """
    if tool_call_parser is not None:
        ToolParserManager.get_tool_parser(tool_call_parser)  # an unknown name fails at start-up
    app = FastAPI(title="kvloom", version=kvloom.__version__)
    names = served_model_names or [client.model_name]
    ctx = ServerContext(client, names, ServerMetrics(client, names[0]), tool_call_parser, enable_auto_tool_choice)
    tokenizer = ctx.tokenizer
    created = now()
    for lora in lora_modules or []:
        client.add_lora(lora)

    public = PUBLIC_PATHS | ({"/metrics"} if public_metrics else set())
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_request_body_bytes, public_paths=public)
    if allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError):
        return JSONResponse(error_body(str(exc), exc.status, exc.err_type, exc.param), exc.status)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{loc}: {first.get('msg', 'invalid request')}" if loc else first.get("msg", "invalid request")
        return JSONResponse(error_body(message, 400, "BadRequestError", loc or None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException):
        return JSONResponse(
            error_body(str(exc.detail), exc.status_code, "NotFoundError" if exc.status_code == 404 else "HTTPError"),
            exc.status_code,
        )

    @app.exception_handler(ValueError)
    async def on_value_error(_: Request, exc: ValueError):
        # Raised when the engine refuses a request (e.g. an adapter that cannot be loaded).
        return JSONResponse(error_body(str(exc), 400, "BadRequestError"), 400)

    def check_model(name: str | None) -> str:
        return ctx.resolve_model(name)[0]

    # ---- side endpoints ----------------------------------------------------------------------
    side = error_responses()

    @app.get("/health")
    async def health():
        if not client.is_running:
            return JSONResponse(error_body("engine is not running", 503, "ServiceUnavailable"), 503)
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": kvloom.__version__}

    def card(name: str, parent: str | None) -> dict:
        # `root` names the model or adapter, never a server path.
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "kvloom",
            "root": name,
            "parent": parent,
            "max_model_len": client.max_model_len,
            "permission": [],
        }

    @app.get("/v1/models", responses=side)
    async def models():
        cards = [card(n, None) for n in names] + [
            card(lora.lora_name, names[0]) for lora in client.list_lora_requests()
        ]
        return {"object": "list", "data": cards}

    if allow_runtime_lora_updating:
        loading = asyncio.Lock()  # one load at a time: the id it takes and the name it claims stay unique

        @app.post("/v1/load_lora_adapter", responses=side)
        async def load_lora_adapter(body: LoadLoRAAdapterRequest):
            path = allowed_lora_path(body.lora_path, lora_root)
            async with loading:
                if client.get_lora_request(body.lora_name) is not None:
                    raise APIError(f"The lora adapter '{body.lora_name}' has already been loaded.", param="lora_name")
                lora_id = max(client.list_loras(), default=0) + 1
                try:
                    # Loading reads files; keep it off the event loop.
                    await asyncio.to_thread(client.add_lora, LoRARequest(body.lora_name, lora_id, path))
                except ValueError as e:
                    # The reason, without the server's paths.
                    reason = str(e).replace(path, "<lora_path>").replace(body.lora_path, "<lora_path>")
                    raise APIError(f"cannot load the LoRA adapter: {reason}", param="lora_path") from None
            return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

        @app.post("/v1/unload_lora_adapter", responses=side)
        async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
            lora = client.get_lora_request(body.lora_name)
            if lora is None:
                raise APIError(
                    f"The lora adapter '{body.lora_name}' cannot be found.", 404, "NotFoundError", "lora_name"
                )
            client.remove_lora(lora.lora_int_id)
            return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")

    @app.get("/metrics", responses=side)
    async def prometheus_metrics():
        body, content_type = ctx.metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/tokenize", responses=side)
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        if body.messages is not None:
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            rendered = await ctx.render(body, messages, body.add_generation_prompt)
            # kvloom's extension: what the tools imply for the output (remote adapters rebuild it).
            return {
                "count": len(rendered.prompt_token_ids),
                "max_model_len": client.max_model_len,
                "tokens": rendered.prompt_token_ids,
                **chat_prompt_extras(rendered),
            }
        if body.prompt is None:
            raise APIError("either prompt or messages is required", param="prompt")
        ids = await ctx.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": client.max_model_len, "tokens": ids}

    @app.post("/detokenize", responses=side)
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        return {"prompt": tokenizer.decode(ctx.check_token_ids(body.tokens, "tokens"))}

    responses = error_responses(streams=True)
    serving_embedding.register(app, ctx, responses)  # first: an embedding model's server refuses generation routes
    serving_completion.register(app, ctx, responses)
    serving_chat.register(app, ctx, responses)
    serving_responses.register(app, ctx, responses, max_stored_responses)
    return app


def allowed_lora_path(path: str, root: str | None) -> str:
    """The adapter path to load; with a root, only paths that resolve under it (no `..` or link escapes)."""
    if root is None:
        return path
    resolved = os.path.realpath(os.path.join(root, path))
    real_root = os.path.realpath(root)
    if os.path.commonpath([resolved, real_root]) != real_root:
        raise APIError("lora_path is not under the server's LoRA root (--lora-root)", 400, param="lora_path")
    return resolved
