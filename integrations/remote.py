"""The engine client the adapters use, over HTTP to a running `kvloom serve` (their `base_url` mode).

It offers what the LangChain and LlamaIndex adapters call on an in-process AsyncLLM: chat rendering
(on the server, tools included), requests that stream RequestOutputs (from /v1/completions with the
prompt's token ids and every SamplingParams field), aborts and timeouts. So a wrapper pointed at a
server behaves as one on the shared in-process engine. Transient failures (connection errors, 429,
5xx) before any output arrived are retried up to max_retries times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from kvloom import LoRARequest, RequestOutput, RequestOutputKind, SamplingParams
from kvloom.async_llm import blocking_outputs
from kvloom.chat_utils import ChatPrompt, FirstCallOnly
from kvloom.engine.outputs import CompletionOutput, Logprob
from kvloom.engine.structured_output import StructuredOutputsParams
from kvloom.tool_parsers import NamedToolParser, RequiredToolParser, ToolParserManager

_RETRY_STATUS = {429, 500, 502, 503, 504}
# SamplingParams fields /v1/completions takes under the same name.
_FIELDS = (
    "n",
    "best_of",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "logprobs",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "logit_bias",
    "use_beam_search",
    "length_penalty",
    "early_stopping",
)


class RemoteError(RuntimeError):
    """The server answered with an error that is not the request's fault (after any retries)."""


