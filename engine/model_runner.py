"""The tensor boundary: a SchedulerOutput becomes flat input tensors, one forward pass and samples."""

from __future__ import annotations

import logging
import math
import mmap

import torch
from torch.overrides import TorchFunctionMode

from kvloom.engine.layers.linear import pack_linear_weights
from kvloom.engine.layers.quant import QuantConfig, finish_quantization, prepare_quantization
from kvloom.engine.model_loader.quant_formats import convert_weights
from kvloom.engine.model_loader.weights import iter_weights
from kvloom.engine.models import build_model
from kvloom.engine.models.arch import ArchConfig
from kvloom.engine.parallel import SINGLE, TPContext
from kvloom.engine.pooling.params import PoolingParams
from kvloom.engine.pooling.pooler import pool
from kvloom.engine.sampler import Sampler, SamplingState, logprobs_row
from kvloom.engine.scheduler.output import Logprobs, ModelRunnerOutput, ScheduledSeq, SchedulerOutput
from kvloom.kernels import AttentionMetadata, LoRAMetadata, bf16_dot_products, compute_dtype, get_backend

logger = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model, the KV cache tensors and the per-request sampling state."""

    def __init__(
        self,
        arch: ArchConfig,
        model_dir: str | None,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int,
        seed: int,
        tp: TPContext = SINGLE,
        quantization: QuantConfig | None = None,
    ) -> None:
        self.arch = arch
        # The model computes in self.dtype; its linear weights and KV cache are held in the engine's
        # dtype: both bfloat16, except in the CPU bfloat16 mode (float32 activations, see compute_dtype).
        self.dtype = compute_dtype(dtype, device)
        self.weight_dtype = self.kv_dtype = dtype
        self.device = device
        self.block_size = block_size
        self.tp = tp
        # Parameters are created in the engine's dtype on the target device by a thread-local
        # override of the tensor factories: no process-wide setting (default dtype) changes.
        self.kernels = get_backend(device, self.dtype)
        with torch.device(device), _FactoryDtype(self.dtype):
            self.model = build_model(arch, self.kernels, tp)
            if quantization is not None:
                if quantization.bits is not None and device.type != "cpu":
                    raise ValueError(f"quantization={quantization.method!r} runs on CPU only (device {device})")
                prepare_quantization(self.model, quantization)
        if model_dir is not None:
            if quantization is None:
                self.model.load_weights(iter_weights(model_dir, self.dtype))
            else:  # int tensors and their float32 scales keep their own dtypes
                self.model.load_weights(convert_weights(iter_weights(model_dir, None), quantization, self.dtype))
        if quantization is not None:
            finish_quantization(self.model, quantization)
        # Float32 weights on CPU: laid out once in the C++ GEMM's panel layout (the row-major copies
        # are dropped; the kernel would otherwise transpose every panel on every call), rounded to
        # bfloat16 in the CPU bfloat16 mode.
        mixed = self.weight_dtype != self.dtype
        packed_dtype = torch.bfloat16 if mixed else torch.float32
        packed, nbytes = pack_linear_weights(self.model, packed_dtype)
        if packed:
            logger.info(
                "linear weights: %d layers packed as %s in 16-row panels (%.1f MiB)",
                packed,
                str(packed_dtype).removeprefix("torch."),
                nbytes / 2**20,
            )
        if mixed:
            logger.info(
                "CPU bfloat16 mode: bfloat16 linear weights and KV cache, float32 activations, residual and "
                "accumulation; GEMM: %s",
                "AVX512_BF16 dot products (linear inputs rounded to bfloat16)"
                if bf16_dot_products()
                else "bfloat16 weights widened to float32 (this CPU has no AVX512_BF16)",
            )
        self.model.eval()
        self.sampler = Sampler(arch.vocab_size, seed)
        self.states: dict[str, SamplingState] = {}
        # Embedding requests (a pooling engine runs only these): pooled instead of sampled.
        self.pooling: dict[str, PoolingParams] = {}
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.eos_token_ids: tuple[int, ...] = arch.eos_token_ids
        # A WorkerLoRA when LoRA is enabled; the adapter id of each request with one.
        self.lora = None
        self.req_lora: dict[str, int] = {}

    # ---- KV cache ----------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        if self.arch.is_encoder:
            return 0  # bidirectional attention within the step: nothing is cached
        attn = self.model.layers[0].self_attn
        per_token = 2 * attn.num_kv_heads * attn.head_size * self.kv_dtype.itemsize
        return per_token * self.block_size * self.arch.num_layers

    def allocate_kv_cache(self, num_blocks: int) -> None:
        if self.arch.is_encoder:
            self.kv_caches = []
            return
        attn = self.model.layers[0].self_attn
        # Keys are dimension-major inside a block, values token-major (see kvloom.kernels.torch_ref).
        k_shape = (num_blocks, attn.num_kv_heads, attn.head_size, self.block_size)
        v_shape = (num_blocks, attn.num_kv_heads, self.block_size, attn.head_size)
        self.kv_caches = [
            (_zeros(k_shape, self.kv_dtype, self.device), _zeros(v_shape, self.kv_dtype, self.device))
            for _ in range(self.arch.num_layers)
        ]

    def profile_peak_memory(self, num_tokens: int) -> int:
        """Peak device memory of a forward pass over num_tokens prompt tokens (CUDA only)."""
        torch.cuda.reset_peak_memory_stats(self.device)
        self.allocate_kv_cache(1)
        # One long prefill never reads the cache, so a one-block cache (slots overwritten) serves.
        seq = ScheduledSeq("profile", [0] * num_tokens, 0, [0] * (-(-num_tokens // self.block_size)), True)
        with torch.inference_mode():
            ids, pos, meta, last = self._prepare_inputs([seq])
            meta.slot_mapping = meta.slot_mapping % self.block_size
            self.model.compute_logits(self.model(ids, pos, self.kv_caches, meta)[last])
        torch.cuda.synchronize(self.device)
        self.kv_caches = []
        return torch.cuda.max_memory_allocated(self.device)

    # ---- one step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in out.finished_req_ids:
            self.states.pop(req_id, None)
            self.pooling.pop(req_id, None)
            self.req_lora.pop(req_id, None)
        for new in out.new_requests:
            if new.pooling_params is not None:
                self.pooling[new.req_id] = new.pooling_params
                continue
            self.states[new.req_id] = self._new_state(new.sampling_params, new.prompt_token_ids)
            if new.lora_id:
                self.req_lora[new.req_id] = new.lora_id
        if out.is_empty:
            return ModelRunnerOutput()

        # Decodes first, then prefill chunks (the layout AttentionMetadata expects); within each,
        # requests of one adapter side by side so that LoRA runs one matmul per adapter.
        if out.lora_loads:
            self.lora.load_slots(out.lora_loads)
        slot_of = out.lora_mapping
        slot = lambda s: slot_of.get(self.req_lora.get(s.req_id, 0), -1)
        seqs = sorted(out.seqs, key=lambda s: (len(s.token_ids) > 1, slot(s)))
        input_ids, positions, meta, last_index = self._prepare_inputs(seqs)
        if slot_of:
            self.lora.ctx.meta = LoRAMetadata.from_token_slots(
                [slot(s) for s in seqs], [len(s.token_ids) for s in seqs], self.device
            )
        try:
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
        finally:
            if self.lora is not None:
                self.lora.ctx.meta = None
        if self.pooling:
            return self._pool(seqs, hidden, last_index)

        sampling = [i for i, s in enumerate(seqs) if s.do_sample]
        result = ModelRunnerOutput(req_ids=[seqs[i].req_id for i in sampling])
        # A sequence with speculative guesses is scored at its last num_spec + 1 positions.
        rows: list[int] = []
        for i in sampling:
            rows.extend(range(last_index[i] - seqs[i].num_spec, last_index[i] + 1))
        # Every collective (the logits gathers) runs first, on every rank in the same order; rank 0
        # alone then masks and samples, so an error there cannot leave another rank in a collective.
        logits = self.model.compute_logits(hidden[rows]) if sampling else None
        reported = self._prompt_logprobs(seqs, hidden, last_index, result)
        if self.tp.rank != 0:
            return ModelRunnerOutput()
        if sampling:
            if len(rows) == len(sampling):
                self._sample(logits, result, out.grammar_bitmask)
            else:
                self._sample_speculative(logits, [seqs[i] for i in sampling], result, out.grammar_bitmask)
        # Only a step that succeeded leaves a trace: a failed one can be re-run (the engine core
        # isolates the request that failed it).
        for state, end in reported:
            state.num_prompt_logprobs = end
        accepted = result.accepted_draft_ids or [()] * len(result.req_ids)
        for req_id, drafts, token in zip(result.req_ids, accepted, result.sampled_token_ids):
            self.states[req_id].output_token_ids.extend((*drafts, token))
        return result

    def _pool(self, seqs: list[ScheduledSeq], hidden: torch.Tensor, last_index: list[int]) -> ModelRunnerOutput:
        """The embedding of every request whose prompt this step computed (rank 0; hidden is full on every rank)."""
        assert all(s.req_id in self.pooling for s in seqs), "a pooling engine runs only embedding requests"
        done = [i for i, s in enumerate(seqs) if s.do_sample]
        if self.tp.rank != 0 or not done:
            return ModelRunnerOutput()
        # Prompts are never chunked or prefix-cached in a pooling engine: each is whole in this step.
        assert all(seqs[i].start_pos == 0 for i in done)
        lens = [len(seqs[i].token_ids) for i in done]
        starts = [last_index[i] - n + 1 for i, n in zip(done, lens)]
        vectors = pool(hidden, starts, lens, [self.pooling[seqs[i].req_id] for i in done])
        return ModelRunnerOutput(pooler_output={seqs[i].req_id: v for i, v in zip(done, vectors)})

    def _sample(self, logits: torch.Tensor, result: ModelRunnerOutput, grammar) -> None:
        """One token per sampled sequence (logits: one row each, in result.req_ids order)."""
        if grammar is not None:
            self._apply_grammar(logits, result.req_ids, grammar)
        states = [self.states[rid] for rid in result.req_ids]
        result.sampled_token_ids, result.logprobs = self.sampler(logits, states)

    def _sample_speculative(self, logits: torch.Tensor, seqs: list[ScheduledSeq], result, grammar) -> None:
        """A step with guesses: plain sequences sample one token; the others verify their guesses."""
        starts, row = [], 0
        for s in seqs:
            starts.append(row)
            row += s.num_spec + 1
        plain = [k for k, s in enumerate(seqs) if not s.num_spec]
        tokens: list[int] = [0] * len(seqs)
        accepted: list[list[int]] = [[] for _ in seqs]
        logprobs = None
        if plain:
            sub = ModelRunnerOutput(req_ids=[seqs[k].req_id for k in plain])
            self._sample(logits[[starts[k] + seqs[k].num_spec for k in plain]], sub, grammar)
            for k, token in zip(plain, sub.sampled_token_ids):
                tokens[k] = token
            if sub.logprobs is not None:
                logprobs = [None] * len(seqs)
                for k, lp in zip(plain, sub.logprobs):
                    logprobs[k] = lp
        for k, s in enumerate(seqs):
            if s.num_spec:
                rows = logits[starts[k] : starts[k] + s.num_spec + 1]
                *accepted[k], tokens[k] = self.sampler.verify(rows, self.states[s.req_id], s.token_ids[-s.num_spec :])
        result.sampled_token_ids, result.accepted_draft_ids, result.logprobs = tokens, accepted, logprobs

    def _apply_grammar(self, logits: torch.Tensor, req_ids: list[str], grammar) -> None:
        """Forbid, in the constrained requests' rows, every token their grammar does not allow now."""
        row_of = {rid: i for i, rid in enumerate(req_ids)}
        rows = torch.tensor([row_of[rid] for rid in grammar.req_ids], device=logits.device)
        self.kernels.apply_token_bitmask(logits, grammar.bitmask.to(logits.device), rows)

    def _new_state(self, params, prompt_token_ids: list[int]) -> SamplingState:
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        blocked = []
        if params.min_tokens:
            blocked = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids)))
        return SamplingState(params, prompt_token_ids, generator=generator, min_tokens_blocked=blocked)

    def _prepare_inputs(self, seqs: list[ScheduledSeq]):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_index: list[int] = []
        for s in seqs:
            input_ids.extend(s.token_ids)
            span = range(s.start_pos, s.start_pos + len(s.token_ids))
            positions.extend(span)
            # Plain Python: torch.repeat_interleave and fancy indexing took ~3 ms of a 64-sequence decode step.
            blocks = s.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in span)
            last_index.append(len(input_ids) - 1)
        pos = torch.tensor(positions, dtype=torch.long)
        table = _block_table([s.block_ids for s in seqs])
        slot_mapping = torch.tensor(slots, dtype=torch.long)

        nd = sum(1 for s in seqs if len(s.token_ids) == 1)
        decode_tables = decode_lens = prefill_tables = None
        if nd:
            decode_lens = torch.tensor([s.start_pos + 1 for s in seqs[:nd]])
            max_blocks = int((decode_lens.max() + bs - 1) // bs)
            decode_tables = table[:nd, :max_blocks]
        prefills = []
        start = nd
        for s in seqs[nd:]:
            prefills.append((start, len(s.token_ids), s.start_pos + len(s.token_ids)))
            start += len(s.token_ids)
        if len(seqs) > nd:
            prefill_tables = table[nd:]
        meta = AttentionMetadata(
            bs,
            slot_mapping.to(self.device),
            nd,
            _to(decode_tables, self.device),
            _to(decode_lens, self.device),
            prefills,
            _to(prefill_tables, self.device),
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        return ids, pos.to(self.device), meta, last_index

    def _prompt_logprobs(self, seqs, hidden, last_index, result: ModelRunnerOutput) -> list:
        """Fill result.prompt_logprobs (rank 0); returns (state, positions reported) to record once the step succeeds.

        The logits of every prompt position in the chunk are computed on every rank, whatever was
        reported before: the gathers then depend only on the step, never on a rank's own history.
        """
        reported = []
        for i, s in enumerate(seqs):
            state = self.states[s.req_id]
            k = state.params.prompt_logprobs
            if k is None:
                continue
            # Position p's logits score prompt token p + 1.
            lo = s.start_pos
            hi = min(s.start_pos + len(s.token_ids), len(state.prompt_token_ids) - 1)
            logits = None
            if lo < hi:
                first = last_index[i] - len(s.token_ids) + 1
                logits = self.model.compute_logits(hidden[first : first + hi - lo])
            if self.tp.rank != 0:
                continue
            # A request recomputed after preemption does not report positions it already reported.
            begin = max(lo, state.num_prompt_logprobs)
            if begin >= hi and s.start_pos > 0:
                continue
            entries: list[Logprobs] = []
            if begin < hi:
                rows = torch.log_softmax(logits[begin - lo :], dim=-1)
                targets = state.prompt_token_ids[begin + 1 : hi + 1]
                entries = [logprobs_row(rows[j], t, k) for j, t in enumerate(targets)]
                reported.append((state, hi))
            result.prompt_logprobs[s.req_id] = entries
        return reported


class _FactoryDtype(TorchFunctionMode):
    """Give floating tensor factories called without a dtype (empty, zeros, ones) this dtype."""

    _FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones})

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._FACTORIES and kwargs.get("dtype") is None:
            kwargs["dtype"] = self.dtype
        return func(*args, **kwargs)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor; on CPU backed by an anonymous mapping that asks for huge pages.

    Decode attention touches blocks all over the cache; huge pages spare it most TLB misses, and
    the kernel zero-fills the mapping lazily, so allocating a large cache costs no start-up time.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    buf = mmap.mmap(-1, max(numel * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    # frombuffer keeps a reference to the mapping for the tensor's lifetime.
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)


def _block_table(block_ids: list[list[int]]) -> torch.Tensor:
    width = max(len(b) for b in block_ids)
    # Padding points at the null block 0; masks keep it out of every result.
    return torch.tensor([b + [0] * (width - len(b)) for b in block_ids], dtype=torch.long)


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)
