"""Qwen3, Phi-3, Gemma 2, Gemma 3 and sliding-window Mistral: greedy output equal to transformers
(float32) on tiny random models, on the C++ and the torch attention paths, with chunked prefill and
prefix cache hits whose context is longer than the window; the windowed / soft-capped kernels
against a dense reference."""

from __future__ import annotations

import math
import random

import pytest
import torch

from kvloom import LLM, SamplingParams
from kvloom.engine.models.arch import ArchConfig
from kvloom.kernels import AttentionMetadata, cpu_ops, torch_ref
from kvloom.kernels.cpu_ops import load_cpu_ops

from kvloom_testing import assert_all_blocks_free, build_peft_adapter, build_tokenizer, peft_greedy

WINDOW = 8
COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.15,
    tie_word_embeddings=False,
)
# Per architecture: the transformers config class and what differs from COMMON.
ARCHS = {
    "qwen3": ("Qwen3Config", dict(head_dim=32)),  # head_dim != hidden_size / heads
    "phi3": ("Phi3Config", dict(partial_rotary_factor=0.5, sliding_window=WINDOW)),
    "gemma2": (
        "Gemma2Config",
        dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            attn_logit_softcapping=2.0,  # small, so that the cap changes the attention weights
            final_logit_softcapping=3.0,
            tie_word_embeddings=True,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            final_logit_softcapping=None,
            tie_word_embeddings=True,
        ),
    ),
    "mistral_sw": ("MistralConfig", dict(sliding_window=16)),
}


def build_arch_model(path: str, arch: str, seed: int = 0) -> str:
    """A tiny random transformers model of `arch` saved with a small BPE tokenizer; norm weights are
    randomized too (Gemma's start at zero, Qwen3's q/k norms at one), so every norm's weight matters."""
    import transformers
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(path)
    cls_name, overrides = ARCHS[arch]
    kwargs = COMMON | dict(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=0) | overrides
    cfg = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory):
    built: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in built:
            built[arch] = build_arch_model(str(tmp_path_factory.mktemp(arch)), arch)
        return built[arch]

    return get


_HF: dict = {}


def hf_greedy(model_dir: str, prompt: list[int], n: int) -> list[int]:
    key = (model_dir, tuple(prompt), n)
    if key not in _HF:
        _HF[key] = peft_greedy(model_dir, None, prompt, n)
    return _HF[key]


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]


GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def check(llm: LLM, model_dir: str, batch: list[list[int]]) -> None:
    outs = llm.generate(batch, GREEDY, use_tqdm=False)
    for prompt, out in zip(batch, outs):
        assert out.outputs[0].token_ids == hf_greedy(model_dir, prompt, GREEDY.max_tokens), len(prompt)
    assert_all_blocks_free(llm.llm_engine)


def kernels_of(llm: LLM) -> str:
    return llm.llm_engine.executor.worker.runner.model.layers[0].self_attn.kernels.name


@pytest.fixture
def torch_kernels(monkeypatch):
    """Engines created inside the test use the pure-torch kernels (the setting is read once per process)."""
    monkeypatch.setenv("KVLOOM_DISABLE_CPU_KERNELS", "1")
    monkeypatch.setattr(cpu_ops, "_loaded", {})


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_matches_transformers_cpp_kernels_chunked_prefill(arch_dir, arch):
    if load_cpu_ops() is None:
        pytest.skip("no C++ toolchain: the torch path is tested below")
    model_dir = arch_dir(arch)
    # 16 tokens per step: the 45-token prompt runs in chunks whose context exceeds the window.
    llm = LLM(model_dir, dtype="float32", num_gpu_blocks_override=64, max_num_batched_tokens=16)
    assert kernels_of(llm) == "cpu-c++"
    check(llm, model_dir, prompts([5, 30, 45], seed=1))


