"""OpenAI Responses API bodies: the request, its items as chat messages, and the response object."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from kvloom import SamplingParams
from kvloom.integrations.openai.context import APIError
from kvloom.integrations.openai.protocol import _SamplingFields

# What `include` may ask for: per-token logprobs of the output text (the only includable kvloom makes).
LOGPROBS_INCLUDE = "message.output_text.logprobs"
_TOOL_KEYS = {"type", "name", "description", "parameters", "strict"}
_TEXT_PARTS = {"input_text", "output_text"}


class ResponsesRequest(_SamplingFields):
    """POST /v1/responses. vLLM's extra sampling fields (top_k, min_p, seed, stop, ...) are accepted too."""

    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None
    store: bool = True
    include: list[str] | None = None
    top_logprobs: int | None = None
    reasoning: dict[str, Any] | None = None
    truncation: str | None = None
    background: bool | None = None
    stream_options: dict[str, Any] | None = None
    # Accepted, and meaningless locally: routing and abuse-tracking hints, and a cap on built-in tool
    # calls (kvloom has no built-in tools; function calls are not counted by it).
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    max_tool_calls: int | None = None
    # Extra arguments for the chat template (vLLM's chat field; e.g. enable_thinking for Qwen3).
    chat_template_kwargs: dict[str, Any] | None = None

    def unsupported_fields(self) -> list[str]:
        # Chat Completions fields inherited with the sampling fields that the Responses API does not have:
        # a response is one output (no choices, no beam search), and its format is text.format.
        fields = super().unsupported_fields()
        fields += [name for name, value in (("n", self.n), ("best_of", self.best_of)) if value not in (None, 1)]
        if getattr(self, "use_beam_search", False):
            fields.append("use_beam_search")
        if self.response_format is not None:
            fields.append("response_format (the Responses API takes text.format)")
        return fields

    def check(self) -> None:
        """Refuse, naming the field, what kvloom cannot honour in the Responses API's own fields."""
        if self.background:
            raise APIError(
                "background responses are not supported; leave background unset or false", param="background"
            )
        if self.truncation not in (None, "disabled"):
            raise APIError('truncation must be "disabled"; kvloom does not drop input items', param="truncation")
        reasoning = self.reasoning or {}
        if reasoning.get("effort") not in (None, "none") or any(
            v is not None for k, v in reasoning.items() if k != "effort"
        ):
            raise APIError(
                "kvloom's models do not reason: reasoning must be null (or effort 'none', without summary)",
                param="reasoning",
            )
        unknown = sorted(set(self.include or []) - {LOGPROBS_INCLUDE})
        if unknown:
            raise APIError(f"include: {', '.join(unknown)} is not supported (only {LOGPROBS_INCLUDE})", param="include")
        if self.top_logprobs is not None and (
            LOGPROBS_INCLUDE not in (self.include or []) or not 0 <= self.top_logprobs <= 20
        ):
            raise APIError(
                f'top_logprobs must be in [0, 20] and needs include=["{LOGPROBS_INCLUDE}"]', param="top_logprobs"
            )
        options = self.stream_options or {}
        if options.get("include_obfuscation") or set(options) - {"include_obfuscation"}:
            raise APIError("stream_options: only include_obfuscation=false is supported", param="stream_options")
        self.chat_response_format()

    @property
    def logprobs(self) -> int | None:
        """How many alternatives each token's logprobs carry, or None when they are not asked for."""
        return (self.top_logprobs or 0) if LOGPROBS_INCLUDE in (self.include or []) else None

    def chat_response_format(self) -> dict[str, Any] | None:
        """text.format as Chat Completions' response_format (text, json_object or json_schema)."""
        text = self.text or {}
        extra = sorted(k for k, v in text.items() if k != "format" and v is not None)
        if extra:
            raise APIError(f"text.{extra[0]} is not supported", param=f"text.{extra[0]}")
        fmt = text.get("format") or {"type": "text"}
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind in ("text", "json_object"):
            return None if kind == "text" else {"type": "json_object"}
        if kind != "json_schema":
            raise APIError(
                f"text.format.type must be text, json_object or json_schema, got {kind!r}", param="text.format"
            )
        if not isinstance(fmt.get("schema"), dict):
            raise APIError("text.format.schema must be a JSON schema object", param="text.format.schema")
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": spec}

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The chat route's SamplingParams, with text.format as the output constraint; always streamed as deltas."""
        fields = {name: getattr(self, name) for name in _SamplingFields.model_fields}
        fields.update(response_format=self.chat_response_format(), stream=True, stream_options=None)
        return _SamplingFields.model_construct(**fields).sampling_params(max_tokens, logprobs)

    def chat_view(self) -> ChatView:
        """What ServerContext.render reads from a chat body: tools and tool_choice in the chat shape."""
        return ChatView(
            chat_tools(self.tools),
            chat_tool_choice(self.tool_choice),
            self.parallel_tool_calls,
            chat_template=None,
            continue_final_message=False,
            chat_template_kwargs=self.chat_template_kwargs,
        )


