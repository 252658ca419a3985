"""The engine core: scheduler + KV cache manager + structured-output bookkeeping + LoRA slots + an executor.

One step is three calls: `out = scheduler.schedule(); result = executor.execute_model(out);
scheduler.update(out, result)`. What goes in (Requests, ids to finish) and what comes out
(`EngineCoreOutputs`) is plain data; the front end (kvloom.engine.llm_engine) tokenizes,
detokenizes and builds RequestOutputs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kvloom.engine.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from kvloom.engine.executor import Executor, WorkerDiedError
from kvloom.engine.kv_cache.manager import KVCacheManager
from kvloom.engine.lora.request import LoRARequest
from kvloom.engine.lora.slots import LoRASlots
from kvloom.engine.models.arch import ArchConfig
from kvloom.engine.request import Request, RequestStatus
from kvloom.engine.scheduler.output import Logprobs, ModelRunnerOutput, SchedulerOutput
from kvloom.engine.scheduler.scheduler import Scheduler
from kvloom.engine.spec_decode import NgramProposer, can_speculate
from kvloom.engine.stats import EngineStats
from kvloom.engine.worker import DEFAULT_BATCHED_TOKENS

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineCoreOutput:
    """One sequence's progress in a step: the token it received and whether that ended it."""

    req_id: str
    token_id: int
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    logprobs: Logprobs | None = None


@dataclass
class EngineCoreOutputs:
    outputs: list[EngineCoreOutput] = field(default_factory=list)
    # Prompt log-probabilities computed this step, per sequence id.
    prompt_logprobs: dict[str, list[Logprobs]] = field(default_factory=dict)
    # Sequences that failed the step by themselves (their requests must fail), id -> the error.
    failed: dict[str, Exception] = field(default_factory=dict)
    # Embedding requests finished this step, id -> the pooled vector.
    pooled: dict[str, Any] = field(default_factory=dict)


