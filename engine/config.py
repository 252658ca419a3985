"""Engine configuration: a few dataclasses validated once, with errors naming the field."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _need(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")


@dataclass
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    # Distinct LoRA adapters that may run at once (the slots); 0: no limit (LoRA off).
    max_loras: int = 0

    def __post_init__(self) -> None:
        _need(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1", self.max_num_seqs)
        _need(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1", self.max_num_batched_tokens)
        _need(self.max_model_len >= 1, "max_model_len", "must be >= 1", self.max_model_len)
        if not self.enable_chunked_prefill:
            _need(
                self.max_num_batched_tokens >= self.max_model_len,
                "max_num_batched_tokens",
                f"must be >= max_model_len ({self.max_model_len}) without chunked prefill",
                self.max_num_batched_tokens,
            )


@dataclass
class CacheConfig:
    """Paged KV cache shape and budget."""

    block_size: int = 16
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None

    def __post_init__(self) -> None:
        _need(
            self.block_size in (1, 2, 4, 8, 16, 32, 64, 128),
            "block_size",
            "must be a power of two in [1, 128]",
            self.block_size,
        )
        if self.kv_cache_memory_gb is not None:
            _need(self.kv_cache_memory_gb > 0, "kv_cache_memory_gb", "must be > 0", self.kv_cache_memory_gb)
        _need(
            0.0 < self.gpu_memory_utilization <= 1.0,
            "gpu_memory_utilization",
            "must be in (0, 1]",
            self.gpu_memory_utilization,
        )
        if self.num_gpu_blocks_override is not None:
            _need(
                self.num_gpu_blocks_override >= 2,
                "num_gpu_blocks_override",
                "must be >= 2",
                self.num_gpu_blocks_override,
            )


@dataclass
class ModelConfig:
    """Which weights to load and how."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    trust_remote_code: bool = False
    device: str = "auto"
    download_dir: str | None = None

    def __post_init__(self) -> None:
        _need(self.dtype in _DTYPES, "dtype", f"must be one of {', '.join(_DTYPES)}", self.dtype)
        if self.max_model_len is not None:
            _need(self.max_model_len >= 1, "max_model_len", "must be >= 1", self.max_model_len)
        if self.trust_remote_code:
            warnings.warn(
                "trust_remote_code=True has no effect: kvloom runs its own implementation of "
                "Llama-family models and never executes code shipped with a model",
                stacklevel=3,
            )
