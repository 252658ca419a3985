"""EngineArgs: the flat, user-facing engine settings (vLLM's names), split into validated configs."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

# vLLM engine arguments that make no difference to this engine (knobs of GPU code paths kvloom does not
# have); accepted so code written for vLLM keeps working, and reported once by LLM().
IGNORED_VLLM_ARGS = frozenset(
    {
        "swap_space",  # preemption recomputes, as in vLLM V1 (which no longer swaps)
        "enforce_eager",  # kvloom never captures CUDA graphs: it always runs eagerly
        "code_revision",  # the revision of a model's remote code, which kvloom never runs
        "max_seq_len_to_capture",  # CUDA graph capture sizes
        "disable_custom_all_reduce",
        "disable_async_output_proc",
        "allowed_local_media_path",  # kvloom serves text; media inputs are refused anyway
        "compilation_config",
        "disable_log_stats",  # kvloom logs no periodic throughput stats
    }
)

# vLLM engine arguments that change behaviour in vLLM: accepted at the value that means what kvloom
# does (None is vLLM's "unset"), refused with the reason at any other.
DEFAULT_ONLY_VLLM_ARGS: dict[str, tuple[tuple, str]] = {
    "kv_cache_dtype": (("auto",), "the KV cache is kept in the model's dtype (no fp8 KV cache)"),
    "load_format": (("auto", "safetensors"), "kvloom loads safetensors (and .gguf files given as the model)"),
    "tokenizer_mode": (("auto", "hf"), "kvloom loads the Hugging Face tokenizer (no slow or mistral mode)"),
    "skip_tokenizer_init": ((False,), "kvloom needs the tokenizer (prompts and stop strings are text)"),
    "cpu_offload_gb": (
        (0,),
        "weights stay on the engine's device (a CPU engine holds them in host memory already)",
    ),
    "enable_lora_bias": ((False,), "LoRA adapters with bias weights are not supported"),
}

# vLLM's dtype spellings for the names kvloom's configs use.
_DTYPE_ALIASES = {"half": "float16", "float": "float32"}


# Parallel options kvloom does not implement: accepted only at their single-process value (or
# None, vLLM's "unset"), so that a request for them never silently runs as one process.
UNSUPPORTED_PARALLEL_ARGS = {
    "pipeline_parallel_size": 1,
    "data_parallel_size": 1,
    "data_parallel_size_local": 1,
    "worker_use_ray": False,
    "enable_expert_parallel": False,
}


@dataclass
class EngineArgs:
    """Every engine setting, with vLLM's names and defaults where vLLM has them."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    seed: int = 0
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1
    # None: in-process for one rank, "mp" (a process per rank) for more; "external_launcher" for torchrun.
    distributed_executor_backend: str | None = None
    device: str = "auto"
    download_dir: str | None = None
    # None: the checkpoint's quantization_config; "gptq", "awq", "fp8", "gguf" (checkpoint formats,
    # vLLM's names) or kvloom's on-the-fly weight-only "int8" / "int4" (see engine/model_loader/quant_formats).
    quantization: str | None = None
    # Hub ids: the model's git revision (branch, tag or commit), the tokenizer's (defaults to revision),
    # and the token (None: HF_TOKEN or the stored login; True: the stored login).
    revision: str | None = None
    tokenizer_revision: str | None = None
    hf_token: bool | str | None = field(default=None, repr=False)
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    long_prefill_token_threshold: int = 0
    # vLLM's speculative_config: {"method": "ngram", "num_speculative_tokens": k, ...} (dict or JSON).
    speculative_config: dict | str | None = None
    # Embedding models (see kvloom.engine.pooling.config): runner "auto" | "generate" | "pooling";
    # convert "embed" turns a decoder into an embedding model; task is vLLM's older spelling
    # ("generate", "embed"); pooler_config (override_pooler_config, vLLM's older name) is
    # {"pooling_type": "CLS" | "MEAN" | "LAST", "normalize": bool}, a dict or JSON.
    runner: str = "auto"
    convert: str = "auto"
    task: str | None = None
    pooler_config: dict | str | None = None
    override_pooler_config: dict | str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):
            self.dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineArgs:
        """Build from keyword arguments, dropping known no-op vLLM arguments; unknown names fail."""
        known = cls.field_names()
        for name, default in UNSUPPORTED_PARALLEL_ARGS.items():
            if name in kwargs and kwargs[name] not in (default, None):
                raise ValueError(
                    f"{name}={kwargs[name]!r} is not supported: kvloom runs tensor parallelism only "
                    "(tensor_parallel_size); leave it at its default"
                )
        for name, (accepted, why) in DEFAULT_ONLY_VLLM_ARGS.items():
            if name in kwargs and kwargs[name] is not None and kwargs[name] not in accepted:
                raise ValueError(
                    f"{name}={kwargs[name]!r} is not supported: {why}; accepted: {', '.join(map(repr, accepted))}"
                )
        unknown = sorted(
            k
            for k in kwargs
            if k not in known
            and k not in IGNORED_VLLM_ARGS
            and k not in UNSUPPORTED_PARALLEL_ARGS
            and k not in DEFAULT_ONLY_VLLM_ARGS
        )
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in kwargs.items() if k in known})

    def key(self) -> tuple:
        """A hashable identity of this configuration (for sharing one engine per configuration)."""
        return tuple(_hashable(getattr(self, f.name)) for f in fields(self))


def _hashable(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value
