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
    # vLLM's chunked-prefill bound: at most this many prompt tokens of one request per step, so
    # running decodes never wait behind one long prefill (0: only max_num_batched_tokens bounds it).
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        _need(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1", self.max_num_seqs)
        _need(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1", self.max_num_batched_tokens)
        _need(self.max_model_len >= 1, "max_model_len", "must be >= 1", self.max_model_len)
        _need(
            self.long_prefill_token_threshold >= 0,
            "long_prefill_token_threshold",
            "must be >= 0",
            self.long_prefill_token_threshold,
        )
        if not self.enable_chunked_prefill:
            _need(
                self.long_prefill_token_threshold == 0,
                "long_prefill_token_threshold",
                "needs enable_chunked_prefill",
                self.long_prefill_token_threshold,
            )
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


# vLLM's speculative methods that need a second model or trained heads; kvloom implements "ngram".
_SPEC_METHODS_NOT_IMPLEMENTED = ("draft_model", "eagle", "eagle3", "medusa", "mlp_speculator", "mtp", "suffix")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding by n-gram prompt lookup (vLLM's `speculative_config={"method": "ngram", ...}`).

    Each decode step proposes up to num_speculative_tokens tokens that follow the latest earlier
    occurrence of the sequence's last n tokens (n from prompt_lookup_max down to prompt_lookup_min);
    one forward pass verifies them all.
    """

    num_speculative_tokens: int
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 2
    method: str = "ngram"

    def __post_init__(self) -> None:
        _need(
            isinstance(self.num_speculative_tokens, int) and 1 <= self.num_speculative_tokens <= 32,
            "speculative_config.num_speculative_tokens",
            "must be an integer in [1, 32]",
            self.num_speculative_tokens,
        )
        _need(
            isinstance(self.prompt_lookup_min, int) and self.prompt_lookup_min >= 1,
            "speculative_config.prompt_lookup_min",
            "must be an integer >= 1",
            self.prompt_lookup_min,
        )
        _need(
            isinstance(self.prompt_lookup_max, int) and self.prompt_lookup_max >= self.prompt_lookup_min,
            "speculative_config.prompt_lookup_max",
            f"must be an integer >= prompt_lookup_min ({self.prompt_lookup_min})",
            self.prompt_lookup_max,
        )

    @classmethod
    def from_user(cls, value) -> SpeculativeConfig | None:
        """Parse vLLM's speculative_config (a dict, a JSON string, or None); anything not implemented raises."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(value).__name__}")
        cfg = dict(value)
        method = cfg.pop("method", None)
        if method is None and cfg.get("model") in ("ngram", "[ngram]"):
            method = "ngram"
            cfg.pop("model")
        if method in _SPEC_METHODS_NOT_IMPLEMENTED or (method is None and cfg.get("model")):
            raise ValueError(
                f"speculative_config method {method or 'draft_model'!r} is not implemented in kvloom; "
                "use {'method': 'ngram', 'num_speculative_tokens': k}"
            )
        if method != "ngram":
            raise ValueError(f"speculative_config method must be 'ngram', got {method!r}")
        known = {"num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(
                f"speculative_config key(s) not supported: {', '.join(unknown)}; "
                f"accepted: method, {', '.join(sorted(known))}"
            )
        if "num_speculative_tokens" not in cfg:
            raise ValueError("speculative_config needs num_speculative_tokens")
        if "prompt_lookup_max" in cfg and "prompt_lookup_min" not in cfg:
            cfg["prompt_lookup_min"] = min(cfg["prompt_lookup_max"], cls.prompt_lookup_min)
        if "prompt_lookup_min" in cfg and "prompt_lookup_max" not in cfg:
            cfg["prompt_lookup_max"] = max(cfg["prompt_lookup_min"], cls.prompt_lookup_max)
        return cls(**cfg)

    def describe(self) -> str:
        return f"ngram k={self.num_speculative_tokens} n={self.prompt_lookup_min}..{self.prompt_lookup_max}"
