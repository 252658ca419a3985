"""LlamaIndex adapter over the shared kvloom engine: `Vllm`, drop-in for `llama_index.llms.vllm.Vllm`.

complete / chat and their streaming and async forms all run on the engine's own step loop (async
calls never block the event loop, streams yield tokens as they are decoded). chat() renders messages
with the model's chat template unless `messages_to_prompt` is given. Each call may pick a LoRA
adapter with `lora=` (a registered name or a LoRARequest), as may the `lora` field.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

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
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.llm import LLM
from pydantic import ConfigDict, Field

from kvloom import RequestOutput
from kvloom.integrations.common import Delta, KvloomParams, completion_info, template_message, usage

__all__ = ["Vllm"]

_PREFIX = "llamaindex"


class Vllm(KvloomParams, LLM):
    """A LlamaIndex LLM on the shared kvloom engine (one sequence per call: `n` > 1 is not returned).

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
            model_name=client.model_name,
        )

    # ---- prompts -----------------------------------------------------------------------------
    def _has_chat_template(self) -> bool:
        return getattr(self.engine_client.get_tokenizer(), "chat_template", None) is not None

    def _completion_prompt(self, prompt: str, formatted: bool) -> str:
        return prompt if formatted else self.completion_to_prompt(prompt)

    def _chat_prompt(self, messages: Sequence[ChatMessage]) -> str | list[int]:
        """Token ids from the chat template, or the text of messages_to_prompt (if given, or no template)."""
        if self.messages_to_prompt is not generic_messages_to_prompt or not self._has_chat_template():
            return self.messages_to_prompt(messages)
        return self.engine_client.apply_chat_template([_template_message(m) for m in messages])

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
        return _chat(self._run_one(self._chat_prompt(messages), kwargs))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return _chat(await self._arun_one(self._chat_prompt(messages), kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return _responses(self._deltas(self._chat_prompt(messages), kwargs), _chat_chunk)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return _aresponses(self._adeltas(self._chat_prompt(messages), kwargs), _chat_chunk)

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


def _completion(out: RequestOutput) -> CompletionResponse:
    c = out.outputs[0]
    return CompletionResponse(text=c.text, raw=out, additional_kwargs={**completion_info(c), **usage([out])})


def _chat(out: RequestOutput) -> ChatResponse:
    c = out.outputs[0]
    message = ChatMessage(role=MessageRole.ASSISTANT, content=c.text)
    return ChatResponse(message=message, raw=out, additional_kwargs={**completion_info(c), **usage([out])})


def _completion_chunk(text: str, delta: Delta) -> CompletionResponse:
    return CompletionResponse(text=text, delta=delta.text, additional_kwargs={**delta.info, **(delta.usage or {})})


def _chat_chunk(text: str, delta: Delta) -> ChatResponse:
    message = ChatMessage(role=MessageRole.ASSISTANT, content=text)
    return ChatResponse(message=message, delta=delta.text, additional_kwargs={**delta.info, **(delta.usage or {})})


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


def _template_message(message: ChatMessage) -> dict[str, str]:
    """A LlamaIndex message as a chat-template message (text blocks only)."""
    if any(not isinstance(block, TextBlock) for block in message.blocks):
        kinds = sorted({type(b).__name__ for b in message.blocks if not isinstance(b, TextBlock)})
        raise ValueError(f"Vllm accepts text content only, got {', '.join(kinds)}")
    role = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
    return template_message(role, message.content or "", message.additional_kwargs.get("name"))
