"""Continuous batching: a per-step token budget, chunked prefill and preemption by recompute."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from kvloom.engine.config import SchedulerConfig
from kvloom.engine.kv_cache.manager import KVCacheManager
from kvloom.engine.request import Request, RequestStatus
from kvloom.engine.scheduler.output import (
    ModelRunnerOutput,
    NewRequestData,
    ScheduledSeq,
    SchedulerOutput,
)


class Scheduler:
    """Decides, each step, which requests run and how many of their tokens are computed.

    Running requests go first (decodes and unfinished prefill chunks), in arrival order; waiting
    requests join while the token budget, max_num_seqs and free blocks allow. When a running request
    cannot get a block, the most recently admitted running request is preempted: its blocks are
    freed and it goes back to the front of the waiting queue, to be recomputed later.

    With LoRA, at most `max_loras` distinct adapters run at once: a waiting request whose adapter
    would need another slot stays in the queue (in its place) while requests behind it whose
    adapters are already running, or that use none, may start. Likewise a request whose grammar is
    still compiling waits in its place without holding up the others.

    With constrained requests, each step carries the bitmask of allowed tokens for the constrained
    requests it samples, and `update` advances their grammars, ending a request whose grammar is
    complete.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache_manager: KVCacheManager,
        on_release: Callable[[int], None] | None = None,
        structured_output=None,
    ) -> None:
        self.config = config
        self.kv = kv_cache_manager
        # Called with the adapter id of every request that ends (LoRA pin counting).
        self.on_release = on_release
        # The StructuredOutputManager (bitmasks and grammar advance), when the engine has one.
        self.structured_output = structured_output
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_req_ids: set[str] = set()
        self._started_req_ids: set[str] = set()
        self.num_preemptions = 0

    # ---- queue management --------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        assert request.request_id not in self.requests, f"duplicate request id {request.request_id}"
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests from outside the step (abort, stop string); unknown ids are ignored."""
        assert status.is_finished
        ended = []
        for req_id in request_ids:
            req = self.requests.get(req_id)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self._release(req)
            ended.append(req)
        return ended

    def _release(self, req: Request) -> None:
        self.kv.free(req)
        del self.requests[req.request_id]
        if req.lora_id and self.on_release is not None:
            self.on_release(req.lora_id)
        if req.request_id in self._started_req_ids:
            self._started_req_ids.discard(req.request_id)
            self._finished_req_ids.add(req.request_id)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.spec_token_ids = []
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- the step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_req_ids)
        self._finished_req_ids = set()
        budget = self.config.max_num_batched_tokens
        threshold = self.config.long_prefill_token_threshold

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = req.num_tokens - req.num_computed_tokens
            assert num_new > 0, "a running request always has a token to compute"
            num_spec = 0
            if num_new == 1 and req.spec_token_ids:
                num_spec = min(len(req.spec_token_ids), budget - 1)
                num_new += num_spec
            elif 0 < threshold < num_new:
                num_new = threshold
            num_new = min(num_new, budget)
            while self.kv.allocate_slots(req, num_new) is None:
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted_req_ids.append(victim.request_id)
                if victim is req:
                    break
            if req.status == RequestStatus.PREEMPTED:
                break
            self._add_seq(out, req, num_new, num_spec)
            budget -= num_new
            i += 1

        max_loras = self.config.max_loras
        loras = {r.lora_id for r in self.running if r.lora_id}
        skipped: list[Request] = []
        while (
            self.waiting and budget > 0 and not out.preempted_req_ids and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting[0]
            if max_loras and req.lora_id and req.lora_id not in loras and len(loras) >= max_loras:
                skipped.append(self.waiting.popleft())
                continue
            if req.structured_output is not None and not req.structured_output.is_ready():
                skipped.append(self.waiting.popleft())
                continue
            computed_blocks, num_computed = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_computed
            if 0 < threshold < num_new:
                num_new = threshold
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if self.kv.allocate_slots(req, num_new, computed_blocks) is None:
                break
            self.waiting.popleft()
            self.kv.record_lookup(req, num_computed)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_computed
            req.num_computed_tokens = num_computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if req.lora_id:
                loras.add(req.lora_id)
            if req.request_id not in self._started_req_ids:
                self._started_req_ids.add(req.request_id)
                out.new_requests.append(
                    NewRequestData(
                        req.request_id, req.prompt_token_ids, req.sampling_params, req.lora_id, req.pooling_params
                    )
                )
            self._add_seq(out, req, num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))

        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        if self.structured_output is not None:
            sampled = [self.requests[s.req_id] for s in out.seqs if s.do_sample]
            out.grammar_bitmask = self.structured_output.grammar_bitmask(sampled)
        return out

    def _add_seq(self, out: SchedulerOutput, req: Request, num_new: int, num_spec: int = 0) -> None:
        start = req.num_computed_tokens
        known = num_new - num_spec
        out.seqs.append(
            ScheduledSeq(
                req_id=req.request_id,
                token_ids=req.all_token_ids[start : start + known] + req.spec_token_ids[:num_spec],
                start_pos=start,
                block_ids=self.kv.get_block_ids(req.request_id),
                do_sample=start + known == req.num_tokens,
                num_spec=num_spec,
            )
        )

    def update(self, out: SchedulerOutput, result: ModelRunnerOutput) -> list[tuple[Request, int]]:
        """Advance computed tokens, append sampled tokens and end requests that stop.

        Returns each request that received tokens this step (finished ones included) with how
        many it received: one, or with speculation its accepted guesses plus one.
        """
        for seq in out.seqs:
            req = self.requests.get(seq.req_id)
            if req is not None:
                # Guesses count as computed only once accepted; the KV slots of rejected ones are
                # written again by later steps.
                req.num_computed_tokens += len(seq.token_ids) - seq.num_spec
                req.spec_token_ids = []
        updated = []
        any_finished = False
        for req_id in result.pooler_output:
            # An embedding request is done once its prompt is: it was pooled instead of sampled.
            req = self.requests.get(req_id)
            if req is not None:
                req.status = RequestStatus.FINISHED_STOPPED
                any_finished = True
                self._release(req)
        max_model_len = self.config.max_model_len
        accepted_ids = result.accepted_draft_ids
        for i, (req_id, token_id) in enumerate(zip(result.req_ids, result.sampled_token_ids)):
            req = self.requests.get(req_id)
            if req is None:
                continue
            tokens = [token_id] if not accepted_ids else [*accepted_ids[i], token_id]
            num_new = 0
            for token in tokens:
                num_new += 1
                req.append_output_token(token)
                grammar_end = None
                if req.structured_output is not None:
                    grammar_end = self.structured_output.accept(req, token)
                if req.check_stop(max_model_len) or grammar_end is not None:
                    if not req.is_finished:
                        req.status = grammar_end
                    any_finished = True
                    self._release(req)
                    break
            # Accepted guesses were computed in this step (the last emitted token was not).
            req.num_computed_tokens += num_new - 1
            updated.append((req, num_new))
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        return updated
