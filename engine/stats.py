"""Engine counters: tokens, steps and preemptions (gauges are read live by get_metrics)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvloom.engine.scheduler.output import SchedulerOutput


@dataclass
class EngineStats:
    """Totals since the engine started."""

    num_steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    peak_running: int = 0
    # Paging's internal waste: the fraction of allocated KV slots that held no token, at the step
    # where allocated slots peaked (when memory is scarcest) and the highest over all steps (which
    # the last few short sequences of a workload dominate).
    kv_waste_at_peak: float = 0.0
    max_kv_waste: float = 0.0
    peak_kv_usage: float = 0.0
    peak_used_slots: int = 0
    # Speculative decoding: guesses scored and guesses accepted.
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0

    def record_step(self, out: SchedulerOutput, num_sampled: int, num_preemptions: int) -> None:
        if out.is_empty:
            return
        self.num_steps += 1
        # Prompt tokens computed this step: all scheduled tokens except the one fed per decode.
        num_decode = sum(1 + s.num_spec for s in out.seqs if s.num_spec or (len(s.token_ids) == 1 and s.start_pos > 0))
        self.prompt_tokens += out.num_batched_tokens - num_decode
        self.generation_tokens += num_sampled
        self.num_preemptions = num_preemptions
        self.peak_running = max(self.peak_running, len(out.seqs))

    def record_spec(self, num_draft: int, num_accepted: int) -> None:
        self.spec_num_draft_tokens += num_draft
        self.spec_num_accepted_tokens += num_accepted

    def record_kv(self, used_slots: int, unfilled_slots: int, usage: float) -> None:
        if not used_slots:
            return
        waste = unfilled_slots / used_slots
        self.max_kv_waste = max(self.max_kv_waste, waste)
        if used_slots >= self.peak_used_slots:
            self.peak_used_slots = used_slots
            self.kv_waste_at_peak = waste
        self.peak_kv_usage = max(self.peak_kv_usage, usage)

    def snapshot(self, **gauges) -> dict:
        return {**asdict(self), **gauges}