# Qwen3 has no window or soft cap, so its torch path is the Llama one (tests/engine/test_parity.py).
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "qwen3"])
def test_greedy_matches_transformers_torch_kernels(arch_dir, arch, torch_kernels):
    model_dir = arch_dir(arch)
    llm = LLM(model_dir, dtype="float32", num_gpu_blocks_override=64)
    assert kernels_of(llm) == "torch"
    check(llm, model_dir, prompts([5, 30, 45], seed=1))


@pytest.mark.parametrize("arch", ["gemma2", "mistral_sw"])
def test_prefix_cache_hit_longer_than_window(arch_dir, arch):
    model_dir = arch_dir(arch)
    llm = LLM(model_dir, dtype="float32", num_gpu_blocks_override=64, max_num_batched_tokens=16)
    shared = prompts([40], seed=4)[0]
    batch = [shared + tail for tail in prompts([5, 19], seed=5)] + [shared[:32]]
    check(llm, model_dir, batch[:1])
    check(llm, model_dir, batch)
    assert llm.get_metrics()["prefix_cache_hits"] > 0


def test_gemma2_logprobs_are_soft_capped(arch_dir):
    """The final soft cap does not change a greedy choice, so compare log-probabilities with transformers."""
    from transformers import AutoModelForCausalLM

    model_dir = arch_dir("gemma2")
    prompt = prompts([20], seed=7)[0]
    llm = LLM(model_dir, dtype="float32", num_gpu_blocks_override=32)
    out = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=4, logprobs=1, ignore_eos=True), use_tqdm=False
    )[0]
    ids = out.outputs[0].token_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
    assert logits.abs().max() > 2.0  # near the cap (3.0), where capping changes the distribution
    want = torch.log_softmax(logits, dim=-1)
    for i, (tok, lp) in enumerate(zip(ids, out.outputs[0].logprobs)):
        assert math.isclose(lp[tok].logprob, want[i, tok].item(), abs_tol=1e-4)


def test_qwen3_and_gemma3_lora_match_peft(arch_dir, tmp_path):
    """q/k norms and head_dim != hidden / heads leave LoRA's projection shapes as PEFT sees them."""
    from kvloom import LoRARequest

    for arch in ("qwen3", "gemma3"):
        model_dir = arch_dir(arch)
        adapter = build_peft_adapter(model_dir, str(tmp_path / arch), r=4, seed=3)
        llm = LLM(model_dir, dtype="float32", num_gpu_blocks_override=32, enable_lora=True, max_lora_rank=8)
        prompt = prompts([12], seed=9)[0]
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        out = llm.generate([prompt], params, lora_request=LoRARequest("a", 1, adapter), use_tqdm=False)[0]
        assert out.outputs[0].token_ids == peft_greedy(model_dir, adapter, prompt, 12)


@pytest.mark.parametrize("arch", ["phi3", "gemma3"])
def test_tensor_parallel_matches_transformers(arch_dir, arch):
    """2 ranks: fused Phi-3 tensors split per rank, replicated Gemma norms, windows per rank's heads."""
    model_dir = arch_dir(arch)
    llm = LLM(model_dir, dtype="float32", tensor_parallel_size=2, num_gpu_blocks_override=64, max_num_batched_tokens=16)
    try:
        check(llm, model_dir, prompts([5, 30, 45], seed=1))
    finally:
        llm.shutdown()


def test_phi3_lora_is_refused(arch_dir):
    with pytest.raises(ValueError, match="LoRA is not supported for Phi3ForCausalLM"):
        LLM(arch_dir("phi3"), dtype="float32", num_gpu_blocks_override=16, enable_lora=True)


# ---- config parsing ----------------------------------------------------------------------------
def _cfg(arch: str, **extra) -> dict:
    base = dict(
        architectures=[arch],
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=6,
        num_attention_heads=2,
        max_position_embeddings=256,
    )
    return base | extra


