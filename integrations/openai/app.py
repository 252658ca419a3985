"""The OpenAI-compatible HTTP app over one engine client (AsyncLLM)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import kvloom
from kvloom import AsyncLLM, LoRARequest, RequestOutput, SamplingParams
from kvloom.chat_utils import ChatPrompt, render_chat
from kvloom.integrations.openai.metrics import ServerMetrics
from kvloom.integrations.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
    error_body,
    new_id,
    now,
    usage,
)
from kvloom.llm import with_chat_constraint
from kvloom.tool_parsers import NamedToolParser, ToolParserManager


class APIError(Exception):
    """An error reported to the client in OpenAI's shape."""

    def __init__(self, message: str, status: int = 400, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.err_type, self.param = status, err_type, param


def build_app(
    client: AsyncLLM,
    served_model_names: list[str] | None = None,
    api_key: str | None = None,
    allowed_origins: list[str] | None = None,
    lora_modules: list[LoRARequest] | None = None,
    allow_runtime_lora_updating: bool = False,
    tool_call_parser: str | None = None,
    enable_auto_tool_choice: bool = True,
) -> FastAPI:
    """A FastAPI app serving /v1/completions, /v1/chat/completions and the vLLM side endpoints.

    Every adapter in lora_modules is registered on the engine; a request's `model` may name any
    adapter registered there (by this app, another adapter, or the application), which selects it
    for that request. With allow_runtime_lora_updating, /v1/load_lora_adapter and
    /v1/unload_lora_adapter add and remove adapters while serving.

    Tool calls are read with `tool_call_parser` (vLLM's parser names; by default the one the model's
    chat template teaches, else hermes); enable_auto_tool_choice=False refuses tool_choice="auto".
    """
    if tool_call_parser is not None:
        ToolParserManager.get_tool_parser(tool_call_parser)  # an unknown name fails at start-up
    app = FastAPI(title="kvloom", version=kvloom.__version__)
    names = served_model_names or [client.model_name]
    metrics = ServerMetrics(client, names[0])
    tokenizer = client.get_tokenizer()
    created = now()
    for lora in lora_modules or []:
        client.add_lora(lora)

    if allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"])

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return JSONResponse(error_body("invalid or missing API key", 401, "AuthenticationError"), 401)
        return await call_next(request)

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
        return resolve_model(name)[0]

    def resolve_model(name: str | None) -> tuple[str, LoRARequest | None]:
        """The model name to report and the adapter it selects (None for the base model)."""
        if name is None or name in names:
            return names[0], None
        lora = client.get_lora_request(name)
        if lora is not None:
            return name, lora
        raise APIError(f"The model `{name}` does not exist.", 404, "NotFoundError", "model")

    def check_length(prompt_len: int, max_tokens: int | None) -> int:
        limit = client.max_model_len
        if prompt_len >= limit or (max_tokens is not None and prompt_len + max_tokens > limit):
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + (max_tokens or 0)} tokens ({prompt_len} in the messages, {max_tokens or 0} in "
                "the completion). Please reduce the length of the messages or completion.",
                400,
                "BadRequestError",
                "messages",
            )
        return max_tokens if max_tokens is not None else limit - prompt_len

    def make_params(body, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        unsupported = body.unsupported_fields()
        if unsupported:
            raise APIError(
                f"unsupported field(s): {', '.join(unsupported)}; kvloom does not implement them",
                param=unsupported[0],
            )
        if getattr(body, "suffix", None) is not None:
            raise APIError("suffix is not supported (no insertion models are served)", param="suffix")
        try:
            return body.sampling_params(max_tokens, logprobs)
        except ValueError as e:
            raise APIError(str(e)) from None

    def chat_prompt(body, messages: list[dict], add_generation_prompt: bool) -> ChatPrompt:
        try:
            return render_chat(
                client,
                messages,
                tools=body.tools,
                tool_choice=getattr(body, "tool_choice", None),
                parallel_tool_calls=getattr(body, "parallel_tool_calls", True),
                tool_call_parser=tool_call_parser,
                enable_auto_tool_choice=enable_auto_tool_choice,
                chat_template=body.chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=body.continue_final_message,
                chat_template_kwargs=body.chat_template_kwargs,
            )
        except ValueError as e:
            raise APIError(str(e), param="messages") from None

    # ---- side endpoints ----------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not client.is_running:
            return JSONResponse(error_body("engine is not running", 503, "ServiceUnavailable"), 503)
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": kvloom.__version__}

    @app.get("/v1/models")
    async def models():
        cards = [
            {
                "id": n,
                "object": "model",
                "created": created,
                "owned_by": "kvloom",
                "root": n,
                "parent": None,
                "max_model_len": client.max_model_len,
                "permission": [],
            }
            for n in names
        ]
        cards += [
            {
                "id": lora.lora_name,
                "object": "model",
                "created": created,
                "owned_by": "kvloom",
                "root": lora.lora_path,
                "parent": names[0],
                "max_model_len": client.max_model_len,
                "permission": [],
            }
            for lora in client.list_lora_requests()
        ]
        return {"object": "list", "data": cards}

    if allow_runtime_lora_updating:

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: LoadLoRAAdapterRequest):
            if client.get_lora_request(body.lora_name) is not None:
                raise APIError(f"The lora adapter '{body.lora_name}' has already been loaded.", param="lora_name")
            lora_id = max(client.list_loras(), default=0) + 1
            try:
                # Loading reads files; keep it off the event loop.
                await asyncio.to_thread(client.add_lora, LoRARequest(body.lora_name, lora_id, body.lora_path))
            except ValueError as e:
                raise APIError(str(e), param="lora_path") from None
            return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
            lora = client.get_lora_request(body.lora_name)
            if lora is None:
                raise APIError(
                    f"The lora adapter '{body.lora_name}' cannot be found.", 404, "NotFoundError", "lora_name"
                )
            client.remove_lora(lora.lora_int_id)
            return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")

    @app.get("/metrics")
    async def prometheus_metrics():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        if body.messages is not None:
            rendered = chat_prompt(
                body, [m.model_dump(exclude_none=True) for m in body.messages], body.add_generation_prompt
            )
            # kvloom's extension: what the tools imply for the output (remote adapters rebuild it).
            return {
                "count": len(rendered.prompt_token_ids),
                "max_model_len": client.max_model_len,
                "tokens": rendered.prompt_token_ids,
                **chat_prompt_extras(rendered),
            }
        if body.prompt is None:
            raise APIError("either prompt or messages is required", param="prompt")
        ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": client.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        if any(t < 0 or t >= len(tokenizer) for t in body.tokens):
            raise APIError("token ids out of the vocabulary", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    # ---- completions -------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        model, lora = resolve_model(body.model)
        prompts = _prompt_list(body.prompt)
        if not prompts:
            raise APIError("prompt must not be empty", param="prompt")
        encoded = [(p, tokenizer.encode(p)) if isinstance(p, str) else (tokenizer.decode(p), p) for p in prompts]
        if any(not ids for _, ids in encoded):
            raise APIError("prompt must not be empty", param="prompt")
        max_tokens = [check_length(len(ids), body.max_tokens) for _, ids in encoded]
        if body.logprobs is not None and not 0 <= body.logprobs <= 20:
            raise APIError("logprobs must be between 0 and 20", param="logprobs")
        params = [make_params(body, m, body.logprobs) for m in max_tokens]
        rid = new_id("cmpl")
        streams = [
            client.generate(ids, p, f"{rid}-{i}", lora_request=lora)
            for i, ((_, ids), p) in enumerate(zip(encoded, params))
        ]
        if body.stream:
            return _sse(_completion_chunks(body, model, rid, encoded, streams, metrics), raw)
        finals = await _run_until_disconnected(_collect(streams, metrics), raw)
        choices, completion_tokens = [], 0
        for i, out in enumerate(finals):
            text_prefix = encoded[i][0] if body.echo else ""
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                choice = {
                    "index": i * body.n + c.index,
                    "text": text_prefix + c.text,
                    "logprobs": _completion_logprobs(c, body.logprobs) if body.logprobs is not None else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                if body.return_token_ids:
                    choice.update(token_ids=list(c.token_ids), prompt_token_ids=encoded[i][1])
                choices.append(choice)
        choices.sort(key=lambda ch: ch["index"])
        prompt_tokens = sum(len(ids) for _, ids in encoded)
        return {
            "id": rid,
            "object": "text_completion",
            "created": now(),
            "model": model,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens, sum(o.num_cached_tokens or 0 for o in finals)),
        }

    # ---- chat --------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request):
        model, lora = resolve_model(body.model)
        rendered = chat_prompt(body, body.message_dicts(), body.add_generation_prompt)
        ids = rendered.prompt_token_ids
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = check_length(len(ids), requested)
        top = body.top_logprobs if body.logprobs else None
        if body.logprobs and top is not None and not 0 <= top <= 20:
            raise APIError("top_logprobs must be between 0 and 20", param="top_logprobs")
        params = make_params(body, max_tokens, (top or 0) if body.logprobs else None)
        try:
            params = with_chat_constraint(params, rendered)
        except ValueError as e:
            raise APIError(str(e), param="tool_choice") from None
        rid = new_id("chatcmpl")
        stream = client.generate(ids, params, rid, lora_request=lora)
        named = isinstance(body.tool_choice, dict)
        if body.stream:
            return _sse(_chat_chunks(body, model, rid, len(ids), stream, metrics, rendered.tool_parser, named), raw)
        (final,) = await _run_until_disconnected(_collect([stream], metrics), raw)
        choices = []
        for c in final.outputs:
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            finish_reason = c.finish_reason
            if rendered.tool_parser is not None:
                extracted = rendered.tool_parser.extract_tool_calls(c.text)
                message["content"] = extracted.content
                message["tool_calls"] = [_tool_call(call) for call in extracted.tool_calls]
                if extracted.tool_calls and finish_reason == "stop" and not named:
                    finish_reason = "tool_calls"
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": _chat_logprobs(c, top or 0) if body.logprobs else None,
                    "finish_reason": finish_reason,
                    "stop_reason": c.stop_reason,
                }
            )
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": now(),
            "model": model,
            "choices": choices,
            "usage": usage(len(ids), completion_tokens, final.num_cached_tokens),
        }

    return app