class RemoteEngineClient:
    """An engine client for a `kvloom serve` at base_url (e.g. http://127.0.0.1:8000/v1)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float | None = None,
        max_retries: int = 2,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.root = self.base_url.removesuffix("/v1")
        self.max_retries = max_retries
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout, connect=min(timeout or 10.0, 10.0))
        self._ids = itertools.count()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        cards = self._call("GET", f"{self.base_url}/models").json()["data"]
        card = next((c for c in cards if c["id"] == model), None) if model else cards[0]
        if card is None:
            raise ValueError(f"the server at {base_url} does not serve {model!r}; it serves {[c['id'] for c in cards]}")
        self.model_name = card["id"]
        self.max_model_len = card.get("max_model_len")

    # ---- plain calls with retries ------------------------------------------------------------
    def _call(self, method: str, url: str, body: dict | None = None) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            try:
                r = httpx.request(method, url, json=body, headers=self._headers, timeout=self._timeout)
            except httpx.TransportError as e:
                if attempt == self.max_retries:
                    raise RemoteError(f"cannot reach the kvloom server at {self.base_url}: {e}") from e
            else:
                if r.status_code not in _RETRY_STATUS or attempt == self.max_retries:
                    _raise_for(r)
                    return r
            time.sleep(min(0.25 * 2**attempt, 4.0))
        raise AssertionError("unreachable")

    # ---- what the adapters call --------------------------------------------------------------
    def render_chat(self, messages: list[dict], **options: Any) -> ChatPrompt:
        """The server renders the conversation (and tools); the constraint and parser come back with it."""
        body = {"model": self.model_name, "messages": messages, **{k: v for k, v in options.items() if v is not None}}
        data = self._call("POST", f"{self.root}/tokenize", body).json()
        constraint = data.get("structured_outputs")
        return ChatPrompt(
            data["tokens"],
            StructuredOutputsParams.from_dict(constraint) if constraint else None,
            _parser(data.get("tool_parser"), options.get("tools") or []),
            data.get("skip_special_tokens"),
        )

    def apply_chat_template(self, messages: list[dict], **options: Any) -> list[int]:
        return self.render_chat(messages, **options).prompt_token_ids

    @property
    def has_chat_template(self) -> bool:
        return True  # the server says otherwise, with a clear error, when its model has none

    def submit(self, prompt, params: SamplingParams | None, request_id: str | None, lora_request, deliver) -> str:
        """Send a request from a worker thread; its RequestOutputs (or an exception) go to deliver."""
        rid = request_id if request_id is not None else f"remote-{next(self._ids)}"
        body, kind = self._body(prompt, params or SamplingParams(), lora_request)

        def run() -> None:
            try:
                for out in self._sync_outputs(rid, body, kind):
                    deliver(out)
            except BaseException as e:  # delivered to the caller's thread
                deliver(e)

        threading.Thread(target=run, name=f"kvloom-remote-{rid}", daemon=True).start()
        return rid

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)

    def stream(self, prompt, sampling_params=None, request_id=None, lora_request=None, timeout=None) -> Iterator:
        q: queue.SimpleQueue = queue.SimpleQueue()
        rid = self.submit(prompt, sampling_params, request_id, lora_request, q.put)
        return blocking_outputs(q, rid, timeout, self.abort)

    async def generate(
        self, prompt, sampling_params=None, request_id=None, lora_request=None, timeout=None
    ) -> AsyncIterator[RequestOutput]:
        rid = request_id if request_id is not None else f"remote-{next(self._ids)}"
        body, kind = self._body(prompt, sampling_params or SamplingParams(), lora_request)
        deadline = None if timeout is None else time.monotonic() + timeout
        async with httpx.AsyncClient(headers=self._headers, timeout=self._timeout) as http:
            for attempt in range(self.max_retries + 1):
                try:
                    async with http.stream("POST", f"{self.base_url}/completions", json=body) as r:
                        if r.status_code in _RETRY_STATUS and attempt < self.max_retries:
                            raise _Retry
                        if r.status_code >= 400:
                            await r.aread()
                            _raise_for(r)
                        builder = _OutputBuilder(rid, kind)
                        lines = r.aiter_lines()
                        while True:
                            remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
                            try:
                                line = await asyncio.wait_for(anext(lines), remaining)
                            except StopAsyncIteration:
                                return
                            except asyncio.TimeoutError:
                                raise TimeoutError(f"request {rid} did not finish within {timeout} s") from None
                            for out in builder.feed(line):
                                yield out
                except (_Retry, httpx.TransportError) as e:
                    if attempt == self.max_retries:
                        raise RemoteError(f"the kvloom server at {self.base_url} failed: {e!r}") from None
                    await asyncio.sleep(min(0.25 * 2**attempt, 4.0))

    def get_tokenizer(self):
        raise NotImplementedError("a remote engine client has no local tokenizer; the server tokenizes")

    def shutdown(self) -> None:
        """Nothing to release: the server owns the engine."""

    # ---- requests ----------------------------------------------------------------------------
    def _body(self, prompt, params: SamplingParams, lora_request) -> tuple[dict, RequestOutputKind]:
        unsupported = [
            name
            for name, ok in (
                ("prompt_logprobs", params.prompt_logprobs is None),
                ("detokenize", params.detokenize),
                ("truncate_prompt_tokens", params.truncate_prompt_tokens is None),
            )
            if not ok
        ]
        if unsupported:
            raise ValueError(f"SamplingParams {', '.join(unsupported)} are not available through a remote server")
        if isinstance(prompt, dict):
            prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
        model = self.model_name
        if lora_request is not None:
            model = lora_request.lora_name if isinstance(lora_request, LoRARequest) else str(lora_request)
        body: dict[str, Any] = {f: getattr(params, f) for f in _FIELDS if getattr(params, f) is not None}
        body.update(model=model, prompt=prompt, max_tokens=params.max_tokens, stream=True, return_token_ids=True)
        body["stream_options"] = {"include_usage": True}
        if params.structured_outputs is not None:
            body["structured_outputs"] = params.structured_outputs.to_dict()
        return body, params.output_kind

    def _sync_outputs(self, rid: str, body: dict, kind: RequestOutputKind) -> Iterator[RequestOutput]:
        try:
            for attempt in range(self.max_retries + 1):
                try:
                    with httpx.stream(
                        "POST", f"{self.base_url}/completions", json=body, headers=self._headers, timeout=self._timeout
                    ) as r:
                        if r.status_code in _RETRY_STATUS and attempt < self.max_retries:
                            raise _Retry
                        if r.status_code >= 400:
                            r.read()
                            _raise_for(r)
                        builder = _OutputBuilder(rid, kind)
                        for line in r.iter_lines():
                            if rid in self._cancelled:
                                return  # closing the response makes the server abort the request
                            yield from builder.feed(line)
                        return
                except (_Retry, httpx.TransportError) as e:
                    if attempt == self.max_retries:
                        raise RemoteError(f"the kvloom server at {self.base_url} failed: {e!r}") from None
                    time.sleep(min(0.25 * 2**attempt, 4.0))
        finally:
            with self._lock:
                self._cancelled.discard(rid)


class _Retry(Exception):
    """A retryable status before any output."""


@dataclasses.dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: Any = None
    sent_text: int = 0
    sent_tokens: int = 0


class _OutputBuilder:
    """Turns the SSE lines of one streamed /v1/completions request into RequestOutputs of the asked kind."""

    def __init__(self, request_id: str, kind: RequestOutputKind) -> None:
        self.request_id = request_id
        self.kind = kind
        self.prompt_token_ids: list[int] = []
        self.choices: dict[int, _Choice] = {}
        self.finished = False

    def feed(self, line: str) -> Iterator[RequestOutput]:
        if not line.startswith("data: ") or line == "data: [DONE]":
            return
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise ValueError(chunk["error"].get("message", "the server reported an error"))
        for raw in chunk.get("choices", []):
            choice = self.choices.setdefault(raw["index"], _Choice())
            self.prompt_token_ids = raw.get("prompt_token_ids") or self.prompt_token_ids
            new_ids = raw.get("token_ids") or []
            choice.text += raw.get("text") or ""
            choice.token_ids += new_ids
            if raw.get("logprobs"):
                choice.logprobs = (choice.logprobs or []) + _positions(raw["logprobs"], new_ids)
            if raw.get("finish_reason") is not None:
                choice.finish_reason, choice.stop_reason = raw["finish_reason"], raw.get("stop_reason")
        self.finished = bool(self.choices) and all(c.finish_reason is not None for c in self.choices.values())
        if self.kind == RequestOutputKind.FINAL_ONLY and not self.finished:
            return
        if chunk.get("choices") or self.finished:
            yield self._output()

    def _output(self) -> RequestOutput:
        delta = self.kind == RequestOutputKind.DELTA
        completions = []
        for index, c in sorted(self.choices.items()):
            text, ids, lps = c.text, c.token_ids, c.logprobs
            if delta:
                text, ids = c.text[c.sent_text :], c.token_ids[c.sent_tokens :]
                lps = None if c.logprobs is None else c.logprobs[c.sent_tokens :]
                c.sent_text, c.sent_tokens = len(c.text), len(c.token_ids)
            completions.append(CompletionOutput(index, text, list(ids), None, lps, c.finish_reason, c.stop_reason))
        return RequestOutput(self.request_id, None, self.prompt_token_ids, None, completions, self.finished)


def _positions(logprobs: dict, token_ids: list[int]) -> list[dict[int, Logprob]]:
    """Legacy completions logprobs as per-position {token id: Logprob}; alternatives the server names only
    by text get stand-in negative ids (adapters report their text)."""
    out = []
    for j, token_id in enumerate(token_ids):
        position = {token_id: Logprob(logprobs["token_logprobs"][j], None, logprobs["tokens"][j])}
        for rank, (text, value) in enumerate((logprobs["top_logprobs"][j] or {}).items(), 1):
            if text == logprobs["tokens"][j]:
                position[token_id].rank = rank
            else:
                position[-rank] = Logprob(value, rank, text)
        out.append(position)
    return out


def _parser(spec: dict | None, tools: list[dict]):
    if spec is None:
        return None
    if spec["name"] == "required":
        return RequiredToolParser(tools)
    if spec["name"] == "named":
        return NamedToolParser(tools, spec["function"])
    parser = ToolParserManager.get_tool_parser(spec["name"])(tools)
    return FirstCallOnly(parser) if spec.get("first_call_only") else parser


def _raise_for(r: httpx.Response) -> None:
    """4xx are the request's fault (ValueError, as the in-process engine raises); 5xx are the server's."""
    if r.status_code < 400:
        return
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = r.text
    if r.status_code in (400, 404, 413, 422):
        raise ValueError(message)
    raise RemoteError(f"HTTP {r.status_code} from the kvloom server: {message}")