def test_gemma3_original_config_layout():
    """Hub Gemma 3 configs: rope_theta / rope_local_base_freq / rope_scaling (global layers only)."""
    c = ArchConfig.from_hf_config(
        _cfg(
            "Gemma3ForCausalLM",
            sliding_window=32,
            sliding_window_pattern=3,
            rope_theta=1e6,
            rope_local_base_freq=1e4,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            query_pre_attn_scalar=16,
        )
    )
    assert c.sliding_windows == (32, 32, None, 32, 32, None)
    assert (c.rope_theta, c.local_rope_theta, c.rope_scaling) == (1e6, 1e4, {"rope_type": "linear", "factor": 8.0})
    assert c.attn_logit_softcap is None and c.query_pre_attn_scalar == 16


def test_window_layouts_per_architecture():
    gemma2 = ArchConfig.from_hf_config(_cfg("Gemma2ForCausalLM", sliding_window=8, final_logit_softcapping=None))
    assert gemma2.sliding_windows == (8, None) * 3 and gemma2.tie_word_embeddings
    # Absent soft caps take transformers' Gemma 2 defaults; null turns one off.
    assert gemma2.attn_logit_softcap == 50.0 and gemma2.final_logit_softcap is None
    assert ArchConfig.from_hf_config(_cfg("MistralForCausalLM", sliding_window=8)).sliding_windows == (8,) * 6
    assert ArchConfig.from_hf_config(_cfg("MistralForCausalLM", sliding_window=None)).sliding_windows == ()
    # Qwen2 keeps sliding_window in its config but applies it only with use_sliding_window.
    assert ArchConfig.from_hf_config(_cfg("Qwen2ForCausalLM", sliding_window=8)).sliding_windows == ()
    qwen2 = _cfg("Qwen2ForCausalLM", sliding_window=8, use_sliding_window=True, max_window_layers=4)
    assert ArchConfig.from_hf_config(qwen2).sliding_windows == (None,) * 4 + (8,) * 2
    phi3 = ArchConfig.from_hf_config(_cfg("Phi3ForCausalLM", partial_rotary_factor=0.75, attention_bias=True))
    assert phi3.partial_rotary_factor == 0.75 and not phi3.attention_bias


