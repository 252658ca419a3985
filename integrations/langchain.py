"""LangChain adapters over the shared kvloom engine: `VLLM` (a BaseLLM) and `ChatVLLM` (a BaseChatModel).

`VLLM` takes the constructor fields of `langchain_community.llms.VLLM`, so swapping the import is
enough; `ChatVLLM` takes the same fields and renders conversations with the model's chat template.
Wrappers with the same model and engine arguments share one engine (one copy of the weights, one KV
cache), whose batches they join. Each call may pick a LoRA adapter: `invoke(x, lora="sql")` or
`.bind(lora="sql")` (LangChain's `lora_request=` works too).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.embeddings import Embeddings
from langchain_core.language_models import BaseChatModel, BaseLLM, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, ToolMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    ChatResult,
    Generation,
    GenerationChunk,
    LLMResult,
)
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, ConfigDict

from kvloom import RequestOutput
from kvloom.chat_utils import ChatPrompt, render_chat
from kvloom.integrations.common import Delta, KvloomParams, completion_info, template_message, usage
from kvloom.integrations.embedding import KvloomEmbeddingParams
from kvloom.llm import with_chat_constraint

__all__ = ["VLLM", "ChatVLLM", "VLLMEmbeddings"]

_PREFIX = "langchain"
_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "function"}


class _LangChainParams(KvloomParams):
    """What VLLM and ChatVLLM share: per-call arguments, tracing metadata and result metadata."""

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {"api_key": "KVLOOM_API_KEY"}

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
    with `finish_reason` and `model_name`. `bind_tools` and `with_structured_output` work as on
    ChatOpenAI: tools go into the chat template (or the system message when it ignores them), tool
    calls come back as `tool_calls` (`tool_call_chunks` when streaming), and a forced tool choice or
    a JSON schema is enforced by constrained decoding.
    """

    model_config = ConfigDict(extra="forbid")

    streaming: bool = False
    """Stream even from invoke(), so callback handlers see each token."""

    @property
    def _llm_type(self) -> str:
        return "vllm-chat"

    # ---- tools and structured output ---------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        strict: bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer tools to the model. tool_choice: a tool name, "auto", "none", "any"/"required"/True, or
        OpenAI's {"type": "function", "function": {"name": ...}}; forced choices are enforced by the grammar."""
        formatted = [convert_to_openai_tool(tool, strict=strict) for tool in tools]
        names = [t["function"]["name"] for t in formatted]
        if tool_choice is not None and tool_choice is not False:
            kwargs["tool_choice"] = _tool_choice(tool_choice, names)
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict | type,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """Answers parsed into `schema` (Pydantic class, TypedDict, or JSON schema), as ChatOpenAI's method.

        json_schema (default) constrains the output to the schema; function_calling forces a call of a
        tool made from the schema; json_mode asks for a JSON object (response_format json_object) and,
        since a small local model cannot be relied on to follow a schema given only in the prompt,
        constrains that object to the schema too.
        """
        if kwargs:
            raise ValueError(f"unsupported arguments to with_structured_output: {', '.join(kwargs)}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        trace = {"kwargs": {"method": method}, "schema": schema}
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools(
                [schema], tool_choice=name, strict=strict, parallel_tool_calls=False, ls_structured_output_format=trace
            )
            parser: Runnable = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            fmt = {"type": "json_schema", "json_schema": {"name": "output", "schema": convert_to_json_schema(schema)}}
            llm = self.bind(response_format=fmt, ls_structured_output_format=trace)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(f"method must be json_schema, function_calling or json_mode, got {method!r}")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")

    # ---- generation --------------------------------------------------------------------------
    def _prompt(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> ChatPrompt:
        """Render the conversation (and any bound tools, taken out of kwargs) with the chat template."""
        parallel = kwargs.pop("parallel_tool_calls", None)
        return render_chat(
            self.engine_client,
            [_template_message(m) for m in messages],
            tools=kwargs.pop("tools", None),
            tool_choice=kwargs.pop("tool_choice", None),
            parallel_tool_calls=True if parallel is None else parallel,
        )

    def _chat_params(self, messages: list[BaseMessage], stop, kwargs: dict[str, Any]):
        kwargs = dict(kwargs)
        chat = self._prompt(messages, kwargs)
        params, lora = self._call_params(stop, kwargs)
        return chat, with_chat_constraint(params, chat), lora

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chat, params, lora = self._chat_params(messages, stop, kwargs)
        return self._result(self._run_batch([chat.prompt_token_ids], params, lora, _PREFIX)[0], chat.tool_parser)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chat, params, lora = self._chat_params(messages, stop, kwargs)
        outputs = await self._arun_batch([chat.prompt_token_ids], params, lora, _PREFIX)
        return self._result(outputs[0], chat.tool_parser)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        chat, params, lora = self._chat_params(messages, stop, kwargs)
        reader = _ToolReader(chat.tool_parser)
        for delta in self._stream_deltas(chat.prompt_token_ids, params, lora, _PREFIX):
            chunk = self._chunk(delta, reader)
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        chat, params, lora = self._chat_params(messages, stop, kwargs)
        reader = _ToolReader(chat.tool_parser)
        async for delta in self._astream_deltas(chat.prompt_token_ids, params, lora, _PREFIX):
            chunk = self._chunk(delta, reader)
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def _result(self, out: RequestOutput, tool_parser) -> ChatResult:
        model_name = self.engine_client.model_name
        prompt_tokens = len(out.prompt_token_ids)
        generations = []
        for c in out.outputs:
            info = completion_info(c)
            content, calls, invalid = c.text, [], []
            if tool_parser is not None:
                extracted = tool_parser.extract_tool_calls(c.text)
                content = extracted.content or ""
                for call in extracted.tool_calls:
                    (calls if _args(call.arguments) is not None else invalid).append(call)
                if calls and info.get("finish_reason") == "stop":
                    info["finish_reason"] = "tool_calls"
            message = AIMessage(
                content=content,
                tool_calls=[tool_call(name=t.name, args=_args(t.arguments), id=t.id) for t in calls],
                invalid_tool_calls=[
                    invalid_tool_call(name=t.name, args=t.arguments, id=t.id, error="arguments are not a JSON object")
                    for t in invalid
                ],
                usage_metadata=_usage_metadata(prompt_tokens, len(c.token_ids)),
                response_metadata={**info, "model_name": model_name},
            )
            generations.append(ChatGeneration(message=message, generation_info=info))
        return ChatResult(generations=generations, llm_output=self._llm_output([out]))

    def _chunk(self, delta: Delta, reader: _ToolReader) -> ChatGenerationChunk:
        text, call_chunks = reader.feed(delta)
        info = dict(delta.info)
        if reader.saw_calls and info.get("finish_reason") == "stop":
            info["finish_reason"] = "tool_calls"
        if not delta.finished:
            message = AIMessageChunk(content=text, tool_call_chunks=call_chunks, response_metadata=info)
            return ChatGenerationChunk(message=message)
        # Usage and the model name go on the last chunk only: LangChain adds chunks' usage together.
        message = AIMessageChunk(
            content=text,
            tool_call_chunks=call_chunks,
            usage_metadata=_usage_metadata(delta.usage["prompt_tokens"], delta.usage["completion_tokens"]),
            response_metadata={**info, "model_name": self.engine_client.model_name},
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message, generation_info=info)


class VLLMEmbeddings(KvloomEmbeddingParams, Embeddings):
    """LangChain Embeddings on kvloom's shared embedding engine (`runner="pooling"`), e.g. for a vector store.

    `VLLMEmbeddings(model="sentence-transformers/all-MiniLM-L6-v2")`: the texts of one call are
    embedded in one engine batch; the engine is shared with every other embedder of that model.
    """

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._embed(texts)

    def embed_query(self, text: str) -> list[float]:
        return self._embed([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await self._aembed(texts)

    async def aembed_query(self, text: str) -> list[float]:
        return (await self._aembed([text]))[0]


class _ToolReader:
    """Splits a streamed response into text and tool-call chunks (pass-through without tools)."""

    def __init__(self, tool_parser) -> None:
        self.stream = tool_parser.stream() if tool_parser is not None else None
        self.saw_calls = False

    def feed(self, delta: Delta) -> tuple[str, list]:
        if self.stream is None:
            return delta.text, []
        text, calls = self.stream.feed(delta.text)
        if delta.finished:
            more_text, more_calls = self.stream.finish()
            text, calls = text + more_text, calls + more_calls
        self.saw_calls = self.saw_calls or bool(calls)
        chunks = [tool_call_chunk(name=d.name, args=d.arguments, id=d.id, index=d.index) for d in calls]
        return text, chunks


def _tool_choice(choice: dict | str | bool, names: list[str]) -> dict | str:
    """LangChain's tool_choice forms as OpenAI's: a tool name, "any"/True for "required", or a dict."""
    if choice is True or choice == "any":
        return "required"
    if isinstance(choice, str) and choice in names:
        return {"type": "function", "function": {"name": choice}}
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        raise ValueError(f"tool_choice {choice!r} is neither a bound tool ({', '.join(names)}) nor auto/none/any")
    return choice


def _args(arguments: str) -> dict | None:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _usage_metadata(input_tokens: int, output_tokens: int) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens
    )


def _template_message(message: BaseMessage) -> dict[str, Any]:
    """A LangChain message as an OpenAI-shaped message (text content; tool calls and results)."""
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
            elif isinstance(block, dict) and block.get("type") in ("tool_use", "tool_call"):
                continue  # the same calls are in message.tool_calls
            else:
                kind = block.get("type") if isinstance(block, dict) else type(block).__name__
                raise ValueError(f"ChatVLLM accepts text content only, got a {kind!r} block")
        text = "".join(parts)
    out: dict[str, Any] = template_message(role, text, message.name)
    if isinstance(message, AIMessage) and message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["args"], ensure_ascii=False)},
            }
            for call in message.tool_calls
        ]
    if isinstance(message, ToolMessage):
        out["tool_call_id"] = message.tool_call_id
    return out
