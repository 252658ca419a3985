"""torchrun's processes as the workers ("external_launcher", vLLM's name).

Each process started by torchrun (or any launcher that sets MASTER_ADDR, MASTER_PORT, RANK and
WORLD_SIZE) runs the whole engine with the same requests; each holds its rank's shard, and rank
0's sampled tokens are broadcast so every process schedules exactly the same next step.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from kvloom.engine.config import CacheConfig
from kvloom.engine.errors import portable_exception
from kvloom.engine.executor.abstract import Executor
from kvloom.engine.lora.request import LoRARequest
from kvloom.engine.parallel import TPContext
from kvloom.engine.scheduler.output import ModelRunnerOutput, SchedulerOutput
from kvloom.engine.worker import Worker, WorkerConfig

logger = logging.getLogger(__name__)


class ExternalLauncherExecutor(Executor):
    name = "external_launcher"

    def __init__(self, cfg: WorkerConfig, tp_size: int) -> None:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if k not in os.environ]
        if not dist.is_initialized() and missing:
            raise ValueError(
                "distributed_executor_backend='external_launcher' runs under torchrun: "
                f"{', '.join(missing)} not set (start the script with `torchrun --nproc-per-node N`)"
            )
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != tp_size:
            raise ValueError(
                f"tensor_parallel_size ({tp_size}) must equal the launcher's WORLD_SIZE ({world}) "
                "with distributed_executor_backend='external_launcher'"
            )
        if cfg.device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", rank))
            torch.cuda.set_device(local)
            from dataclasses import replace

            cfg = replace(cfg, device=f"cuda:{local}")
        self.tp_size = tp_size
        self.rank = rank
        self.device = torch.device(cfg.device)
        self.worker = Worker(cfg, TPContext(rank, tp_size))

    def determine_num_kv_blocks(self, cache: CacheConfig, max_num_batched_tokens: int | None) -> int:
        n = torch.tensor([self.worker.determine_num_kv_blocks(cache, max_num_batched_tokens)], device=self.device)
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        return int(n)

    def kv_bytes_per_block(self) -> int:
        return self.worker.kv_bytes_per_block()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.worker.allocate_kv_cache(num_blocks)

    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        try:
            outcome = self.worker.execute_model(out)
        except Exception as e:  # noqa: BLE001 - every rank must reach the broadcast
            outcome = portable_exception(e)
        # Rank 0's outcome, tokens or error, is every rank's: all schedule (or isolate) alike.
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def add_lora(self, request: LoRARequest) -> None:
        self.worker.add_lora(request)

    def remove_lora(self, lora_id: int) -> None:
        self.worker.remove_lora(lora_id)

    def describe(self) -> str:
        return f"rank {self.rank} of {self.tp_size} processes started by an external launcher (torchrun)"

    def shutdown(self) -> None:
        self.worker.shutdown()