def _prompt_list(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)


async def _collect(streams: list[AsyncIterator[RequestOutput]], metrics: ServerMetrics) -> list[RequestOutput]:
    async def last(stream):
        final = None
        async for out in stream:
            final = out
        metrics.observe_finished(final)
        return final

    return list(await asyncio.gather(*(last(s) for s in streams)))


async def _run_until_disconnected(coro, raw: Request):
    """Await coro, but give up (cancelling it, which aborts its requests) if the client goes away."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while not await raw.is_disconnected():
            await asyncio.sleep(0.5)

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise APIError("client disconnected", 499, "ClientClosedRequest")
    return task.result()


def _sse(chunks: AsyncIterator[dict], raw: Request) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except ValueError as e:  # raised when a request is added: report it in-stream
            yield f"data: {json.dumps(error_body(str(e), 400))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as their outputs arrive."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, stream):
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as e:  # surfaced to the consumer below
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            await s.aclose()


async def _completion_chunks(body: CompletionRequest, model: str, rid: str, encoded, streams, metrics):
    created = now()
    tokens = 0
    started: set[int] = set()
    per_choice: dict[int, int] = {}
    async for i, out in _merge(streams):
        for c in out.outputs:
            index = i * body.n + c.index
            per_choice[index] = per_choice.get(index, 0) + len(c.token_ids)
            text = c.text
            first = index not in started
            if body.echo and first:
                text = encoded[i][0] + text
            started.add(index)
            tokens += len(c.token_ids)
            logprobs = _completion_logprobs(c, body.logprobs) if body.logprobs is not None else None
            choice = {
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            if body.return_token_ids:
                choice["token_ids"] = list(c.token_ids)
                if first:
                    choice["prompt_token_ids"] = encoded[i][1]
            yield {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
        if out.finished:
            mine = [v for k, v in per_choice.items() if k // body.n == i]
            metrics.observe_finished(out, max(mine, default=0))
    if body.stream_options and body.stream_options.include_usage:
        yield {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage(sum(len(ids) for _, ids in encoded), tokens),
        }


async def _chat_chunks(
    body: ChatCompletionRequest, model: str, rid: str, prompt_len: int, stream, metrics, tool_parser, named: bool
):
    created = now()
    tokens = 0
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    for i in range(body.n):
        yield {
            **base,
            "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ],
        }
    per_choice: dict[int, int] = {}
    tool_streams: dict[int, Any] = {}
    has_calls: set[int] = set()
    async for _, out in _merge([stream]):
        for c in out.outputs:
            tokens += len(c.token_ids)
            per_choice[c.index] = per_choice.get(c.index, 0) + len(c.token_ids)
            delta: dict[str, Any] = {"content": c.text} if c.text else {}
            finish_reason = c.finish_reason
            if tool_parser is not None:
                parser_stream = tool_streams.setdefault(c.index, tool_parser.stream())
                content, calls = parser_stream.feed(c.text)
                if finish_reason is not None:
                    more_content, more_calls = parser_stream.finish()
                    content, calls = content + more_content, calls + more_calls
                delta = {"content": content} if content else {}
                if calls:
                    delta["tool_calls"] = [_tool_call_delta(d) for d in calls]
                    has_calls.add(c.index)
                if finish_reason == "stop" and c.index in has_calls and not named:
                    finish_reason = "tool_calls"
            choice: dict[str, Any] = {
                "index": c.index,
                "delta": delta,
                "logprobs": _chat_logprobs(c, body.top_logprobs or 0) if body.logprobs else None,
                "finish_reason": finish_reason,
            }
            if c.finish_reason is not None:
                choice["stop_reason"] = c.stop_reason
            yield {**base, "choices": [choice]}
        if out.finished:
            metrics.observe_finished(out, max(per_choice.values(), default=0))
    if body.stream_options and body.stream_options.include_usage:
        yield {**base, "choices": [], "usage": usage(prompt_len, tokens)}


def chat_prompt_extras(rendered: ChatPrompt) -> dict:
    """The constraint and tool parser a rendered chat implies, as JSON (kvloom's /tokenize extension)."""
    constraint = rendered.structured_outputs
    parser = rendered.tool_parser
    parser_spec = None
    if parser is not None:
        parser_spec = {"name": parser.name}
        if isinstance(parser, NamedToolParser):
            parser_spec["function"] = parser.function_name
    return {
        "structured_outputs": None if constraint is None else constraint.to_dict(),
        "tool_parser": parser_spec,
        "skip_special_tokens": rendered.skip_special_tokens,
    }


def _tool_call(call) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _tool_call_delta(delta) -> dict:
    """A streamed tool-call piece: id, type and name on a call's first piece, then argument fragments."""
    out: dict[str, Any] = {"index": delta.index, "function": {"arguments": delta.arguments}}
    if delta.id is not None:
        out["id"], out["type"] = delta.id, "function"
        out["function"]["name"] = delta.name
    return out


def _top(lp: dict, k: int) -> list:
    return sorted(lp.values(), key=lambda v: -v.logprob)[:k]


def _finite(logprob: float) -> float:
    # Tokens a grammar forbids have -inf, which JSON cannot carry; vLLM reports them as -9999.0.
    return max(logprob, -9999.0)


def _completion_logprobs(c, k: int) -> dict:
    """The legacy completions logprobs object for one choice's (new) tokens."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = 0
    for tok, lp in zip(c.token_ids, c.logprobs or []):
        text = lp[tok].decoded_token or ""
        tokens.append(text)
        token_logprobs.append(_finite(lp[tok].logprob))
        top.append({v.decoded_token: _finite(v.logprob) for v in _top(lp, k)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(c, k: int) -> dict:
    """The chat logprobs object: per token its log-probability and the k most likely alternatives."""
    content = []
    for tok, lp in zip(c.token_ids, c.logprobs or []):
        text = lp[tok].decoded_token or ""
        alts = [
            {"token": v.decoded_token, "logprob": _finite(v.logprob), "bytes": list((v.decoded_token or "").encode())}
            for v in _top(lp, k)
        ]
        content.append(
            {"token": text, "logprob": _finite(lp[tok].logprob), "bytes": list(text.encode()), "top_logprobs": alts}
        )
    return {"content": content}