class EngineCore:
    def __init__(
        self,
        arch: ArchConfig,
        executor: Executor,
        cache: CacheConfig,
        max_model_len: int | None,
        max_num_seqs: int,
        max_num_batched_tokens: int | None,
        enable_chunked_prefill: bool,
        max_loras: int,
        structured_output,
        on_lora_release=None,
        long_prefill_token_threshold: int = 0,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        self.arch = arch
        self.executor = executor
        if arch.is_encoder:
            num_blocks = _encoder_blocks(arch, cache.block_size, max_model_len, max_num_seqs, max_num_batched_tokens)
        else:
            num_blocks = executor.determine_num_kv_blocks(cache, max_num_batched_tokens)
        executor.allocate_kv_cache(num_blocks)
        self.num_blocks = num_blocks
        self.max_model_len = self._max_model_len(max_model_len, num_blocks, cache.block_size)
        batched = max_num_batched_tokens or max(
            DEFAULT_BATCHED_TOKENS, 0 if enable_chunked_prefill else self.max_model_len
        )
        self.scheduler_config = SchedulerConfig(
            max_num_seqs, batched, self.max_model_len, enable_chunked_prefill, max_loras, long_prefill_token_threshold
        )
        self.speculative = speculative
        self.proposer = NgramProposer(speculative) if speculative is not None else None
        self.kv_cache_manager = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.structured_output = structured_output
        self.scheduler = Scheduler(self.scheduler_config, self.kv_cache_manager, on_lora_release, structured_output)
        self.lora_slots = LoRASlots(max_loras) if max_loras else None
        self._worker_loras: set[int] = set()
        self._dropped_loras: list[int] = []
        self.stats = EngineStats()

    def _max_model_len(self, requested: int | None, num_blocks: int, block_size: int) -> int:
        capacity = (num_blocks - 1) * block_size
        if requested is not None:
            if requested > self.arch.max_position:
                raise ValueError(
                    f"max_model_len ({requested}) exceeds the model's max_position_embeddings "
                    f"({self.arch.max_position})"
                )
            if requested > capacity:
                raise ValueError(
                    f"max_model_len ({requested}) does not fit in the KV cache ({capacity} token "
                    "slots); raise kv_cache_memory_gb or lower max_model_len"
                )
            return requested
        if self.arch.max_position > capacity:
            logger.info("max_model_len lowered from %d to %d to fit the KV cache", self.arch.max_position, capacity)
        return min(self.arch.max_position, capacity)

    # ---- requests ----------------------------------------------------------------------------
    def add_requests(self, requests: list[Request], lora_request: LoRARequest | None = None) -> None:
        if lora_request is not None:
            self._sync_loras()
            if lora_request.lora_int_id not in self._worker_loras:
                self.executor.add_lora(lora_request)
                self._worker_loras.add(lora_request.lora_int_id)
        for r in requests:
            self.scheduler.add_request(r)

    def finish_requests(self, seq_ids: Iterable[str], status: RequestStatus) -> None:
        self.scheduler.finish_requests(seq_ids, status)

    def lora_dropped(self, lora_id: int) -> None:
        """The front end forgot an adapter (any thread); workers and slots forget it before the next use."""
        self._dropped_loras.append(lora_id)

    def _sync_loras(self) -> None:
        while self._dropped_loras:
            lora_id = self._dropped_loras.pop()
            if lora_id in self._worker_loras:
                self._worker_loras.discard(lora_id)
                self.executor.remove_lora(lora_id)
            self.lora_slots.forget(lora_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        out = self.scheduler.schedule()
        if out.is_empty and self.scheduler.waiting and self.structured_output is not None:
            # Requests wait only for a grammar still compiling: wait a little for it, don't spin.
            self.structured_output.wait_for_compiles(timeout=0.02)
        if self.lora_slots is not None:
            self._assign_loras(out)
        try:
            result, failed = self.executor.execute_model(out), {}
        except WorkerDiedError:
            raise
        except Exception as error:
            result, failed = self._isolate_failure(out, error)
        updated = self.scheduler.update(out, result)
        self.stats.record_step(out, sum(n for _, n in updated), self.scheduler.num_preemptions)
        if result.accepted_draft_ids is not None:
            self.stats.record_spec(sum(s.num_spec for s in out.seqs), sum(len(a) for a in result.accepted_draft_ids))
        kv = self.kv_cache_manager
        self.stats.record_kv(
            kv.num_used_blocks * kv.block_size, kv.num_unfilled_slots(self.scheduler.running), kv.usage
        )
        if self.proposer is not None:
            self._propose()
        logprobs = {}
        if result.logprobs is not None:
            logprobs = {rid: lp for rid, lp in zip(result.req_ids, result.logprobs) if lp is not None}
        outputs = []
        for r, n in updated:
            tokens = r.output_token_ids[-n:]
            for j, token in enumerate(tokens, 1):
                last = j == n
                outputs.append(
                    EngineCoreOutput(
                        r.request_id,
                        token,
                        r.finish_reason if last else None,
                        r.stop_reason if last else None,
                        max(r.num_cached_tokens, 0),
                        logprobs.get(r.request_id) if last else None,
                    )
                )
        return EngineCoreOutputs(outputs, result.prompt_logprobs, failed, result.pooler_output)

    def _propose(self) -> None:
        """Guess the next tokens of every running request in decode that can speculate."""
        max_len = self.max_model_len
        for req in self.scheduler.running:
            if req.num_tokens - req.num_computed_tokens != 1 or not can_speculate(req):
                continue
            # Leave room for the token sampled after the guesses, within max_tokens and max_model_len.
            room = min(req.max_tokens - req.num_output_tokens, max_len - req.num_tokens) - 1
            req.spec_token_ids = self.proposer.propose(req.all_token_ids, room)

    def _assign_loras(self, out: SchedulerOutput) -> None:
        self._sync_loras()
        requests = self.scheduler.requests
        ids = {requests[s.req_id].lora_id for s in out.seqs if s.req_id in requests} - {0}
        if ids:
            out.lora_mapping, out.lora_loads = self.lora_slots.assign(ids)

    def _isolate_failure(self, out: SchedulerOutput, error: Exception) -> tuple[ModelRunnerOutput, dict]:
        """Re-run a step that raised one sequence at a time: those that fail alone are failed, the rest go on.

        The runner keeps nothing of a failed step (sampled tokens are recorded only on success), and
        re-written KV slots get the same values, so the re-runs continue exactly where the step was.
        """
        logger.warning(
            "an engine step of %d sequences failed (%s: %s); re-running them one at a time to find the cause",
            len(out.seqs),
            type(error).__name__,
            error,
        )
        new = {n.req_id: n for n in out.new_requests}
        # A slot whose load may not have happened must be loaded again before its next use.
        for lora_id in out.lora_loads.values():
            self.lora_slots.forget(lora_id)
        merged = ModelRunnerOutput()
        logprobs: list = []
        accepted: list[list[int]] = []
        failed: dict[str, Exception] = {}
        for seq in out.seqs:
            req = self.scheduler.requests.get(seq.req_id)
            lora_id = req.lora_id if req is not None else 0
            # Each re-run loads only its own adapter, so a bad adapter fails only its requests.
            loads = {slot: i for slot, i in out.lora_loads.items() if i == lora_id}
            single = SchedulerOutput(
                seqs=[seq],
                new_requests=[new[seq.req_id]] if seq.req_id in new else [],
                finished_req_ids=out.finished_req_ids,
                num_batched_tokens=len(seq.token_ids),
                grammar_bitmask=out.grammar_bitmask.only(seq.req_id) if out.grammar_bitmask is not None else None,
                lora_mapping=out.lora_mapping,
                lora_loads=loads,
            )
            try:
                result = self.executor.execute_model(single)
            except WorkerDiedError:
                raise
            except Exception as e:
                logger.error("request %s failed the engine step: %s: %s", seq.req_id, type(e).__name__, e)
                failed[seq.req_id] = e
                continue
            merged.req_ids += result.req_ids
            merged.sampled_token_ids += result.sampled_token_ids
            logprobs += result.logprobs or [None] * len(result.req_ids)
            accepted += result.accepted_draft_ids or [[] for _ in result.req_ids]
            merged.prompt_logprobs.update(result.prompt_logprobs)
            merged.pooler_output.update(result.pooler_output)
        if any(lp is not None for lp in logprobs):
            merged.logprobs = logprobs
        if any(accepted):
            merged.accepted_draft_ids = accepted
        return merged, failed

    # ---- introspection -----------------------------------------------------------------------
    def get_metrics(self) -> dict:
        kv = self.kv_cache_manager
        return self.stats.snapshot(
            num_requests_running=len(self.scheduler.running),
            num_requests_waiting=len(self.scheduler.waiting),
            kv_cache_usage_perc=kv.usage,
            num_kv_blocks=kv.pool.num_usable_blocks,
            num_free_kv_blocks=kv.num_free_blocks,
            num_used_kv_blocks=kv.num_used_blocks,
            prefix_cache_queries=kv.stats.queries,
            prefix_cache_hits=kv.stats.hits,
            # Adapters in use (vLLM's lora_requests_info); list() copies each queue in one step.
            running_lora_ids=sorted({r.lora_id for r in list(self.scheduler.running) if r.lora_id}),
            waiting_lora_ids=sorted({r.lora_id for r in list(self.scheduler.waiting) if r.lora_id}),
        )

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    def shutdown(self) -> None:
        self.executor.shutdown()


def _encoder_blocks(
    arch: ArchConfig, block_size: int, max_model_len: int | None, max_num_seqs: int, max_num_batched_tokens: int | None
) -> int:
    """Blocks for an encoder, which keeps no KV cache: they only count tokens for the scheduler.

    Its requests finish in the step that computes them (never chunked), so one full step of
    max_num_batched_tokens over up to max_num_seqs sequences is all that is ever held at once.
    """
    tokens = max_num_batched_tokens or max(DEFAULT_BATCHED_TOKENS, max_model_len or arch.max_position)
    return -(-tokens // block_size) + max_num_seqs + 1
