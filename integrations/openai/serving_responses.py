"""POST /v1/responses (OpenAI's Responses API) over the chat path, and the store behind previous_response_id.

A request renders like a chat completion (the same template, tools, tool parser and output
constraints); its output becomes `message` and `function_call` items, returned whole or as the
Responses stream events. Stored responses (store=true, the default) live in a bounded LRU in memory.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

from fastapi import FastAPI, Request

from kvloom.chat_utils import ChatPrompt
from kvloom.integrations.openai.context import APIError, ServerContext
from kvloom.integrations.openai.protocol import now
from kvloom.integrations.openai.protocol_responses import (
    ResponsesRequest,
    chat_messages,
    input_items,
    new_item_id,
    response_object,
    response_usage,
)
from kvloom.integrations.openai.streams import chat_logprobs, merge, run_until_disconnected, sse

DEFAULT_MAX_STORED_RESPONSES = 1000


@dataclass
class StoredResponse:
    response: dict
    # The input items that led to it, those of the responses before it included.
    history: list[dict]


class ResponseStore:
    """The last `capacity` stored responses, in memory; the least recently used one goes first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"max_stored_responses must be >= 0, got {capacity}")
        self.capacity = capacity
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self._responses[response_id] = stored
        self._responses.move_to_end(response_id)
        while len(self._responses) > self.capacity:
            self._responses.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._responses.get(response_id)
        if stored is not None:
            self._responses.move_to_end(response_id)
        return stored

    def pop(self, response_id: str) -> StoredResponse | None:
        return self._responses.pop(response_id, None)

    def __len__(self) -> int:
        return len(self._responses)


