"""LLM: vLLM's offline API (generate, chat) over one in-process engine."""

from __future__ import annotations

import itertools
import queue
import threading
import warnings
from collections.abc import Sequence

from tqdm.auto import tqdm

from kvloom.engine.arg_utils import IGNORED_VLLM_ARGS, EngineArgs
from kvloom.engine.outputs import EmbeddingRequestOutput, PoolingRequestOutput, RequestOutput
from kvloom.engine.pooling.params import PoolingParams
from kvloom.engine.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """Generate text for batches of prompts with continuous batching (vLLM's `LLM`)."""

    def __init__(
        self,
        model: str | None = None,
        tokenizer: str | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        block_size: int = 16,
        seed: int = 0,
        kv_cache_memory_gb: float | None = None,
        trust_remote_code: bool = False,
        **kwargs,
    ) -> None:
        ignored = sorted(k for k in kwargs if k in IGNORED_VLLM_ARGS)
        if ignored:
            warnings.warn(f"ignored vLLM engine arguments (no effect in kvloom): {', '.join(ignored)}", stacklevel=2)
        args = EngineArgs.from_kwargs(
            model=model,
            tokenizer=tokenizer,
            dtype=dtype,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            seed=seed,
            kv_cache_memory_gb=kv_cache_memory_gb,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
        from kvloom.engine.llm_engine import LLMEngine

        self.llm_engine = LLMEngine(args)
        self._counter = itertools.count()
        self._client = None
        # One thread at a time steps the engine directly; a call from another thread meanwhile
        # switches this LLM to an engine client (a step loop shared by every caller).
        self._lock = threading.Condition()
        self._stepping = False

    @property
    def engine_client(self):
        """An AsyncLLM over this LLM's engine (created on first use) for servers and adapters.

        Once it exists, generate() and chat() submit through it too, so every caller shares one
        step loop and is batched together.
        """
        with self._lock:
            while self._stepping:  # a direct call is stepping the engine: the loop may start after it
                self._lock.wait()
            if self._client is None:
                from kvloom.async_llm import AsyncLLM

                self._client = AsyncLLM(engine=self.llm_engine)
            return self._client

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request=None,
    ) -> list[RequestOutput]:
        """Complete every prompt (a string, token ids, or a list of them); outputs keep input order."""
        return self._run(_prompt_list(prompts), sampling_params, use_tqdm, lora_request)

    def embed(
        self,
        prompts,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        lora_request=None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (`.outputs.embedding`), in input order; needs an engine with runner='pooling'."""
        outputs = self.encode(
            prompts,
            pooling_params,
            truncate_prompt_tokens=truncate_prompt_tokens,
            use_tqdm=use_tqdm,
            lora_request=lora_request,
            pooling_task="embed",
        )
        return [EmbeddingRequestOutput.from_base(o) for o in outputs]

    def encode(
        self,
        prompts,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
        lora_request=None,
        pooling_task: str | None = "encode",
    ) -> list[PoolingRequestOutput]:
        """The pooled hidden state of every prompt (`.outputs.data`, a tensor), as vLLM's LLM.encode."""
        prompts = _prompt_list(prompts)
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            pooling_params = [pooling_params or PoolingParams()] * len(prompts)
        params = list(pooling_params)
        if any(not isinstance(p, PoolingParams) for p in params):
            raise TypeError("pooling_params must be a PoolingParams or a list of them")
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} PoolingParams for {len(prompts)} prompts")
        for p in params:
            if truncate_prompt_tokens is not None and p.truncate_prompt_tokens not in (None, truncate_prompt_tokens):
                raise ValueError("truncate_prompt_tokens is given twice, with different values")
        if truncate_prompt_tokens is not None:
            params = [p.clone(truncate_prompt_tokens=truncate_prompt_tokens) for p in params]
        params = [p.clone(task=pooling_task) for p in params]
        return self._execute(prompts, params, [lora_request] * len(prompts), use_tqdm)

    def chat(
        self,
        messages,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request=None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
        tools: list[dict] | None = None,
        tool_choice=None,
        parallel_tool_calls: bool = True,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of messages) or a list of conversations.

        `tools` (OpenAI function tools) go into the chat template, or into the system message when
        the template ignores them. `tool_choice="required"` or a named function constrains the
        output to calls whose arguments match the tools' schemas; `kvloom.tool_parsers` reads them.
        """
        from kvloom.chat_utils import render_chat

        if not messages:
            raise ValueError("messages must be a non-empty list")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        rendered = [
            render_chat(
                self.llm_engine,
                conv,
                tools=tools,
                tool_choice=tool_choice,
                parallel_tool_calls=parallel_tool_calls,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template_kwargs=chat_template_kwargs,
            )
            for conv in conversations
        ]
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(rendered)
        if len(params) != len(rendered):
            raise ValueError(f"got {len(params)} SamplingParams for {len(rendered)} conversations")
        params = [with_chat_constraint(p or SamplingParams(), r) for p, r in zip(params, rendered)]
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in rendered]
        return self._run(prompts, params, use_tqdm, lora_request)

    def beam_search(
        self, prompts, params, lora_request=None, use_tqdm: bool = False, concurrency_limit: int | None = None
    ) -> list:
        """vLLM's LLM.beam_search: the best `params.beam_width` sequences of each prompt (a string, a
        TokensPrompt dict, or a list of them) as BeamSearchOutputs, in input order. The beams of all
        prompts (or of concurrency_limit at a time) step through the engine together; see
        kvloom.beam_search for what is computed."""
        from kvloom.beam_search import llm_beam_search

        return llm_beam_search(self, prompts, params, lora_request, use_tqdm, concurrency_limit)

    def _run(self, prompts: list, sampling_params, use_tqdm: bool, lora_request) -> list[RequestOutput]:
        n = len(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * n
        elif isinstance(sampling_params, (list, tuple)):
            params = list(sampling_params)
        else:
            params = [sampling_params]
        if any(not isinstance(p, SamplingParams) for p in params):
            raise TypeError("sampling_params must be a SamplingParams or a list of them")
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * n
        if len(loras) != n:
            raise ValueError(f"got {len(loras)} LoRA requests for {n} prompts")
        # Only final outputs are collected, so skip building per-step ones.
        params = [
            p if p.output_kind == RequestOutputKind.FINAL_ONLY else p.clone(output_kind=RequestOutputKind.FINAL_ONLY)
            for p in params
        ]
        return self._execute(prompts, params, loras, use_tqdm)

    def _execute(self, prompts: list, params: list, loras: list, use_tqdm: bool) -> list:
        """Run requests (SamplingParams or PoolingParams) to their final outputs, in input order."""
        with self._lock:
            direct = self._client is None and not self._stepping
            self._stepping = self._stepping or direct
        if not direct:
            return self._run_client(prompts, params, loras, use_tqdm)
        try:
            engine = self.llm_engine
            ids = []
            try:
                for prompt, p, lora in zip(prompts, params, loras):
                    ids.append(engine.add_request(f"llm-{next(self._counter)}", prompt, p, lora_request=lora))
            except Exception:
                engine.abort_request(ids)
                raise
            return self._run_engine(ids, use_tqdm)
        finally:
            with self._lock:
                self._stepping = False
                self._lock.notify_all()

    def _run_client(self, prompts: list, params: list, loras: list, use_tqdm: bool) -> list[RequestOutput]:
        """Once an engine client owns the step loop, submit through it and wait for the final outputs."""
        client = self.engine_client
        done: queue.SimpleQueue = queue.SimpleQueue()
        ids: list[str] = []
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                rid = f"llm-{next(self._counter)}"
                ids.append(client.submit(prompt, p, rid, lora, lambda item, rid=rid: done.put((rid, item))))
            results: dict[str, RequestOutput] = {}
            with tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm) as bar:
                while len(results) < len(ids):
                    rid, item = done.get()
                    if isinstance(item, BaseException):
                        raise item
                    if item.finished:
                        results[rid] = item
                        bar.update(1)
        except BaseException:
            for rid in ids:
                client.abort(rid)
            raise
        return [results[i] for i in ids]

    def _run_engine(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        pending = set(ids)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        out_tokens = 0
        try:
            while pending:
                outputs = engine.step()
                errors = engine.take_errors()
                failed = [rid for rid in ids if rid in errors]
                if failed:
                    raise errors[failed[0]]
                for out in outputs:
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        results[out.request_id] = out
                        if isinstance(out, RequestOutput):
                            out_tokens += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        elapsed = bar.format_dict["elapsed"] or 1e-9
                        bar.set_postfix_str(f"output {out_tokens / elapsed:.1f} tok/s", refresh=False)
        except BaseException:
            engine.abort_request(list(pending))
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]

    def shutdown(self) -> None:
        """Stop the engine (and its worker processes, with tensor parallelism) and free its memory."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.shutdown()
        else:
            self.llm_engine.shutdown()

    def reset_prefix_cache(self) -> bool:
        return self.llm_engine.reset_prefix_cache()

    # ---- LoRA adapters (engine created with enable_lora=True) --------------------------------
    def add_lora(self, lora_request) -> bool:
        """Register an adapter by name (then `lora_request="name"` selects it) and load it now."""
        return self.llm_engine.add_lora(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self.llm_engine.remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        return self.llm_engine.list_loras()

    def get_metrics(self) -> dict:
        return self.llm_engine.get_metrics()


def _prompt_list(prompts) -> list:
    """One prompt (a string, a dict or a list of token ids) or a list of them, as a list."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


def with_chat_constraint(params: SamplingParams, chat) -> SamplingParams:
    """The request's SamplingParams plus what its tool_choice implies (a ChatPrompt's constraint)."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
    changes = {}
    if chat.structured_outputs is not None:
        if params.structured_outputs is not None:
            raise ValueError(
                "this tool_choice constrains the output already; structured outputs (response_format, "
                'guided_*) can be combined with tools only when tool_choice is "none"'
            )
        changes["structured_outputs"] = chat.structured_outputs
    if chat.skip_special_tokens is not None:
        changes["skip_special_tokens"] = chat.skip_special_tokens
    return params.clone(**changes) if changes else params
