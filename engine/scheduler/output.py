"""Plain messages between the scheduler and the model runner: ids, ints and block ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvloom.engine.pooling.params import PoolingParams
from kvloom.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """Sent once, the first time a request is scheduled, so the runner can set up its sampling state."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None
    lora_id: int = 0
    # Embedding requests: pooled instead of sampled once their prompt is computed.
    pooling_params: PoolingParams | None = None


@dataclass(slots=True)
class ScheduledSeq:
    """The tokens of one request computed in this step."""

    req_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    # The step reaches the request's last known token, so its logits are sampled.
    do_sample: bool
    # The last token_ids are this many speculative guesses (scored, then verified by the sampler).
    num_spec: int = 0


@dataclass
class SchedulerOutput:
    """Everything the executor needs for one step."""

    seqs: list[ScheduledSeq] = field(default_factory=list)
    new_requests: list[NewRequestData] = field(default_factory=list)
    # Requests that ended since the previous step; the runner drops their state.
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: list[str] = field(default_factory=list)
    num_batched_tokens: int = 0
    # Allowed tokens of the constrained requests sampled this step (a GrammarBitmask), if any.
    grammar_bitmask: Any = None
    # LoRA: the slot of each adapter this step uses (lora id -> slot), and the slots whose weights
    # must be (re)loaded first (slot -> lora id).
    lora_mapping: dict[int, int] = field(default_factory=dict)
    lora_loads: dict[int, int] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass(slots=True)
class Logprobs:
    """Log-probabilities at one position: the chosen token's, its rank, and the top-k alternatives."""

    token_id: int
    logprob: float
    rank: int
    top: dict[int, float]


@dataclass
class ModelRunnerOutput:
    """What one step produced: a sampled token per sampling request, and optional log-probabilities."""

    req_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)
    # Speculative steps: the guesses each request accepted, emitted before its sampled token
    # (None when no request of the step had guesses).
    accepted_draft_ids: list[list[int]] | None = None
    logprobs: list[Logprobs | None] | None = None
    # Prompt log-probabilities of the chunk computed this step, per request that asked for them.
    prompt_logprobs: dict[str, list[Logprobs]] = field(default_factory=dict)
    # Embedding requests whose prompt ended this step: request id -> the pooled vector (a CPU tensor).
    pooler_output: dict[str, Any] = field(default_factory=dict)
