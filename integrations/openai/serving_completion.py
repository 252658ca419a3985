"""POST /v1/completions: prompts as text or token ids, JSON or SSE."""

from __future__ import annotations

from fastapi import FastAPI, Request

from kvloom.integrations.openai.context import APIError, ServerContext
from kvloom.integrations.openai.protocol import CompletionRequest, new_id, now, usage
from kvloom.integrations.openai.streams import collect, completion_logprobs, merge, run_until_disconnected, sse


def register(app: FastAPI, ctx: ServerContext, responses: dict) -> None:
    @app.post("/v1/completions", responses=responses)
    async def completions(body: CompletionRequest, raw: Request):
        model, lora = ctx.resolve_model(body.model)
        prompts = _prompt_list(body.prompt)
        if not prompts:
            raise APIError("prompt must not be empty", param="prompt")
        encoded = []
        for p in prompts:
            if isinstance(p, str):
                encoded.append((p, await ctx.encode(p)))
            else:  # token ids: checked before they are decoded (for echo)
                encoded.append((ctx.tokenizer.decode(ctx.check_token_ids(p, "prompt")), p))
        if any(not ids for _, ids in encoded):
            raise APIError("prompt must not be empty", param="prompt")
        max_tokens = [ctx.check_length(len(ids), body.max_tokens) for _, ids in encoded]
        if body.logprobs is not None and not 0 <= body.logprobs <= 20:
            raise APIError("logprobs must be between 0 and 20", param="logprobs")
        params = [ctx.make_params(body, m, body.logprobs) for m in max_tokens]
        rid = new_id("cmpl")
        streams = []
        try:
            for i, ((_, ids), p) in enumerate(zip(encoded, params)):
                streams.append(await ctx.open(ids, p, f"{rid}-{i}", lora))
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        if body.stream:
            return sse(_completion_chunks(body, model, rid, encoded, streams, ctx), raw)
        finals = await run_until_disconnected(collect(streams, ctx.metrics), raw)
        choices, completion_tokens = [], 0
        for i, out in enumerate(finals):
            text_prefix = encoded[i][0] if body.echo else ""
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                choice = {
                    "index": i * body.n + c.index,
                    "text": text_prefix + c.text,
                    "logprobs": completion_logprobs(c, body.logprobs) if body.logprobs is not None else None,
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


def _prompt_list(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)


async def _completion_chunks(body: CompletionRequest, model: str, rid: str, encoded, streams, ctx):
    created = now()
    tokens = 0
    started: set[int] = set()
    per_choice: dict[int, int] = {}
    async for i, out in merge(streams):
        for c in out.outputs:
            index = i * body.n + c.index
            per_choice[index] = per_choice.get(index, 0) + len(c.token_ids)
            text = c.text
            first = index not in started
            if body.echo and first:
                text = encoded[i][0] + text
            started.add(index)
            tokens += len(c.token_ids)
            logprobs = completion_logprobs(c, body.logprobs) if body.logprobs is not None else None
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
            ctx.metrics.observe_finished(out, max(mine, default=0))
    if body.stream_options and body.stream_options.include_usage:
        yield {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage(sum(len(ids) for _, ids in encoded), tokens),
        }
