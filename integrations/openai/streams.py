"""Request streams as HTTP: collecting final outputs, SSE framing, merging streams, logprob objects."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from kvloom import RequestOutput
from kvloom.integrations.openai.context import APIError
from kvloom.integrations.openai.metrics import ServerMetrics
from kvloom.integrations.openai.protocol import error_body

logger = logging.getLogger("kvloom.integrations.openai")


async def collect(streams: list[AsyncIterator[RequestOutput]], metrics: ServerMetrics) -> list[RequestOutput]:
    """The final output of each stream (they run concurrently)."""

    async def last(stream):
        final = None
        async for out in stream:
            final = out
        metrics.observe_finished(final)
        return final

    return list(await asyncio.gather(*(last(s) for s in streams)))


async def run_until_disconnected(coro, raw: Request):
    """Await coro, but give up (cancelling it, which aborts its requests) if the client goes away."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while not await raw.is_disconnected():
            await asyncio.sleep(0.25)

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        logger.info("client of %s %s disconnected; its requests were aborted", raw.method, raw.url.path)
        raise APIError("client disconnected", 499, "ClientClosedRequest")
    return task.result()


def sse(chunks: AsyncIterator[dict], raw: Request, named: bool = False) -> StreamingResponse:
    """Server-sent events: one `data:` line per chunk, an error event if the request fails, then [DONE].

    named: the Responses API's framing, where an `event:` line gives each chunk's `type`, and no [DONE].
    """

    def frame(name: str, data: dict) -> str:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n" if named else f"data: {json.dumps(data)}\n\n"

    async def body():
        try:
            async for chunk in chunks:
                yield frame(chunk.get("type", ""), chunk)
        except asyncio.CancelledError:
            logger.info("client of %s %s disconnected; its requests were aborted", raw.method, raw.url.path)
            raise
        except Exception as e:  # the request failed in the engine after the response started
            status = 400 if isinstance(e, ValueError) else 500
            logger.warning("a streamed request failed: %s: %s", type(e).__name__, e)
            yield frame("error", error_body(str(e), status, type(e).__name__))
        if not named:
            yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as their outputs arrive (index of the stream, output).

    Each stream is read by its own task; when the consumer stops (finished, failed or disconnected)
    the tasks are cancelled and awaited, which aborts the requests still running.
    """
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
        await asyncio.gather(*tasks, return_exceptions=True)


def _top(lp: dict, k: int) -> list:
    return sorted(lp.values(), key=lambda v: -v.logprob)[:k]


def _finite(logprob: float) -> float:
    # Tokens a grammar forbids have -inf, which JSON cannot carry; vLLM reports them as -9999.0.
    return max(logprob, -9999.0)


def completion_logprobs(c, k: int) -> dict:
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


def chat_logprobs(c, k: int) -> dict:
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
