"""The engine core's view of one sequence: token ids, progress and status (no tensors)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from kvloom.engine.pooling.params import PoolingParams
from kvloom.engine.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Where a request is in its life; every status after PREEMPTED is final."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    """One sequence to generate. With n > 1 each sample is its own Request sharing the prompt."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None
    eos_token_id: int | None
    max_tokens: int
    arrival_time: float = field(default_factory=time.time)
    lora_id: int = 0
    # A StructuredOutputRequest when the output is constrained (its grammar and matcher).
    structured_output: Any = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    # Speculative guesses of the next tokens (n-gram lookup), verified in the next step.
    spec_token_ids: list[int] = field(default_factory=list)
    # An embedding request (sampling_params None): it ends, pooled, once its prompt is computed.
    pooling_params: PoolingParams | None = None
    # Chained hashes of the full blocks of all_token_ids (prefix caching), grown as tokens arrive.
    block_hashes: list[bytes] = field(default_factory=list)
    all_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> bool:
        """Set a finished status if the last token ends the request (token-level checks only)."""
        params = self.sampling_params
        num_out = len(self.output_token_ids)
        if num_out >= params.min_tokens:
            last = self.output_token_ids[-1]
            if not params.ignore_eos and last == self.eos_token_id:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if last in params._all_stop_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = last
                return True
        if num_out >= self.max_tokens or self.num_tokens >= max_model_len:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False
