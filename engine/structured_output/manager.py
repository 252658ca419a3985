"""Structured-output bookkeeping of the engine core: compile off the step loop, bitmasks, matcher advance."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from kvloom.engine.request import Request, RequestStatus
from kvloom.engine.structured_output.backend import XgrammarBackend
from kvloom.engine.structured_output.params import StructuredOutputsParams
from kvloom.engine.structured_output.request import StructuredOutputRequest

logger = logging.getLogger(__name__)

_CACHE_SIZE = 256


@dataclass
class GrammarBitmask:
    """The allowed tokens of this step's constrained sampling rows (one packed int32 row each)."""

    req_ids: list[str]
    bitmask: torch.Tensor

    def only(self, req_id: str) -> GrammarBitmask | None:
        """The row of one request (None if it is not constrained)."""
        if req_id not in self.req_ids:
            return None
        row = self.req_ids.index(req_id)
        return GrammarBitmask([req_id], self.bitmask[row : row + 1])


@dataclass
class StructuredOutputStats:
    num_compiles: int = 0
    compile_seconds: list[float] = field(default_factory=list)
    # Time the step loop spent filling bitmasks and checking completion (the cost constraints add).
    mask_seconds: float = 0.0
    num_masked_rows: int = 0


class StructuredOutputManager:
    """Compiles each distinct constraint once, on a worker thread, and keeps it in an LRU cache.

    A request waits in the queue, without holding up others, until its grammar is compiled. Each
    step the scheduler asks for the bitmask of the constrained requests it samples; after sampling,
    `accept` advances each matcher and says when a constraint is complete, which ends the request.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], cache_size: int = _CACHE_SIZE) -> None:
        self.backend = XgrammarBackend(tokenizer, vocab_size, stop_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvloom-grammar")
        self._stop_only = None
        self.stats = StructuredOutputStats()

    # ---- caller side (any thread) --------------------------------------------------------------
    def compile(self, params: StructuredOutputsParams) -> Future:
        """Validate a constraint (ValueError here, on the caller's thread) and start compiling it."""
        key = params.key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
        grammar = self.backend.grammar(params)
        with self._lock:
            future = self._cache.get(key)
            if future is None:
                future = self._executor.submit(self._compile, grammar)
                self._cache[key] = future
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return future

    def _compile(self, grammar):
        t0 = time.perf_counter()
        compiled = self.backend.compile(grammar)
        self.stats.num_compiles += 1
        self.stats.compile_seconds.append(time.perf_counter() - t0)
        return compiled

    def make_request(self, params: StructuredOutputsParams) -> StructuredOutputRequest:
        return StructuredOutputRequest(params, self.compile(params))

    # ---- engine core (the step loop) -----------------------------------------------------------
    def grammar_bitmask(self, requests: list[Request]) -> GrammarBitmask | None:
        """The bitmask rows of the constrained requests among those sampled this step."""
        constrained = [r for r in requests if r.structured_output is not None]
        if not constrained:
            return None
        t0 = time.perf_counter()
        bitmask = self.backend.allocate_bitmask(len(constrained))
        for row, req in enumerate(constrained):
            so = req.structured_output
            if so.matcher is None:
                so.matcher = self.backend.matcher(so.compiled.result())
            if so.next_mask is not None:
                bitmask[row] = so.next_mask
                so.next_mask = None
            else:
                self.backend.fill_bitmask(so.matcher, bitmask, row)
        self.stats.mask_seconds += time.perf_counter() - t0
        self.stats.num_masked_rows += len(constrained)
        return GrammarBitmask([r.request_id for r in constrained], bitmask)

    def accept(self, req: Request, token_id: int) -> RequestStatus | None:
        """Advance the request's matcher by its new token; a final status if the constraint ends it."""
        so = req.structured_output
        t0 = time.perf_counter()
        try:
            if not so.matcher.accept_token(token_id):
                # The bitmask allows only tokens the matcher accepts, so this is a bug, not bad input.
                logger.error("request %s: the grammar rejected token %d; ending the request", req.request_id, token_id)
                return RequestStatus.FINISHED_ERROR
            if so.matcher.is_terminated():
                return RequestStatus.FINISHED_STOPPED
            if so.matcher.is_completed():
                # Complete, and maybe extendable (a regex like `a+`): it ends only if nothing but a
                # stop token may follow. The mask is kept for the next step if it goes on.
                row = self.backend.allocate_bitmask(1)
                self.backend.fill_bitmask(so.matcher, row, 0)
                if self._stop_only is None:
                    self._stop_only = self.backend.stop_only_mask()
                if not torch.any(row[0] & ~self._stop_only):
                    return RequestStatus.FINISHED_STOPPED
                so.next_mask = row[0]
            return None
        finally:
            self.stats.mask_seconds += time.perf_counter() - t0

    def wait_for_compiles(self, timeout: float) -> None:
        """Block until a pending compile finishes or timeout passes (for an engine with nothing else to do)."""
        with self._lock:
            pending = [f for f in self._cache.values() if not f.done()]
        if pending:
            wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