@pytest.mark.parametrize(
    "arch,extra,match",
    [
        ("Phi3ForCausalLM", dict(rope_scaling={"type": "longrope", "short_factor": [1.0]}), "longrope"),
        ("Phi3ForCausalLM", dict(rope_scaling={"type": "su"}), "'su'"),
        ("Gemma3ForCausalLM", dict(sliding_window=8, attn_logit_softcapping=50.0), "attn_logit_softcapping"),
        ("Gemma2ForCausalLM", dict(sliding_window=8, use_bidirectional_attention=True), "use_bidirectional"),
        ("Gemma2ForCausalLM", dict(sliding_window=8, hidden_activation="gelu"), "hidden_activation"),
        ("Gemma2ForCausalLM", dict(sliding_window=None), "sliding_window"),
        ("Qwen3ForCausalLM", dict(layer_types=["chunked_attention"] * 6), "chunked_attention"),
        ("Qwen3ForCausalLM", dict(hidden_act="gelu"), "hidden_act"),
        (
            "Gemma3ForCausalLM",
            dict(sliding_window=8, rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
            "sliding-window layers",
        ),
    ],
)
def test_unsupported_settings_are_refused(arch, extra, match):
    with pytest.raises(ValueError, match=match):
        ArchConfig.from_hf_config(_cfg(arch, **extra))


# ---- kernels ---------------------------------------------------------------------------------------
def dense_windowed(q, k, v, pos, scale, window, cap):
    """One query ([H, D]) at position pos against k/v [pos + 1, kvH, D], the plainest way."""
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,lhd->hl", q, k) * scale
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    if window is not None:
        scores[:, : max(0, pos + 1 - window)] = float("-inf")
    return torch.einsum("hl,lhd->hd", scores.softmax(-1), v)


def paged_batch(ctx: list[int], q_lens: list[int], heads: int, kv_heads: int, d: int, bs: int, seed: int):
    """Random K/V for each sequence spread over shuffled blocks, and the step's metadata (decodes first)."""
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-n // bs) for n in ctx]
    total = sum(nblk) + 1
    k_cache = torch.zeros(total, kv_heads, d, bs)
    v_cache = torch.zeros(total, kv_heads, bs, d)
    order = (torch.randperm(total - 1, generator=g) + 1).tolist()
    tables, dense = torch.zeros(len(ctx), max(nblk), dtype=torch.long), []
    for i, n in enumerate(ctx):
        tables[i, : nblk[i]] = torch.tensor(order[: nblk[i]])
        order = order[nblk[i] :]
        k, v = torch.randn(n, kv_heads, d, generator=g), torch.randn(n, kv_heads, d, generator=g)
        slots = torch.cat([torch.arange(b * bs, (b + 1) * bs) for b in tables[i, : nblk[i]]])[:n]
        torch_ref.write_kv(k, v, k_cache, v_cache, slots)
        dense.append((k, v))
    nd = sum(1 for n in q_lens if n == 1)
    prefills, start = [], nd
    for i in range(nd, len(ctx)):
        prefills.append((start, q_lens[i], ctx[i]))
        start += q_lens[i]
    meta = AttentionMetadata(
        block_size=bs,
        slot_mapping=torch.zeros(sum(q_lens), dtype=torch.long),
        num_decodes=nd,
        decode_block_tables=tables[:nd],
        decode_seq_lens=torch.tensor(ctx[:nd]),
        prefills=prefills,
        prefill_block_tables=tables[nd:],
    )
    q = torch.randn(sum(q_lens), heads, d, generator=g)
    key = torch.cat([dense[i][0][ctx[i] - q_lens[i] :] for i in range(len(ctx))])
    value = torch.cat([dense[i][1][ctx[i] - q_lens[i] :] for i in range(len(ctx))])
    return q, key, value, k_cache, v_cache, meta, dense


@pytest.mark.parametrize("window,cap", [(5, None), (None, 2.0), (12, 1.5), (100, None)])
def test_torch_paged_attention_window_and_soft_cap_match_dense(window, cap):
    # Decodes inside and beyond the window, a fresh prefill longer than it, and a chunk over cached context.
    ctx, q_lens = [3, 37, 20, 45, 33], [1, 1, 20, 10, 7]
    q, key, value, k_cache, v_cache, meta, dense = paged_batch(ctx, q_lens, 4, 2, 32, 8, seed=0)
    out = torch_ref.paged_attention(
        q, key, value, k_cache, v_cache, meta, 0.3, sliding_window=window, logits_soft_cap=cap
    )
    row = 0
    for i, (n, ql) in enumerate(zip(ctx, q_lens)):
        for j in range(ql):
            pos = n - ql + j
            k, v = dense[i][0][: pos + 1], dense[i][1][: pos + 1]
            want = dense_windowed(q[row], k, v, pos, 0.3, window, cap)
            torch.testing.assert_close(out[row], want, rtol=1e-5, atol=1e-5)
            row += 1


@pytest.mark.parametrize("heads,kv_heads,head_size", [(4, 2, 32), (8, 2, 64), (4, 4, 128), (6, 3, 48)])
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("window,cap", [(7, None), (16, 2.0), (None, 1.5), (40, 30.0)])
def test_cpu_kernel_window_and_soft_cap_match_torch(heads, kv_heads, head_size, block_size, window, cap):
    ops = load_cpu_ops()
    if ops is None:
        pytest.skip("no C++ toolchain: the torch path is used")
    ctx = [1, 7, 16, 17, 33, 70]
    q, _, _, k_cache, v_cache, meta, _ = paged_batch(ctx, [1] * len(ctx), heads, kv_heads, head_size, block_size, 1)
    lens, tables = meta.decode_seq_lens, meta.decode_block_tables
    ref = torch_ref.decode_attention_ref(q, k_cache, v_cache, tables, lens, block_size, 0.2, window, cap)
    out = ops.paged_attention_decode(q, k_cache, v_cache, tables, lens, block_size, 0.2, window or 0, cap or 0.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
