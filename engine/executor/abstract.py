"""The executor interface the engine core drives, and the choice of executor."""

from __future__ import annotations

from abc import ABC, abstractmethod

from kvloom.engine.config import CacheConfig
from kvloom.engine.errors import WorkerDiedError
from kvloom.engine.lora.request import LoRARequest
from kvloom.engine.scheduler.output import ModelRunnerOutput, SchedulerOutput

BACKENDS = ("uni", "mp", "external_launcher")

__all__ = ["BACKENDS", "Executor", "WorkerDiedError", "build_executor"]


class Executor(ABC):
    """Owns the workers; the engine core's only way to the model."""

    name: str = ""
    tp_size: int = 1

    @abstractmethod
    def determine_num_kv_blocks(self, cache: CacheConfig, max_num_batched_tokens: int | None) -> int:
        """KV blocks every rank can hold (the minimum over ranks)."""

    @abstractmethod
    def kv_bytes_per_block(self) -> int:
        """Bytes of one block on one rank."""

    @abstractmethod
    def allocate_kv_cache(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; rank 0's sampled tokens come back."""

    @abstractmethod
    def add_lora(self, request: LoRARequest) -> None:
        """Tell every worker where adapter `request.lora_int_id` lives (read when a slot needs it)."""

    @abstractmethod
    def remove_lora(self, lora_id: int) -> None: ...

    @abstractmethod
    def describe(self) -> str:
        """What the executor runs, for the start-up log line."""

    @abstractmethod
    def shutdown(self) -> None:
        """Free the model and KV cache; stop and join every worker process."""


def build_executor(backend: str | None, tp_size: int, worker_config, lora_lookup=None) -> Executor:
    """The executor for distributed_executor_backend (None: "uni" for one rank, "mp" for more)."""
    backend = backend or ("uni" if tp_size == 1 else "mp")
    if backend == "uni":
        if tp_size != 1:
            raise ValueError(
                f"distributed_executor_backend='uni' runs one rank; tensor_parallel_size={tp_size} needs 'mp' "
                "or 'external_launcher'"
            )
        from kvloom.engine.executor.uniproc import UniProcExecutor

        return UniProcExecutor(worker_config, lora_lookup)
    if backend == "mp":
        from kvloom.engine.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(worker_config, tp_size)
    if backend == "external_launcher":
        from kvloom.engine.executor.external import ExternalLauncherExecutor

        return ExternalLauncherExecutor(worker_config, tp_size)
    raise ValueError(f"distributed_executor_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
