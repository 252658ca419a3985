"""LlamaIndex adapter over the shared kvloom engine: `Vllm`, drop-in for `llama_index.llms.vllm.Vllm`.

complete / chat and their streaming and async forms all run on the engine's own step loop (async
calls never block the event loop, streams yield tokens as they are decoded). chat() renders messages
with the model's chat template unless `messages_to_prompt` is given. Each call may pick a LoRA
adapter with `lora=` (a registered name or a LoRARequest), as may the `lora` field.

`Vllm` is a FunctionCallingLLM: `chat_with_tools` offers tools to the model (a required or named
tool choice is enforced by constrained decoding), tool calls come back as ToolCallBlocks, so
`FunctionAgent` and `structured_predict` work on it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.generic_utils import messages_to_prompt as generic_messages_to_prompt
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from pydantic import ConfigDict, Field, model_validator

from kvloom import RequestOutput
from kvloom.chat_utils import ChatPrompt, render_chat
from kvloom.integrations.common import Delta, KvloomParams, completion_info, template_message, usage
from kvloom.integrations.embedding import KvloomEmbeddingParams
from kvloom.llm import with_chat_constraint

if TYPE_CHECKING:
    from llama_index.core.tools import BaseTool

__all__ = ["Vllm", "VllmEmbedding"]

_PREFIX = "llamaindex"


class Vllm(KvloomParams, FunctionCallingLLM):
    """A LlamaIndex function-calling LLM on the shared kvloom engine (one sequence per call: `n` > 1 is not returned).

    Responses carry `additional_kwargs` with prompt/completion/total token counts and the finish
    reason, and the final engine RequestOutput as `raw`.
    """

    model_config = ConfigDict(extra="forbid")

    is_chat_model: bool | None = Field(
        default=None, description="Whether LlamaIndex should call chat(); None: when the model has a chat template."
    )

    @classmethod
    def class_name(cls) -> str:
        return "Vllm"

    @property
    def metadata(self) -> LLMMetadata:
        client = self.engine_client
        is_chat = self.is_chat_model if self.is_chat_model is not None else self._has_chat_template()
        return LLMMetadata(
            context_window=client.max_model_len,
            num_output=self.max_new_tokens,
            is_chat_model=is_chat,
            is_function_calling_model=True,
            model_name=client.model_name,
        )

    # ---- prompts -----------------------------------------------------------------------------
    def _has_chat_template(self) -> bool:
        client = self.engine_client
        if hasattr(client, "has_chat_template"):  # a remote client: the server knows
            return client.has_chat_template
        return getattr(client.get_tokenizer(), "chat_template", None) is not None

    def _completion_prompt(self, prompt: str, formatted: bool) -> str:
        return prompt if formatted else self.completion_to_prompt(prompt)

    def _chat_prompt(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatPrompt | str:
        """The chat template's rendering (with any tools, taken out of kwargs), or the text of
        messages_to_prompt (if given, or the model has no template)."""
        tools = kwargs.pop("tools", None)
        tool_choice = kwargs.pop("tool_choice", None)
        parallel = kwargs.pop("parallel_tool_calls", True)
        if self.messages_to_prompt is not generic_messages_to_prompt or not self._has_chat_template():
            if tools:
                raise ValueError("tools need the model's chat template; do not set messages_to_prompt")
            return self.messages_to_prompt(messages)
        return render_chat(
            self.engine_client,
            [_template_message(m) for m in messages],
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel,
        )

    def _chat_request(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]):
        kwargs = dict(kwargs)
        chat = self._chat_prompt(messages, kwargs)
        params, lora = self._sampling_params(None, kwargs)
        if isinstance(chat, str):
            return chat, params, lora, None
        return chat.prompt_token_ids, with_chat_constraint(params, chat), lora, chat.tool_parser

    # ---- tools -------------------------------------------------------------------------------
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """chat() arguments offering `tools`; tool_choice is a tool name, auto, none, required or OpenAI's dict."""
        specs = [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools]
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(
                ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str) else user_msg
            )
        if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
            tool_choice = {"type": "function", "function": {"name": tool_choice}}
        if tool_choice is None and specs:
            tool_choice = "required" if tool_required else "auto"
        return {
            "messages": messages,
            "tools": specs or None,
            "tool_choice": tool_choice if specs else None,
            "parallel_tool_calls": allow_parallel_tool_calls,
            **kwargs,
        }

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        if not calls and error_on_no_tool_call:
            raise ValueError("expected at least one tool call, but the model answered with text")
        return [
            ToolSelection(tool_id=c.tool_call_id or "", tool_name=c.tool_name, tool_kwargs=_kwargs(c.tool_kwargs))
            for c in calls
        ]

    # ---- completion --------------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _completion(self._run_one(self._completion_prompt(prompt, formatted), kwargs))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _completion(await self._arun_one(self._completion_prompt(prompt, formatted), kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return _responses(self._deltas(self._completion_prompt(prompt, formatted), kwargs), _completion_chunk)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        return _aresponses(self._adeltas(self._completion_prompt(prompt, formatted), kwargs), _completion_chunk)

    # ---- chat --------------------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        prompt, params, lora, parser = self._chat_request(messages, kwargs)
        return _chat(self._run_batch([prompt], params, lora, _PREFIX)[0], parser)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        prompt, params, lora, parser = self._chat_request(messages, kwargs)
        return _chat((await self._arun_batch([prompt], params, lora, _PREFIX))[0], parser)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        prompt, params, lora, parser = self._chat_request(messages, kwargs)
        return _chat_stream(self._stream_deltas(prompt, params, lora, _PREFIX), parser)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        prompt, params, lora, parser = self._chat_request(messages, kwargs)
        return _achat_stream(self._astream_deltas(prompt, params, lora, _PREFIX), parser)

    # ---- requests ----------------------------------------------------------------------------
    def _run_one(self, prompt, kwargs: dict[str, Any]) -> RequestOutput:
        params, lora = self._sampling_params(None, kwargs)
        return self._run_batch([prompt], params, lora, _PREFIX)[0]

    async def _arun_one(self, prompt, kwargs: dict[str, Any]) -> RequestOutput:
        params, lora = self._sampling_params(None, kwargs)
        return (await self._arun_batch([prompt], params, lora, _PREFIX))[0]

    def _deltas(self, prompt, kwargs: dict[str, Any]) -> Iterator[Delta]:
        params, lora = self._sampling_params(None, kwargs)  # bad arguments raise here, not when iterated
        return self._stream_deltas(prompt, params, lora, _PREFIX)

    def _adeltas(self, prompt, kwargs: dict[str, Any]) -> AsyncIterator[Delta]:
        params, lora = self._sampling_params(None, kwargs)
        return self._astream_deltas(prompt, params, lora, _PREFIX)


