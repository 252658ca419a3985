"""A worker: one TP rank's model shard, KV cache and sampler, behind plain-data calls.

The executor calls these methods, in this process (UniProcExecutor) or in a worker process
(MultiprocExecutor); nothing above the executor touches a worker or its ModelRunner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil
import torch

from kvloom.engine.config import CacheConfig
from kvloom.engine.layers.quant import QuantConfig
from kvloom.engine.lora.request import LoRARequest
from kvloom.engine.lora.worker import WorkerLoRA
from kvloom.engine.model_runner import ModelRunner
from kvloom.engine.models.arch import ArchConfig
from kvloom.engine.parallel import SINGLE, TPContext
from kvloom.engine.scheduler.output import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

_DEFAULT_CPU_KV_GB = 4.0
DEFAULT_BATCHED_TOKENS = 2048


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker needs to build its shard (plain, picklable)."""

    arch: ArchConfig
    model_dir: str | None
    dtype: torch.dtype
    device: str
    block_size: int
    seed: int
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int = 1
    quantization: QuantConfig | None = None


class Worker:
    def __init__(self, cfg: WorkerConfig, tp: TPContext = SINGLE, lora_lookup=None) -> None:
        self.cfg = cfg
        self.tp = tp
        device = torch.device(cfg.device)
        self.runner = ModelRunner(
            cfg.arch, cfg.model_dir, cfg.dtype, device, cfg.block_size, cfg.seed, tp, quantization=cfg.quantization
        )
        if cfg.enable_lora:
            self.runner.lora = WorkerLoRA(
                self.runner.model,
                cfg.max_loras,
                cfg.max_lora_rank,
                cfg.max_cpu_loras,
                self.runner.dtype,
                self.runner.kernels,
                lora_lookup,
            )
            if tp.rank == 0:
                logger.info("LoRA slot weights: %.1f MiB per rank", self.runner.lora.num_bytes / 2**20)

    @property
    def kernel_backend(self) -> str:
        return self.runner.kernels.name

    def determine_num_kv_blocks(self, cache: CacheConfig, max_num_batched_tokens: int | None) -> int:
        """How many KV blocks this rank's budget holds (the engine takes the minimum over ranks)."""
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        per_block = self.runner.kv_bytes_per_block()
        device = self.runner.device
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            peak = self.runner.profile_peak_memory(max(DEFAULT_BATCHED_TOKENS, max_num_batched_tokens or 0))
            budget = total * cache.gpu_memory_utilization - peak
            source = f"gpu_memory_utilization={cache.gpu_memory_utilization} after a {peak / 2**30:.2f} GiB peak"
        elif cache.kv_cache_memory_gb is not None:
            budget = cache.kv_cache_memory_gb * 2**30 / self.tp.size
            source = f"kv_cache_memory_gb={cache.kv_cache_memory_gb} over {self.tp.size} rank(s)"
        else:
            budget = min(_DEFAULT_CPU_KV_GB * 2**30, 0.4 * psutil.virtual_memory().available) / self.tp.size
            source = f"default min({_DEFAULT_CPU_KV_GB} GiB, 40% of available memory) over {self.tp.size} rank(s)"
        num_blocks = int(budget // per_block)
        if num_blocks < 2:
            raise ValueError(f"the KV cache budget ({source}) holds {num_blocks} blocks; at least 2 are needed")
        if self.tp.rank == 0:
            logger.info("KV cache budget: %.2f GiB per rank from %s", budget / 2**30, source)
        return num_blocks

    def kv_bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(out)

    def add_lora(self, request: LoRARequest) -> None:
        self.runner.lora.add_lora(request)

    def remove_lora(self, lora_id: int) -> None:
        self.runner.lora.remove_lora(lora_id)

    def shutdown(self) -> None:
        self.runner.kv_caches = []
        self.runner.model = None
