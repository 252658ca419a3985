"""POST /v1/chat/completions: the chat template, tools and tool calls, JSON or SSE."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from kvloom.chat_utils import ChatPrompt, FirstCallOnly
from kvloom.integrations.openai.context import APIError, ServerContext
from kvloom.integrations.openai.protocol import ChatCompletionRequest, new_id, now, usage
from kvloom.integrations.openai.streams import chat_logprobs, collect, merge, run_until_disconnected, sse
from kvloom.tool_parsers import NamedToolParser


def register(app: FastAPI, ctx: ServerContext, responses: dict) -> None:
    @app.post("/v1/chat/completions", responses=responses)
    async def chat(body: ChatCompletionRequest, raw: Request):
        model, lora = ctx.resolve_model(body.model)
        rendered = await ctx.render(body, body.message_dicts(), body.add_generation_prompt)
        ids = rendered.prompt_token_ids
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = ctx.check_length(len(ids), requested)
        top = body.top_logprobs if body.logprobs else None
        if body.logprobs and top is not None and not 0 <= top <= 20:
            raise APIError("top_logprobs must be between 0 and 20", param="top_logprobs")
        params = ctx.make_params(body, max_tokens, (top or 0) if body.logprobs else None)
        if body.use_beam_search and body.tools:
            raise APIError(
                "use_beam_search cannot be combined with tools (beam search ignores tool_choice)", param="tools"
            )
        params = ctx.constrain_to_chat(params, rendered)
        rid = new_id("chatcmpl")
        stream = await ctx.open(ids, params, rid, lora)
        named = isinstance(body.tool_choice, dict)
        if body.stream:
            chunks = _chat_chunks(body, model, rid, len(ids), stream, ctx, rendered.tool_parser, named)
            return sse(chunks, raw)
        (final,) = await run_until_disconnected(collect([stream], ctx.metrics), raw)
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
                    "logprobs": chat_logprobs(c, top or 0) if body.logprobs else None,
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


async def _chat_chunks(
    body: ChatCompletionRequest, model: str, rid: str, prompt_len: int, stream, ctx, tool_parser, named: bool
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
    async for _, out in merge([stream]):
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
                "logprobs": chat_logprobs(c, body.top_logprobs or 0) if body.logprobs else None,
                "finish_reason": finish_reason,
            }
            if c.finish_reason is not None:
                choice["stop_reason"] = c.stop_reason
            yield {**base, "choices": [choice]}
        if out.finished:
            ctx.metrics.observe_finished(out, max(per_choice.values(), default=0))
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
        if isinstance(parser, FirstCallOnly):
            parser_spec["first_call_only"] = True
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
