"""One worker in this process, called directly."""

from __future__ import annotations

from kvloom.engine.config import CacheConfig
from kvloom.engine.executor.abstract import Executor
from kvloom.engine.lora.request import LoRARequest
from kvloom.engine.scheduler.output import ModelRunnerOutput, SchedulerOutput
from kvloom.engine.worker import Worker, WorkerConfig


class UniProcExecutor(Executor):
    name = "uni"

    def __init__(self, cfg: WorkerConfig, lora_lookup=None) -> None:
        self.worker = Worker(cfg, lora_lookup=lora_lookup)

    def determine_num_kv_blocks(self, cache: CacheConfig, max_num_batched_tokens: int | None) -> int:
        return self.worker.determine_num_kv_blocks(cache, max_num_batched_tokens)

    def kv_bytes_per_block(self) -> int:
        return self.worker.kv_bytes_per_block()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.worker.allocate_kv_cache(num_blocks)

    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(out)

    def add_lora(self, request: LoRARequest) -> None:
        self.worker.add_lora(request)

    def remove_lora(self, lora_id: int) -> None:
        self.worker.remove_lora(lora_id)

    def describe(self) -> str:
        return f"one in-process worker, {self.worker.kernel_backend} kernels"

    def shutdown(self) -> None:
        self.worker.shutdown()
