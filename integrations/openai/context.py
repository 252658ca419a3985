"""What the routes share: the engine client and server settings, and the checks every request goes through."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from kvloom import AsyncLLM, LoRARequest, RequestOutput, SamplingParams
from kvloom.chat_utils import ChatPrompt, render_chat
from kvloom.integrations.openai.metrics import ServerMetrics
from kvloom.llm import with_chat_constraint


class APIError(Exception):
    """An error reported to the client in OpenAI's shape."""

    def __init__(self, message: str, status: int = 400, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.err_type, self.param = status, err_type, param


@dataclass
class ServerContext:
    """One app's engine client, served names, metrics and tool settings."""

    client: AsyncLLM
    names: list[str]
    metrics: ServerMetrics
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = True
    tokenizer: object = field(init=False)

    def __post_init__(self) -> None:
        self.tokenizer = self.client.get_tokenizer()

    def resolve_model(self, name: str | None) -> tuple[str, LoRARequest | None]:
        """The model name to report and the adapter it selects (None for the base model)."""
        if name is None or name in self.names:
            return self.names[0], None
        lora = self.client.get_lora_request(name)
        if lora is not None:
            return name, lora
        raise APIError(f"The model `{name}` does not exist.", 404, "NotFoundError", "model")

    def check_length(self, prompt_len: int, max_tokens: int | None) -> int:
        limit = self.client.max_model_len
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

    def make_params(self, body, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """SamplingParams for a body; fields the server does not implement are a 400 naming them."""
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

    @staticmethod
    def constrain_to_chat(params: SamplingParams, rendered: ChatPrompt) -> SamplingParams:
        """params with the rendered chat's tool-call constraint (a forced tool's schema), or a 400."""
        try:
            return with_chat_constraint(params, rendered)
        except ValueError as e:
            raise APIError(str(e), param="tool_choice") from None

    async def render(self, body, messages: list[dict], add_generation_prompt: bool) -> ChatPrompt:
        """The chat template's rendering of a body's messages and tools, computed off the event loop."""
        try:
            return await asyncio.to_thread(
                render_chat,
                self.client,
                messages,
                tools=body.tools,
                tool_choice=getattr(body, "tool_choice", None),
                parallel_tool_calls=getattr(body, "parallel_tool_calls", True),
                tool_call_parser=self.tool_call_parser,
                enable_auto_tool_choice=self.enable_auto_tool_choice,
                chat_template=body.chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=body.continue_final_message,
                chat_template_kwargs=body.chat_template_kwargs,
            )
        except ValueError as e:
            raise APIError(str(e), param="messages") from None

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text, off the event loop (a long prompt takes a while)."""
        try:
            return await asyncio.to_thread(self.client.engine.encode, text, add_special_tokens=add_special_tokens)
        except ValueError as e:
            raise APIError(str(e), param="prompt") from None

    def check_token_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(f"token ids must be in [0, {vocab})", param=param)
        return ids

    async def open(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, lora
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request (validated off the event loop; ValueError -> 400) and return its stream.

        A use_beam_search request runs kvloom.beam_search; its stream has one, final output.
        """
        try:
            if params.use_beam_search:
                from kvloom.beam_search import open_beam_search

                search = params.to_beam_search_params()
                return await open_beam_search(self.client, prompt_ids, search, request_id, lora, n=params.n)
            return await self.client.open_stream(prompt_ids, params, request_id, lora_request=lora)
        except ValueError as e:
            raise APIError(str(e)) from None