class VllmEmbedding(KvloomEmbeddingParams, BaseEmbedding):
    """A LlamaIndex embedding model on kvloom's shared embedding engine (`runner="pooling"`).

    `Settings.embed_model = VllmEmbedding(model=...)` beside `Settings.llm = Vllm(...)`: both live in
    this process and in kvloom's one engine registry. Each batch of `embed_batch_size` texts is one
    engine batch; the async methods never block the event loop.
    """

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _name(self) -> VllmEmbedding:
        if self.model_name == "unknown" and self.model is not None:
            self.model_name = self.model
        return self

    @classmethod
    def class_name(cls) -> str:
        return "VllmEmbedding"

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed([query])[0]

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return (await self._aembed([query]))[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed([text])[0]

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return (await self._aembed([text]))[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._embed(texts)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await self._aembed(texts)


def _completion(out: RequestOutput) -> CompletionResponse:
    c = out.outputs[0]
    return CompletionResponse(text=c.text, raw=out, additional_kwargs={**completion_info(c), **usage([out])})


def _chat(out: RequestOutput, parser=None) -> ChatResponse:
    c = out.outputs[0]
    info = completion_info(c)
    text, calls = c.text, []
    if parser is not None:
        extracted = parser.extract_tool_calls(c.text)
        text, calls = extracted.content or "", [(t.id, t.name, t.arguments) for t in extracted.tool_calls]
        if calls and info.get("finish_reason") == "stop":
            info["finish_reason"] = "tool_calls"
    return ChatResponse(message=_assistant(text, calls), raw=out, additional_kwargs={**info, **usage([out])})


def _assistant(text: str, calls: list[tuple[str, str, str]]) -> ChatMessage:
    """An assistant message: its text, and its tool calls as ToolCallBlocks (and OpenAI-shaped in additional_kwargs)."""
    blocks: list = [TextBlock(text=text)] if text or not calls else []
    blocks += [ToolCallBlock(tool_call_id=i, tool_name=n, tool_kwargs=_kwargs(a)) for i, n, a in calls]
    extra = {}
    if calls:
        extra["tool_calls"] = [
            {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in calls
        ]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs=extra)


class _StreamedCalls:
    """Tool calls gathered from a stream: text so far and, per call, its id, name and argument text."""

    def __init__(self, parser) -> None:
        self.stream = parser.stream() if parser is not None else None
        self.text = ""
        self.calls: list[list[str]] = []

    def update(self, delta: Delta) -> tuple[str, ChatResponse]:
        piece = delta.text
        if self.stream is not None:
            piece, deltas = self.stream.feed(delta.text)
            if delta.finished:
                more, more_deltas = self.stream.finish()
                piece, deltas = piece + more, deltas + more_deltas
            for d in deltas:
                if d.id is not None:
                    self.calls.append([d.id, d.name, ""])
                self.calls[d.index][2] += d.arguments
        self.text += piece
        info = {**delta.info, **(delta.usage or {})}
        if self.calls and info.get("finish_reason") == "stop":
            info["finish_reason"] = "tool_calls"
        message = _assistant(self.text, [tuple(c) for c in self.calls])
        return piece, ChatResponse(message=message, delta=piece, additional_kwargs=info)


def _chat_stream(deltas: Iterator[Delta], parser) -> Iterator[ChatResponse]:
    calls = _StreamedCalls(parser)
    for delta in deltas:
        yield calls.update(delta)[1]


async def _achat_stream(deltas: AsyncIterator[Delta], parser) -> AsyncIterator[ChatResponse]:
    calls = _StreamedCalls(parser)
    async for delta in deltas:
        yield calls.update(delta)[1]


def _kwargs(arguments: Any) -> dict | str:
    """Tool arguments as a dict when they are a complete JSON object, else the text so far."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return arguments
    return value if isinstance(value, dict) else arguments


def _completion_chunk(text: str, delta: Delta) -> CompletionResponse:
    return CompletionResponse(text=text, delta=delta.text, additional_kwargs={**delta.info, **(delta.usage or {})})


def _responses(deltas: Iterator[Delta], make: Callable[[str, Delta], Any]) -> Iterator[Any]:
    """LlamaIndex stream responses: the text so far and the new piece."""
    text = ""
    for delta in deltas:
        text += delta.text
        yield make(text, delta)


async def _aresponses(deltas: AsyncIterator[Delta], make: Callable[[str, Delta], Any]) -> AsyncIterator[Any]:
    text = ""
    async for delta in deltas:
        text += delta.text
        yield make(text, delta)


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A LlamaIndex message as an OpenAI-shaped message (text blocks; tool calls and tool results)."""
    others = sorted({type(b).__name__ for b in message.blocks if not isinstance(b, (TextBlock, ToolCallBlock))})
    if others:
        raise ValueError(f"Vllm accepts text content only, got {', '.join(others)}")
    role = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
    text = "".join(b.text for b in message.blocks if isinstance(b, TextBlock))
    out: dict[str, Any] = template_message(role, text, message.additional_kwargs.get("name"))
    calls = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
    if calls:
        out["tool_calls"] = [
            {
                "id": b.tool_call_id or "",
                "type": "function",
                "function": {
                    "name": b.tool_name,
                    "arguments": b.tool_kwargs if isinstance(b.tool_kwargs, str) else json.dumps(b.tool_kwargs),
                },
            }
            for b in calls
        ]
    elif message.additional_kwargs.get("tool_calls"):
        out["tool_calls"] = [_openai_call(c) for c in message.additional_kwargs["tool_calls"]]
    if "tool_call_id" in message.additional_kwargs:
        out["tool_call_id"] = message.additional_kwargs["tool_call_id"]
    return out


def _openai_call(call: Any) -> dict:
    return call if isinstance(call, dict) else call.model_dump()