@dataclass
class ChatView:
    """The chat-shaped tool settings of a Responses request (what ServerContext.render reads)."""

    tools: list[dict] | None
    tool_choice: Any
    parallel_tool_calls: bool
    chat_template: str | None
    continue_final_message: bool
    chat_template_kwargs: dict[str, Any] | None


def chat_tools(tools: list[dict] | None) -> list[dict] | None:
    """Responses' flat function tools ({type, name, description, parameters, strict}) in the chat shape."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise APIError(f"tools[{i}]: only function tools are supported, got {kind!r}", param=f"tools[{i}].type")
        if not isinstance(tool.get("name"), str):
            raise APIError(
                f"tools[{i}].name is required (the Responses API's function tools are flat: type, name, parameters)",
                param=f"tools[{i}].name",
            )
        extra = sorted(k for k, v in tool.items() if k not in _TOOL_KEYS and v not in (None, False))
        if extra:
            raise APIError(f"tools[{i}].{extra[0]} is not supported", param=f"tools[{i}].{extra[0]}")
        # strict or not, a call that the grammar constrains follows the schema.
        fn = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: Any) -> Any:
    """Responses' tool_choice ("auto", "none", "required", {"type": "function", "name"}) in the chat shape."""
    if choice is None or isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    kind = choice.get("type") if isinstance(choice, dict) else type(choice).__name__
    raise APIError(
        f'tool_choice must be "auto", "none", "required" or {{"type": "function", "name": ...}}, got {kind!r}',
        param="tool_choice",
    )


def input_items(body: ResponsesRequest) -> list[dict]:
    """The request's input as a list of items (a string is one user message)."""
    if isinstance(body.input, str):
        return [{"type": "message", "role": "user", "content": body.input}]
    return body.input


def chat_messages(items: list[dict], first_new: int = 0) -> list[dict]:
    """Input items (messages, function calls and their outputs) as chat messages.

    Items before first_new come from a stored response; errors name the others as input[i].
    A function_call joins the assistant turn before it, so text and parallel calls make one turn.
    """
    messages: list[dict] = []
    for i, item in enumerate(items):
        where = f"input[{i - first_new}]"
        if not isinstance(item, dict):
            raise APIError(f"{where} must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(f"{where}.role must be user, system, developer or assistant, got {role!r}", param=where)
            messages.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call_id, name, arguments = (_string(item, key, where) for key in ("call_id", "name", "arguments"))
            try:
                decoded = json.loads(arguments or "{}")
            except json.JSONDecodeError:
                decoded = None
            if not isinstance(decoded, dict):
                raise APIError(f"{where}.arguments must be a JSON object", param=f"{where}.arguments")
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            content = _text(item.get("output"), f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where), "content": content})
        else:
            raise APIError(
                f"{where}.type {kind!r} is not supported (kvloom takes message, function_call and "
                "function_call_output items)",
                param=f"{where}.type",
            )
    return messages


def _text(content: Any, where: str) -> str:
    """A string, or the text of input_text / output_text parts (joined by newlines)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(f"{where} must be a string or a list of content parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise APIError(
                f"{where}[{j}]: content part type {kind!r} is not supported; kvloom serves text models "
                "(input_text and output_text parts)",
                param=f"{where}[{j}]",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise APIError(f"{where}.{key} must be a string", param=f"{where}.{key}")
    return value


def new_item_id(prefix: str) -> str:
    """OpenAI's id style for responses and their items: resp_..., msg_..., fc_..."""
    return f"{prefix}_{uuid.uuid4().hex}"


def response_object(body: ResponsesRequest, rid: str, model: str, created_at: int) -> dict:
    """The response as created (status in_progress, no output yet); the settings it echoes are the request's."""
    return {
        "id": rid,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": body.max_tool_calls,
        "metadata": body.metadata or {},
        "model": model,
        "output": [],
        "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": body.service_tier or "default",
        "store": body.store,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
        "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [],
        "top_logprobs": body.top_logprobs or 0,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "truncation": "disabled",
        "usage": None,
        "user": body.user,
    }


def response_usage(input_tokens: int, output_tokens: int, cached_tokens: int | None) -> dict:
    # kvloom's prefix cache is implicit: nothing is written on request, so cache_write_tokens is 0.
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens or 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }
