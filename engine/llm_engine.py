"""LLMEngine: the front end (input processing, output processing) over an EngineCore.

Input processing (kvloom.engine.input_processor: validate, template, tokenize, load the adapter,
ask for the grammar) runs on the caller's thread in `prepare_request`; the engine core
(kvloom.engine.core) schedules and runs steps on its executor's workers; output processing
(kvloom.engine.output_processor) turns each step's EngineCoreOutputs into RequestOutputs.
This class builds the three and owns the model facts they share (tokenizer, dtype, device).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from kvloom.engine.arg_utils import EngineArgs
from kvloom.engine.config import CacheConfig, ModelConfig, SpeculativeConfig
from kvloom.engine.core import EngineCore
from kvloom.engine.executor import build_executor
from kvloom.engine.input_processor import InputProcessor, PreparedRequest
from kvloom.engine.log import configure_default_logging
from kvloom.engine.lora.adapter import lora_shapes
from kvloom.engine.lora.manager import LoRAManager
from kvloom.engine.lora.request import LoRARequest
from kvloom.engine.model_loader.quant_formats import check_quantization_name, resolve_quantization
from kvloom.engine.model_loader.resolve import resolve_gguf_quantized, resolve_model, resolve_tokenizer
from kvloom.engine.models.arch import ArchConfig
from kvloom.engine.output_processor import OutputProcessor
from kvloom.engine.outputs import RequestOutput
from kvloom.engine.pooling.config import load_pooling_config
from kvloom.engine.pooling.input import PoolingInputProcessor
from kvloom.engine.pooling.params import PoolingParams
from kvloom.engine.request import RequestStatus
from kvloom.engine.sampling_params import SamplingParams
from kvloom.engine.structured_output.manager import StructuredOutputManager
from kvloom.engine.worker import WorkerConfig
from kvloom.kernels import bf16_dot_products, compute_dtype

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLMEngine:
    """One model, one KV cache, one scheduler; callers add requests and drive `step()`."""

    def __init__(self, args: EngineArgs) -> None:
        configure_default_logging()
        t0 = time.perf_counter()
        self.args = args
        model_cfg = ModelConfig(
            model=args.model,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            seed=args.seed,
            trust_remote_code=args.trust_remote_code,
            device=args.device,
            download_dir=args.download_dir,
        )
        cache_cfg = CacheConfig(
            block_size=args.block_size,
            kv_cache_memory_gb=args.kv_cache_memory_gb,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=args.enable_prefix_caching,
            num_gpu_blocks_override=args.num_gpu_blocks_override,
        )
        speculative = SpeculativeConfig.from_user(args.speculative_config)
        if not isinstance(args.tensor_parallel_size, int) or args.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {args.tensor_parallel_size!r}")
        check_quantization_name(args.quantization)  # an unknown name fails before any download
        if args.quantization == "gguf":
            self.model_dir = resolve_gguf_quantized(model_cfg.model, args.download_dir)
        else:
            self.model_dir = resolve_model(
                model_cfg.model, args.download_dir, revision=args.revision, token=args.hf_token
            )
        hf_config = json.loads((Path(self.model_dir) / "config.json").read_text())
        self.arch = ArchConfig.from_hf_config(hf_config)
        self.quant_config = resolve_quantization(args.quantization, hf_config)
        self.device = _pick_device(model_cfg.device)
        self.dtype = _pick_dtype(model_cfg.dtype, self.arch, self.device)
        # float32 for bfloat16 on CPU with the C++ kernels (the CPU bfloat16 mode), else self.dtype
        self.activation_dtype = compute_dtype(self.dtype, self.device)
        self.tokenizer = _load_tokenizer(
            resolve_tokenizer(
                model_cfg.tokenizer,
                self.model_dir,
                model_cfg.model,
                args.download_dir,
                revision=args.revision,
                tokenizer_revision=args.tokenizer_revision,
                token=args.hf_token,
            )
        )
        self.model_name = args.model or "smollm2-135m-instruct"
        # An embedding engine (runner "pooling") pools each whole prompt: no chunked prefill, no prefix cache.
        self.pooling_config = load_pooling_config(args, self.model_name, self.model_dir, hf_config, self.arch)
        self.runner_type = "generate" if self.pooling_config is None else "pooling"
        if self.pooling_config is not None:
            cache_cfg.enable_prefix_caching = False
            model_cfg.max_model_len = self.pooling_config.max_model_len(model_cfg.max_model_len)
        # Under torchrun every rank runs the same requests in lockstep (see InputProcessor).
        self.lockstep = args.distributed_executor_backend == "external_launcher"

        self.lora_manager: LoRAManager | None = None
        max_cpu_loras = args.max_cpu_loras if args.max_cpu_loras is not None else args.max_loras
        if args.enable_lora:
            self.lora_manager = LoRAManager(
                lora_shapes(self.arch),
                self.arch.num_layers,
                args.max_loras,
                args.max_lora_rank,
                max_cpu_loras,
                self.activation_dtype,  # adapters run in the activations' dtype
            )
        worker_cfg = WorkerConfig(
            self.arch,
            self.model_dir,
            self.dtype,
            str(self.device),
            args.block_size,
            args.seed,
            args.enable_lora,
            args.max_loras,
            args.max_lora_rank,
            max_cpu_loras,
            quantization=self.quant_config,
        )
        eos_token_id, extra_eos = _eos_ids(self.tokenizer, self.arch, self.model_dir)
        stop_ids = [t for t in (eos_token_id, *extra_eos) if t is not None]
        self.structured_output = StructuredOutputManager(self.tokenizer, self.arch.vocab_size, stop_ids)
        try:
            executor = build_executor(
                args.distributed_executor_backend,
                args.tensor_parallel_size,
                worker_cfg,
                self.lora_manager.cached if self.lora_manager is not None else None,
            )
        except BaseException:
            self.structured_output.shutdown()
            raise
        try:
            self.core = EngineCore(
                self.arch,
                executor,
                cache_cfg,
                model_cfg.max_model_len,
                args.max_num_seqs,
                args.max_num_batched_tokens,
                args.enable_chunked_prefill and self.pooling_config is None,
                args.max_loras if args.enable_lora else 0,
                self.structured_output,
                self.lora_manager.release if self.lora_manager is not None else None,
                args.long_prefill_token_threshold,
                speculative,
            )
        except BaseException:
            executor.shutdown()
            self.structured_output.shutdown()
            raise
        if self.lora_manager is not None:
            self.lora_manager.on_drop = self.core.lora_dropped
        self.max_model_len = self.core.max_model_len
        self.scheduler_config = self.core.scheduler_config
        self.input_processor = InputProcessor(
            self.tokenizer,
            self.arch.vocab_size,
            self.max_model_len,
            args.max_num_seqs,
            eos_token_id,
            extra_eos,
            self.structured_output,
            self.lora_manager,
            self.lockstep,
        )
        self.pooling_inputs = None
        if self.pooling_config is not None:
            self.pooling_inputs = PoolingInputProcessor(self.input_processor, self.pooling_config)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._errors: dict[str, Exception] = {}
        self.startup_seconds = time.perf_counter() - t0

        num_blocks, block_size = self.core.num_blocks, args.block_size
        per_block_mb = executor.kv_bytes_per_block() / 2**20
        logger.info(
            "KV cache: %d blocks x %d tokens = %d token slots (%.2f GiB per rank); max_model_len %d; "
            "max concurrency at max_model_len: %.2fx; max_num_seqs %d, max_num_batched_tokens %d, "
            "prefix caching %s; long_prefill_token_threshold %d; speculative decoding: %s; executor: %s; "
            "ready in %.1f s",
            num_blocks - 1,
            block_size,
            (num_blocks - 1) * block_size,
            num_blocks * per_block_mb / 1024,
            self.max_model_len,
            (num_blocks - 1) * block_size / self.max_model_len,
            args.max_num_seqs,
            self.scheduler_config.max_num_batched_tokens,
            "on" if cache_cfg.enable_prefix_caching else "off",
            args.long_prefill_token_threshold,
            "off" if speculative is None else speculative.describe(),
            executor.describe(),
            self.startup_seconds,
        )

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    # The core's parts, read by metrics and tests.
    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def kv_cache_manager(self):
        return self.core.kv_cache_manager

    @property
    def stats(self):
        return self.core.stats

    @property
    def executor(self):
        return self.core.executor

    # ---- requests ----------------------------------------------------------------------------
    def prepare_request(
        self,
        request_id: str | None,
        prompt,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        lora_request=None,
    ) -> PreparedRequest:
        """Validate and tokenize a request without touching engine state (safe from any thread).

        An embedding engine takes PoolingParams (its requests end pooled); a generating one SamplingParams.
        """
        if self.pooling_inputs is not None:
            return self.pooling_inputs.prepare_request(request_id, prompt, params, arrival_time, lora_request)
        if isinstance(params, PoolingParams):
            raise ValueError(
                f"this engine generates text with {self.model_name}; embed() and encode() need an embedding "
                "model engine: create it with runner='pooling' (or task='embed')"
            )
        return self.input_processor.prepare_request(request_id, prompt, params, arrival_time, lora_request)

    def add_request(
        self,
        request_id: str | None,
        prompt,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        lora_request=None,
    ) -> str:
        """Validate and queue a request; returns its id. Bad input raises before anything is queued."""
        return self.commit_request(self.prepare_request(request_id, prompt, params, arrival_time, lora_request))

    def commit_request(self, prepared: PreparedRequest) -> str:
        """Queue a prepared request (the only part of adding that touches engine state)."""
        if prepared.state.request_id in self.output_processor.requests:
            raise ValueError(f"request id {prepared.state.request_id!r} is already in use")
        if prepared.adapter is not None:
            self.lora_manager.acquire(prepared.adapter, len(prepared.requests))
        self.output_processor.add_request(prepared.state, [r.request_id for r in prepared.requests])
        self.core.add_requests(prepared.requests, prepared.lora_request)
        return prepared.state.request_id

    # ---- LoRA adapters -------------------------------------------------------------------------
    def _loras(self) -> LoRAManager:
        if self.lora_manager is None:
            raise ValueError("LoRA is not enabled: create the engine with enable_lora=True")
        return self.lora_manager

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Register an adapter by name and load it into host memory (errors raise here)."""
        return self._loras().add_lora(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        """Forget an adapter (requests already using it finish with it); False if it was unknown."""
        return self._loras().remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        """Ids of the registered adapters and of those in host memory."""
        return self.lora_manager.list_loras() if self.lora_manager is not None else set()

    def get_lora_request(self, name: str) -> LoRARequest | None:
        """The registered adapter with this name, if any."""
        return self.lora_manager.get_lora_request(name) if self.lora_manager is not None else None

    def abort_request(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            _, seq_ids = self.output_processor.abort(rid)
            self.core.finish_requests(seq_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.requests)

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step and return the outputs it produced."""
        core_out = self.core.step()
        outputs, stopped = self.output_processor.process(core_out)
        self.core.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        for seq_id, error in core_out.failed.items():
            self._fail_sequence(seq_id, error)
        return outputs

    def _fail_sequence(self, seq_id: str, error: Exception) -> None:
        """End the user request a failed sequence belongs to; its caller gets the error."""
        entry = self.output_processor.seq_map.get(seq_id)
        if entry is None:
            return
        request_id = entry[0].request_id
        self.abort_request(request_id)
        self._errors[request_id] = error

    def take_errors(self) -> dict[str, Exception]:
        """The requests that failed since the last call (request id -> the error), for their callers."""
        errors, self._errors = self._errors, {}
        return errors

    # ---- chat and introspection --------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], **kwargs) -> list[int]:
        """Render a conversation with the model's chat template into prompt token ids."""
        return self.input_processor.apply_chat_template(messages, **kwargs)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text; text that is not valid Unicode (a lone surrogate) is a ValueError."""
        return self.input_processor.encode(text, add_special_tokens)

    def get_tokenizer(self):
        return self.tokenizer

    def get_metrics(self) -> dict:
        """Counters and gauges of this engine (what the server's /metrics exports)."""
        return self.core.get_metrics()

    def _bf16_dot(self) -> bool:
        return self.dtype == torch.bfloat16 and self.activation_dtype == torch.float32 and bf16_dot_products()

    def config_info(self) -> dict[str, str]:
        """The settings this engine runs with (what a benchmark records beside its figures)."""
        args, sched = self.args, self.scheduler_config
        spec = self.core.speculative
        return {
            "model": self.model_name,
            "dtype": str(self.dtype).removeprefix("torch."),
            "activation_dtype": str(self.activation_dtype).removeprefix("torch."),
            # What linear layers multiply in: the CPU bfloat16 mode rounds their inputs to bfloat16 where
            # the CPU has AVX512_BF16 dot products.
            "gemm_input_dtype": "bfloat16" if self._bf16_dot() else str(self.activation_dtype).removeprefix("torch."),
            "device": str(self.device),
            "executor": self.executor.describe(),
            "tensor_parallel_size": str(args.tensor_parallel_size),
            "torch_num_threads": str(torch.get_num_threads()),
            "cpu_affinity": _affinity(),
            "block_size": str(args.block_size),
            "num_kv_blocks": str(self.core.num_blocks - 1),
            "kv_cache_gib": f"{self.core.num_blocks * self.executor.kv_bytes_per_block() / 2**30:.2f}",
            "max_model_len": str(self.max_model_len),
            "max_num_seqs": str(sched.max_num_seqs),
            "max_num_batched_tokens": str(sched.max_num_batched_tokens),
            "long_prefill_token_threshold": str(sched.long_prefill_token_threshold),
            "enable_prefix_caching": str(self.kv_cache_manager.enable_caching),
            "runner": self.runner_type,
            "speculative": "none" if spec is None else spec.describe(),
        }

    def reset_prefix_cache(self) -> bool:
        return self.core.reset_prefix_cache()

    def shutdown(self) -> None:
        """Stop the workers and free the model and KV cache (idempotent)."""
        self.structured_output.shutdown()
        self.core.shutdown()


def _affinity() -> str:
    """The CPUs this process may run on, as a compact list ("0-1")."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return "unknown"
    ranges, start = [], cpus[0]
    for a, b in zip(cpus, cpus[1:] + [None]):
        if b != a + 1:
            ranges.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(ranges)


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _pick_dtype(dtype: str, arch: ArchConfig, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        chosen, why = _DTYPES[dtype], "requested"
    elif device.type == "cpu":
        # float32 keeps token parity with transformers and runs the C++ CPU kernels; half precision
        # falls back to the pure-torch kernels and changes the default model's greedy answers.
        chosen, why = torch.float32, "auto on CPU: float32 keeps parity and uses the C++ CPU kernels"
    else:
        chosen = _DTYPES.get(str(arch.torch_dtype).removeprefix("torch."), torch.bfloat16)
        chosen = torch.bfloat16 if chosen == torch.float32 else chosen
        why = f"auto on {device.type}: checkpoint dtype {arch.torch_dtype}"
    logger.info("dtype %s (%s)", str(chosen).removeprefix("torch."), why)
    return chosen


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    # Local files only (a directory, or the HF cache): no hub is contacted.
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _eos_ids(tokenizer, arch: ArchConfig, model_dir: str) -> tuple[int | None, set[int]]:
    """The primary EOS id and any further end ids from the generation config."""
    eos = tokenizer.eos_token_id
    if eos is None and arch.eos_token_ids:
        eos = arch.eos_token_ids[0]
    extra = set(arch.eos_token_ids)
    gen_path = Path(model_dir) / "generation_config.json"
    if gen_path.is_file():
        gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
        extra |= set(gen_eos) if isinstance(gen_eos, list) else ({gen_eos} if gen_eos is not None else set())
    extra.discard(eos)
    return eos, extra
