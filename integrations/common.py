"""What the LangChain and LlamaIndex adapters share: vLLM's wrapper fields, the shared engine, requests.

The adapters translate framework objects into calls on one engine client (`AsyncLLM`) and back;
everything that does not depend on the framework lives here, once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from kvloom import RequestOutput, RequestOutputKind, SamplingParams
from kvloom.chat_utils import response_format_constraint

# Per-call keyword arguments that become SamplingParams fields (output_kind is the adapter's choice).
_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams) if f.init) - {"output_kind"}
# The engine fields that have a field of their own on the wrappers (vLLM's LangChain/LlamaIndex names).
_ENGINE_FIELDS = ("dtype", "trust_remote_code", "tensor_parallel_size", "download_dir")


class KvloomParams(BaseModel):
    """The constructor fields of `langchain_community.llms.VLLM` / `llama_index.llms.vllm.Vllm`, plus LoRA.

    `model=None` is kvloom's default model. The engine is `kvloom.get_engine(model, dtype=...,
    trust_remote_code=..., tensor_parallel_size=..., download_dir=..., **vllm_kwargs)`, created on
    first use and shared with every other wrapper, `LLM` user and server of the same configuration;
    or the one given as `engine` (an `AsyncLLM` or a `kvloom.LLM`; also accepted as `llm` or `client`).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    model: str | None = None
    tensor_parallel_size: int | None = 1
    trust_remote_code: bool | None = False
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    use_beam_search: bool = False
    stop: list[str] | None = None
    ignore_eos: bool = False
    max_new_tokens: int = Field(default=512, validation_alias=AliasChoices("max_new_tokens", "max_tokens"))
    logprobs: int | None = None
    dtype: str = "auto"
    download_dir: str | None = None
    vllm_kwargs: dict[str, Any] = Field(default_factory=dict)
    lora: Any = None
    """The adapter every request uses unless a call says otherwise: a registered name or a LoRARequest."""
    timeout: float | None = Field(default=None, gt=0)
    """Seconds a call may take; a request still running then is aborted and TimeoutError raised."""
    max_retries: int = Field(default=2, ge=0)
    """Retries after a transient failure of a remote server (`base_url`): a connection error, a 429 or
    a 5xx. The in-process engine has no transient failures, so there it never retries."""
    base_url: str | None = None
    """A running `kvloom serve` (e.g. http://127.0.0.1:8000/v1) to use instead of an in-process engine;
    `model` then names one of its served models (its first when None)."""
    api_key: SecretStr | None = None
    """The server's API key (`kvloom serve --api-key`), with base_url."""
    engine: Any = Field(default=None, exclude=True, validation_alias=AliasChoices("engine", "llm", "client"))

    _engine_client: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self) -> KvloomParams:
        self._sampling_params(None, {})  # bad sampling values fail here, naming the field
        clash = sorted(set(_ENGINE_FIELDS) & set(self.vllm_kwargs))
        if clash:
            raise ValueError(f"vllm_kwargs sets {', '.join(clash)}: pass it as its own field instead")
        if self.base_url is not None:
            local = [
                name
                for name, is_default in (
                    ("engine", self.engine is None),
                    ("vllm_kwargs", not self.vllm_kwargs),
                    ("dtype", self.dtype == "auto"),
                    ("tensor_parallel_size", (self.tensor_parallel_size or 1) == 1),
                    ("trust_remote_code", not self.trust_remote_code),
                    ("download_dir", self.download_dir is None),
                )
                if not is_default
            ]
            if local:
                raise ValueError(
                    f"{', '.join(local)} configure an in-process engine; with base_url the server's is used"
                )
        elif self.api_key is not None:
            raise ValueError("api_key is for a remote server: set base_url too")
        return self

    # ---- the engine --------------------------------------------------------------------------
    @property
    def engine_client(self):
        """The AsyncLLM this wrapper submits to (the shared engine is created on first use)."""
        if self._engine_client is None:
            if self.base_url is not None:
                from kvloom.integrations.remote import RemoteEngineClient

                key = self.api_key.get_secret_value() if self.api_key is not None else None
                self._engine_client = RemoteEngineClient(
                    self.base_url, key, self.model, timeout=self.timeout, max_retries=self.max_retries
                )
            else:
                self._engine_client = local_engine_client(self)
        return self._engine_client

    def _model_label(self) -> str:
        """The model's name without loading it (for tracing metadata)."""
        if self._engine_client is not None or self.engine is not None or self.base_url is not None:
            return self.engine_client.model_name
        if self.model:
            return self.model
        from kvloom.engine.model_loader.resolve import DEFAULT_ALIAS

        return DEFAULT_ALIAS

    # ---- requests ----------------------------------------------------------------------------
    def _sampling_params(
        self, stop: Sequence[str] | None, kwargs: dict[str, Any], output_kind=RequestOutputKind.FINAL_ONLY
    ) -> tuple[SamplingParams, Any]:
        """SamplingParams and LoRA for one call: the fields, overridden by the call's stop and kwargs.

        Per-call kwargs are SamplingParams fields (`max_tokens`, `seed`, ...), `max_new_tokens`,
        OpenAI's `response_format` (text, json_object, json_schema), and `lora` (or LangChain's
        `lora_request`); anything else raises TypeError.
        """
        kwargs = dict(kwargs)
        response_format = kwargs.pop("response_format", None)
        if response_format is not None:
            if kwargs.get("structured_outputs") is not None:
                raise ValueError("give response_format or structured_outputs, not both")
            kwargs["structured_outputs"] = response_format_constraint(response_format)
        lora = self.lora
        for key in ("lora_request", "lora"):
            if key in kwargs:
                lora = kwargs.pop(key)
        # use_beam_search (vLLM <= 0.6's wrapper field) runs a real beam search of width best_of (or n);
        # it is deterministic, so the temperature field's default (1.0) means 0 there, a value set means it.
        beam = kwargs.get("use_beam_search", self.use_beam_search)
        temperature = self.temperature if not beam or "temperature" in self.model_fields_set else 0.0
        values = {
            "n": self.n,
            "best_of": self.best_of,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "temperature": temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "use_beam_search": self.use_beam_search,
            "stop": self.stop,
            "ignore_eos": self.ignore_eos,
            "max_tokens": kwargs.pop("max_new_tokens", self.max_new_tokens),
            "logprobs": self.logprobs,
        }
        unknown = sorted(k for k in kwargs if k not in _SAMPLING_FIELDS)
        if unknown:
            raise TypeError(
                f"unknown generation argument(s) {', '.join(unknown)}; accepted: lora, lora_request, "
                f"max_new_tokens, response_format and the SamplingParams fields ({', '.join(sorted(_SAMPLING_FIELDS))})"
            )
        values.update(kwargs)
        if stop is not None:
            values["stop"] = list(stop)
        return SamplingParams(**values, output_kind=output_kind), lora

    def _request_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    def _beam_search_here(self, params: SamplingParams) -> bool:
        """Whether this request is a beam search to run on the in-process engine (a server runs its own)."""
        from kvloom import AsyncLLM

        return params.use_beam_search and isinstance(self.engine_client, AsyncLLM)

    async def _beam_outputs(self, prompts: Sequence, params: SamplingParams, lora, prefix: str) -> list[RequestOutput]:
        """The n best beams of each prompt (kvloom.beam_search), every prompt searched at once."""
        from kvloom.beam_search import open_beam_search

        client, search = self.engine_client, params.to_beam_search_params()
        streams = [await open_beam_search(client, p, search, self._request_id(prefix), lora, params.n) for p in prompts]

        async def final(stream) -> RequestOutput:
            return [out async for out in stream][-1]

        return list(await asyncio.gather(*(final(s) for s in streams)))

    def _run_batch(self, prompts: Sequence, params: SamplingParams, lora, prefix: str) -> list[RequestOutput]:
        """Final outputs of many prompts, all submitted before waiting so that the engine batches them."""
        if self._beam_search_here(params):
            from kvloom.beam_search import run_blocking

            return run_blocking(lambda: self._beam_outputs(prompts, params, lora, prefix), self.timeout)
        return run_batch(self.engine_client, prompts, params, lora, lambda: self._request_id(prefix), self.timeout)

    async def _arun_batch(self, prompts: Sequence, params: SamplingParams, lora, prefix: str) -> list[RequestOutput]:
        """The async form of _run_batch: every request is in the engine at once; one failure cancels all."""
        if self._beam_search_here(params):
            try:
                return await asyncio.wait_for(self._beam_outputs(prompts, params, lora, prefix), self.timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"the call did not finish within timeout={self.timeout} s") from None
        return await arun_batch(
            self.engine_client, prompts, params, lora, lambda: self._request_id(prefix), self.timeout
        )

    def _stream_deltas(self, prompt, params: SamplingParams, lora, prefix: str) -> Iterator[Delta]:
        """The pieces of one request's text as the engine produces them (blocking iterator)."""
        tracker = _DeltaTracker(params)
        if self._beam_search_here(params):  # a beam search has its text only at the end: one piece
            yield tracker.update(self._run_batch([prompt], params, lora, prefix)[0])
            return
        for out in self.engine_client.stream(prompt, tracker.params, self._request_id(prefix), lora, self.timeout):
            delta = tracker.update(out)
            if delta is not None:
                yield delta

    async def _astream_deltas(self, prompt, params: SamplingParams, lora, prefix: str) -> AsyncIterator[Delta]:
        """The async form of _stream_deltas."""
        tracker = _DeltaTracker(params)
        if self._beam_search_here(params):
            yield tracker.update((await self._arun_batch([prompt], params, lora, prefix))[0])
            return
        stream = self.engine_client.generate(prompt, tracker.params, self._request_id(prefix), lora, self.timeout)
        async for out in stream:
            delta = tracker.update(out)
            if delta is not None:
                yield delta


def run_batch(client, prompts: Sequence, params, lora, new_id, timeout: float | None) -> list:
    """Final outputs of many prompts (SamplingParams or PoolingParams), all submitted before waiting."""
    done: queue.SimpleQueue = queue.SimpleQueue()
    ids: list[str] = []
    try:
        for i, prompt in enumerate(prompts):
            deliver = lambda item, i=i: done.put((i, item))  # noqa: B023 (i is bound by the default)
            ids.append(client.submit(prompt, params, new_id(), lora, deliver))
        results: dict[int, Any] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(results) < len(ids):
            try:
                i, item = done.get(timeout=None if deadline is None else max(deadline - time.monotonic(), 0))
            except queue.Empty:
                raise TimeoutError(f"the call did not finish within timeout={timeout} s") from None
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                results[i] = item
    except BaseException:
        for rid in ids:
            client.abort(rid)
        raise
    return [results[i] for i in range(len(ids))]


async def arun_batch(client, prompts: Sequence, params, lora, new_id, timeout: float | None) -> list:
    """The async form of run_batch: every request is in the engine at once; one failure cancels all."""

    async def final(prompt):
        outputs = [out async for out in client.generate(prompt, params, new_id(), lora)]
        return outputs[-1]

    tasks = [asyncio.ensure_future(final(p)) for p in prompts]
    try:
        try:
            return list(await asyncio.wait_for(asyncio.gather(*tasks), timeout))
        except asyncio.TimeoutError:
            raise TimeoutError(f"the call did not finish within timeout={timeout} s") from None
    except BaseException:
        for task in tasks:
            task.cancel()  # their generators abort the requests
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@dataclasses.dataclass
class Delta:
    """New text of a streamed request; the last one carries the finish reason and the token counts."""

    text: str
    finished: bool
    info: dict[str, Any]
    usage: dict[str, int] | None = None


class _DeltaTracker:
    """Turns DELTA RequestOutputs of one single-sequence request into Deltas."""

    def __init__(self, params: SamplingParams) -> None:
        if params.n != 1 or ((params.best_of or 1) != 1 and not params.use_beam_search):
            raise ValueError("streaming returns one sequence: use n=1 (and no best_of), or call without streaming")
        self.params = params.clone(output_kind=RequestOutputKind.DELTA)
        self.num_tokens = 0

    def update(self, out: RequestOutput) -> Delta | None:
        if not out.outputs:
            return None
        completion = out.outputs[0]
        self.num_tokens += len(completion.token_ids)
        if not completion.text and not completion.logprobs and not out.finished:
            return None  # e.g. the first bytes of a multi-byte character
        info = completion_info(completion)
        usage = None
        if out.finished:
            prompt = len(out.prompt_token_ids)
            usage = {"prompt_tokens": prompt, "completion_tokens": self.num_tokens}
            usage["total_tokens"] = prompt + self.num_tokens
        return Delta(completion.text, out.finished, info, usage)


def completion_info(completion) -> dict[str, Any]:
    """Finish and stop reason (once finished) and the requested log-probabilities of a CompletionOutput."""
    info: dict[str, Any] = {}
    if completion.finish_reason is not None:
        info.update(finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)
    if completion.logprobs:
        info["logprobs"] = format_logprobs(completion)
    return info


def format_logprobs(completion) -> list[dict[str, Any]]:
    """OpenAI's shape: per generated token its text, log-probability and the top alternatives."""
    out = []
    for token_id, position in zip(completion.token_ids, completion.logprobs):
        chosen = position[token_id]
        top = sorted(position.values(), key=lambda lp: lp.rank or 0)
        out.append(
            {
                "token": chosen.decoded_token,
                "logprob": chosen.logprob,
                "top_logprobs": [{"token": lp.decoded_token, "logprob": lp.logprob} for lp in top],
            }
        )
    return out


def usage(outputs: Sequence[RequestOutput]) -> dict[str, int]:
    """Prompt, completion and total token counts of finished requests."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def template_message(role: str, content: str, name: str | None = None) -> dict[str, str]:
    """A message as chat templates read it."""
    message = {"role": role, "content": content}
    if name:
        message["name"] = name
    return message


def local_engine_client(wrapper, **engine_args):
    """The in-process engine client of a wrapper's fields: its `engine`, else the shared engine for its model."""
    if wrapper.engine is not None:
        from kvloom.serving import as_engine_client

        return as_engine_client(wrapper.engine)
    from kvloom import get_engine

    return get_engine(
        wrapper.model,
        dtype=wrapper.dtype,
        trust_remote_code=bool(wrapper.trust_remote_code),
        tensor_parallel_size=wrapper.tensor_parallel_size or 1,
        download_dir=wrapper.download_dir,
        **engine_args,
        **wrapper.vllm_kwargs,
    )
