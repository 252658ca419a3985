"""LangChain adapters over the shared kvloom engine: `VLLM` (a BaseLLM) and `ChatVLLM` (a BaseChatModel).

`VLLM` takes the constructor fields of `langchain_community.llms.VLLM`, so swapping the import is
enough; `ChatVLLM` takes the same fields and renders conversations with the model's chat template.
Wrappers with the same model and engine arguments share one engine (one copy of the weights, one KV
cache), whose batches they join. Each call may pick a LoRA adapter: `invoke(x, lora="sql")` or
`.bind(lora="sql")` (LangChain's `lora_request=` works too).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, BaseLLM
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    ChatResult,
    Generation,
    GenerationChunk,
    LLMResult,
)
from pydantic import ConfigDict

from kvloom import RequestOutput
from kvloom.integrations.common import Delta, KvloomParams, completion_info, template_message, usage

__all__ = ["VLLM", "ChatVLLM"]

_PREFIX = "langchain"
_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "function"}


class _LangChainParams(KvloomParams):
    """What VLLM and ChatVLLM share: per-call arguments, tracing metadata and result metadata."""

    def _call_params(self, stop: list[str] | None, kwargs: dict[str, Any]):
        # `stream=True` is LangChain's own switch between _generate and _stream, not a sampling value.
        return self._sampling_params(stop, {k: v for k, v in kwargs.items() if k != "stream"})

    @property
    def _identifying_params(self) -> dict[str, Any]:
        fields = (name for name in KvloomParams.model_fields if name != "engine")
        return {name: getattr(self, name) for name in fields} | {"model": self._model_label()}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "kvloom"
        model = kwargs.get("model")
        params["ls_model_name"] = model if isinstance(model, str) else self._model_label()
        max_tokens = kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_new_tokens))
        if isinstance(max_tokens, int):
            params["ls_max_tokens"] = max_tokens
        if stop is None and self.stop:
            params["ls_stop"] = list(self.stop)
        return params

    def _llm_output(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        return {"token_usage": usage(outputs), "model_name": self.engine_client.model_name}

    def _outputs(self, prompts: list, stop: list[str] | None, kwargs: dict[str, Any]) -> list[RequestOutput]:
        params, lora = self._call_params(stop, kwargs)
        return self._run_batch(prompts, params, lora, _PREFIX)

    async def _aoutputs(self, prompts: list, stop: list[str] | None, kwargs: dict[str, Any]) -> list[RequestOutput]:
        params, lora = self._call_params(stop, kwargs)
        return await self._arun_batch(prompts, params, lora, _PREFIX)

    def _chunks(self, prompt, stop: list[str] | None, run_manager, kwargs: dict[str, Any]) -> Iterator:
        """Framework chunks of one streamed request, each reported to the callbacks as it arrives."""
        params, lora = self._call_params(stop, kwargs)
        for delta in self._stream_deltas(prompt, params, lora, _PREFIX):
            chunk = self._chunk(delta)
            if run_manager is not None:
                run_manager.on_llm_new_token(delta.text, chunk=chunk)
            yield chunk

    async def _achunks(self, prompt, stop: list[str] | None, run_manager, kwargs: dict[str, Any]) -> AsyncIterator:
        params, lora = self._call_params(stop, kwargs)
        async for delta in self._astream_deltas(prompt, params, lora, _PREFIX):
            chunk = self._chunk(delta)
            if run_manager is not None:
                await run_manager.on_llm_new_token(delta.text, chunk=chunk)
            yield chunk


class VLLM(_LangChainParams, BaseLLM):
    """A LangChain LLM (text in, text out) on the shared kvloom engine, drop-in for langchain_community's VLLM.

    `batch()` sends every prompt to the engine at once; `stream()` yields tokens as they are decoded.
    Each Generation's `generation_info` has the finish reason (and log-probabilities when `logprobs`
    is set); `llm_output` has the token usage and the model name.
    """

    model_config = ConfigDict(extra="forbid")  # LangChain's base says "ignore": a misspelt field would vanish

    @property
    def _llm_type(self) -> str:
        return "vllm"

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        return self._result(self._outputs(prompts, stop, kwargs))

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        return self._result(await self._aoutputs(prompts, stop, kwargs))

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        yield from self._chunks(prompt, stop, run_manager, kwargs)

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        async for chunk in self._achunks(prompt, stop, run_manager, kwargs):
            yield chunk

    def _result(self, outputs: list[RequestOutput]) -> LLMResult:
        generations = [
            [Generation(text=c.text, generation_info=completion_info(c)) for c in o.outputs] for o in outputs
        ]
        return LLMResult(generations=generations, llm_output=self._llm_output(outputs))

    @staticmethod
    def _chunk(delta: Delta) -> GenerationChunk:
        info = dict(delta.info)
        if delta.usage is not None:
            info["token_usage"] = delta.usage
        return GenerationChunk(text=delta.text, generation_info=info or None)


class ChatVLLM(_LangChainParams, BaseChatModel):
    """A LangChain chat model on the shared kvloom engine; prompts are built with the model's chat template.

    Returned messages carry `usage_metadata` (input, output and total tokens) and `response_metadata`
    with `finish_reason` and `model_name`. Text content only: no tool calling or images.
    """

    model_config = ConfigDict(extra="forbid")

    streaming: bool = False
    """Stream even from invoke(), so callback handlers see each token."""

    @property
    def _llm_type(self) -> str:
        return "vllm-chat"

    def _prompt(self, messages: list[BaseMessage]) -> list[int]:
        return self.engine_client.apply_chat_template([_template_message(m) for m in messages])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._result(self._outputs([self._prompt(messages)], stop, kwargs)[0])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._result((await self._aoutputs([self._prompt(messages)], stop, kwargs))[0])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        yield from self._chunks(self._prompt(messages), stop, run_manager, kwargs)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in self._achunks(self._prompt(messages), stop, run_manager, kwargs):
            yield chunk

    def _result(self, out: RequestOutput) -> ChatResult:
        model_name = self.engine_client.model_name
        prompt_tokens = len(out.prompt_token_ids)
        generations = []
        for c in out.outputs:
            info = completion_info(c)
            message = AIMessage(
                content=c.text,
                usage_metadata=_usage_metadata(prompt_tokens, len(c.token_ids)),
                response_metadata={**info, "model_name": model_name},
            )
            generations.append(ChatGeneration(message=message, generation_info=info))
        return ChatResult(generations=generations, llm_output=self._llm_output([out]))

    def _chunk(self, delta: Delta) -> ChatGenerationChunk:
        if not delta.finished:
            return ChatGenerationChunk(message=AIMessageChunk(content=delta.text, response_metadata=delta.info))
        # Usage and the model name go on the last chunk only: LangChain adds chunks' usage together.
        message = AIMessageChunk(
            content=delta.text,
            usage_metadata=_usage_metadata(delta.usage["prompt_tokens"], delta.usage["completion_tokens"]),
            response_metadata={**delta.info, "model_name": self.engine_client.model_name},
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message, generation_info=delta.info)


def _usage_metadata(input_tokens: int, output_tokens: int) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens
    )


def _template_message(message: BaseMessage) -> dict[str, str]:
    """A LangChain message as a chat-template message (text content only)."""
    role = message.role if isinstance(message, ChatMessage) else _ROLES.get(message.type)
    if role is None:
        raise ValueError(f"ChatVLLM cannot send a {message.type!r} message to a chat template")
    if isinstance(message.content, str):
        text = message.content
    else:
        parts = []
        for block in message.content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and block.get("type") == "text":
                parts.append(block["text"])
            else:
                kind = block.get("type") if isinstance(block, dict) else type(block).__name__
                raise ValueError(f"ChatVLLM accepts text content only, got a {kind!r} block")
        text = "".join(parts)
    return template_message(role, text, message.name)