def register(
    app: FastAPI, ctx: ServerContext, responses: dict, max_stored_responses: int = DEFAULT_MAX_STORED_RESPONSES
) -> None:
    store = ResponseStore(max_stored_responses)

    def stored_or_404(response_id: str) -> StoredResponse:
        stored = store.get(response_id)
        if stored is None:
            raise APIError(f"Response with id '{response_id}' not found.", 404, "NotFoundError", "response_id")
        return stored

    @app.post("/v1/responses", responses=responses)
    async def create_response(body: ResponsesRequest, raw: Request):
        model, lora = ctx.resolve_model(body.model)
        body.check()
        history: list[dict] = []
        if body.previous_response_id is not None:
            previous = store.get(body.previous_response_id)
            if previous is None:
                raise APIError(
                    f"Previous response with id '{body.previous_response_id}' not found.",
                    param="previous_response_id",
                )
            # Instructions are not carried over (as in OpenAI's API): only items are.
            history = previous.history + previous.response["output"]
        items = history + input_items(body)
        messages = chat_messages(items, first_new=len(history))
        if body.instructions:
            messages.insert(0, {"role": "system", "content": body.instructions})
        if not messages:
            raise APIError("input must not be empty", param="input")
        rendered = await ctx.render(body.chat_view(), messages, add_generation_prompt=True)
        ids = rendered.prompt_token_ids
        max_tokens = ctx.check_length(len(ids), body.max_output_tokens)
        params = ctx.make_params(body, max_tokens, body.logprobs)
        params = ctx.constrain_to_chat(params, rendered)
        rid = new_item_id("resp")
        stream = await ctx.open(ids, params, rid, lora)
        response = response_object(body, rid, model, now())
        events = _events(ctx, body, response, stream, rendered, len(ids), items, store)
        if body.stream:
            return sse(events, raw, named=True)
        return await run_until_disconnected(_last_response(events), raw)

    @app.get("/v1/responses/{response_id}", responses=responses)
    async def retrieve_response(response_id: str, raw: Request):
        if raw.query_params:
            name = next(iter(raw.query_params))
            raise APIError(f"query parameter {name} is not supported on GET /v1/responses/{{id}}", param=name)
        return stored_or_404(response_id).response

    @app.delete("/v1/responses/{response_id}", responses=responses)
    async def delete_response(response_id: str):
        stored_or_404(response_id)
        store.pop(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    @app.post("/v1/responses/{response_id}/cancel", responses=responses)
    async def cancel_response(response_id: str):
        stored_or_404(response_id)
        raise APIError("Only background responses can be cancelled; kvloom does not run background responses.")


async def _last_response(events) -> dict:
    """Run a request's events to the end; the finished response (for a reply that does not stream)."""
    final = None
    async for event in events:
        final = event
    return final["response"]


async def _events(
    ctx: ServerContext,
    body: ResponsesRequest,
    response: dict,
    stream,
    rendered: ChatPrompt,
    prompt_len: int,
    items: list[dict],
    store: ResponseStore,
):
    """The Responses stream events of one request; the last one carries the finished response."""
    builder = OutputBuilder()
    yield builder.event("response.created", response=copy.deepcopy(response))
    yield builder.event("response.in_progress", response=copy.deepcopy(response))
    parser = rendered.tool_parser.stream() if rendered.tool_parser is not None else None
    tokens, final = 0, None
    async for _, out in merge([stream]):
        c = out.outputs[0]
        tokens += len(c.token_ids)
        content, calls = (c.text, []) if parser is None else parser.feed(c.text)
        if parser is not None and c.finish_reason is not None:
            more_content, more_calls = parser.finish()
            content, calls = content + more_content, calls + more_calls
        logprobs = chat_logprobs(c, body.logprobs)["content"] if body.logprobs is not None else []
        for event in builder.add(content, calls, logprobs):
            yield event
        if out.finished:
            ctx.metrics.observe_finished(out, tokens)
            final = out
    finish_reason = final.outputs[0].finish_reason
    status = "completed" if finish_reason == "stop" else "incomplete"
    for event in builder.finish(status):
        yield event
    response.update(
        status=status,
        output=builder.items,
        usage=response_usage(prompt_len, tokens, final.num_cached_tokens),
        incomplete_details={"reason": "max_output_tokens"} if finish_reason == "length" else None,
        completed_at=now() if status == "completed" else None,
    )
    if body.store:
        store.put(response["id"], StoredResponse(response, items))
    yield builder.event(f"response.{status}", response=response)


class OutputBuilder:
    """A response's output items, built from text and tool-call deltas, and the stream events telling it.

    One item is open at a time: text opens (or continues) a message, a call's first delta opens a
    function_call; opening one closes the other. Whitespace alone does not open a message (the
    newlines around tool calls would otherwise become empty messages).
    """

    def __init__(self) -> None:
        self.items: list[dict] = []
        self.sequence_number = 0
        self._open: int | None = None  # output index of the item being written
        self._pending_text, self._pending_logprobs = "", []

    def event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return event

    def add(self, text: str, calls: list, logprobs: list) -> list[dict]:
        if not text and not calls:
            # Tokens whose text the detokenizer holds back: their logprobs go with the text to come.
            self._pending_logprobs += logprobs
        events = self._text(text, logprobs) if text else []
        for delta in calls:
            events += self._call(delta)
        return events

    def finish(self, status: str) -> list[dict]:
        """Close the open item (incomplete if the response is); whitespace alone is kept without calls."""
        events = []
        if self._pending_text and not any(item["type"] == "function_call" for item in self.items):
            events += self._open_message()
        return events + self._close("incomplete" if status == "incomplete" else "completed")

    def _text(self, text: str, logprobs: list) -> list[dict]:
        message = self._open is not None and self.items[self._open]["type"] == "message"
        events = [] if message else self._close()
        self._pending_text += text
        self._pending_logprobs += logprobs
        if not message and not self._pending_text.strip():
            return events
        return events + self._open_message()

    def _open_message(self) -> list[dict]:
        """Write the pending text into the open message, opening one first if needed."""
        events = []
        if self._open is None:
            item = {"id": new_item_id("msg"), "type": "message", "role": "assistant", "status": "in_progress"}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            self._open = len(self.items)
            events.append(
                self.event("response.output_item.added", output_index=self._open, item={**item, "content": []})
            )
            self.items.append({**item, "content": [part]})
            events.append(self._part_event("response.content_part.added", part=copy.deepcopy(part)))
        item = self.items[self._open]
        text, logprobs = self._pending_text, self._pending_logprobs
        self._pending_text, self._pending_logprobs = "", []
        part = item["content"][0]
        part["text"] += text
        part["logprobs"] += logprobs
        events.append(self._part_event("response.output_text.delta", delta=text, logprobs=logprobs))
        return events

    def _part_event(self, kind: str, **fields) -> dict:
        """An event about the open message's text part."""
        item_id = self.items[self._open]["id"]
        return self.event(kind, item_id=item_id, output_index=self._open, content_index=0, **fields)

    def _call(self, delta) -> list[dict]:
        events = []
        if delta.id is not None:  # a new call: its id and name come with its first delta
            events += self._close()
            self._pending_text, self._pending_logprobs = "", []
            item = {
                "id": new_item_id("fc"),
                "type": "function_call",
                "status": "in_progress",
                "call_id": delta.id,
                "name": delta.name,
                "arguments": "",
            }
            self._open = len(self.items)
            self.items.append(item)
            events.append(self.event("response.output_item.added", output_index=self._open, item=dict(item)))
        assert self._open is not None and self.items[self._open]["type"] == "function_call"
        item = self.items[self._open]
        if delta.arguments:
            item["arguments"] += delta.arguments
            events.append(
                self.event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self._open,
                    delta=delta.arguments,
                )
            )
        return events

    def _close(self, status: str = "completed") -> list[dict]:
        if self._open is None:
            return []
        index, item = self._open, self.items[self._open]
        item["status"] = status
        if item["type"] == "message":
            part = item["content"][0]
            events = [
                self._part_event("response.output_text.done", text=part["text"], logprobs=part["logprobs"]),
                self._part_event("response.content_part.done", part=copy.deepcopy(part)),
            ]
        else:
            events = [
                self.event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            ]
        self._open = None
        return events + [self.event("response.output_item.done", output_index=index, item=copy.deepcopy(item))]
