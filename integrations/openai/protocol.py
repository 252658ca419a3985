"""OpenAI request bodies (with vLLM's extra sampling fields) and their translation to SamplingParams."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvloom import RequestOutputKind, SamplingParams
from kvloom.chat_utils import response_format_constraint
from kvloom.engine.structured_output import StructuredOutputsParams
from kvloom.engine.structured_output.params import check_backend

# OpenAI fields that mean nothing for a local server; real clients send them, so they are accepted.
MEANINGLESS_FIELDS = frozenset({"user", "metadata", "store", "service_tier"})


class OpenAIModel(BaseModel):
    # Extra fields are kept so that unsupported_fields() can name them in a 400 (never silently ignored).
    model_config = ConfigDict(extra="allow")

    def unsupported_fields(self) -> list[str]:
        """Fields this server does not implement (unknown names, or known ones it cannot honour).

        Null or empty values ask for nothing (clients echo assistant messages back with
        `refusal: null`, `annotations: []`, ...), so only fields with a value count.
        """
        extra = self.model_extra or {}
        return sorted(k for k, v in extra.items() if k not in MEANINGLESS_FIELDS and v not in (None, [], {}))


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(OpenAIModel):
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's beam search extras: a search of width best_of (or n) returning the n best (kvloom.beam_search).
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    # Constrained decoding: OpenAI's response_format, vLLM's structured_outputs and older guided_* fields.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

    def output_constraint(self) -> StructuredOutputsParams | None:
        """The one output constraint this body asks for (ValueError if it asks for several or a bad one)."""
        guided = {
            k: v
            for k, v in {
                "json": self.guided_json,
                "regex": self.guided_regex,
                "choice": self.guided_choice,
                "grammar": self.guided_grammar,
            }.items()
            if v is not None
        }
        check_backend(self.guided_decoding_backend)
        if self.guided_whitespace_pattern is not None:
            guided["whitespace_pattern"] = self.guided_whitespace_pattern
        fmt = self.response_format or {"type": "text"}
        sources = [
            name
            for name, given in (
                ("structured_outputs", self.structured_outputs is not None),
                ("guided_*", bool(guided)),
                ("response_format", fmt.get("type") != "text"),
            )
            if given
        ]
        if len(sources) > 1:
            raise ValueError(f"give one output constraint, not {' and '.join(sources)}")
        if self.structured_outputs is not None:
            return StructuredOutputsParams.from_dict(self.structured_outputs)
        if guided:
            return StructuredOutputsParams(**guided)
        return response_format_constraint(fmt)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """SamplingParams for this body (ValueError names the offending field)."""
        return SamplingParams(
            n=self.n,
            best_of=self.best_of,
            # Beam search is deterministic: an unset temperature means 0 there (vLLM would sample with 1).
            temperature=(0.0 if self.use_beam_search else 1.0) if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
            structured_outputs=self.output_constraint(),
            logit_bias=self.logit_bias,
            use_beam_search=self.use_beam_search,
            length_penalty=self.length_penalty,
            early_stopping=self.early_stopping,
        )


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    # vLLM's extra: each choice carries the generated token ids (and its prompt's, once).
    return_token_ids: bool = False


class ChatMessage(OpenAIModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    def message_dicts(self) -> list[dict[str, Any]]:
        """The messages as plain dicts (kvloom.chat_utils checks and normalizes them)."""
        return [m.model_dump(exclude_none=True) for m in self.messages]

    def unsupported_fields(self) -> list[str]:
        fields = super().unsupported_fields()
        for i, m in enumerate(self.messages):
            fields += [f"messages[{i}].{k}" for k in m.unsupported_fields()]
        return fields


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(OpenAIModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(OpenAIModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """OpenAI's error shape (what every 4xx and 5xx of this server carries)."""

    error: ErrorInfo


def error_body(message: str, status: int, err_type: str = "BadRequestError", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


FinishReason = Literal["stop", "length", "abort"]
