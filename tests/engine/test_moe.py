"""Mixture-of-experts models (Mixtral, Qwen2-MoE): greedy output equals transformers in float32,
and the batched expert dispatch equals a per-token reference."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kvloom import LLM, SamplingParams
from kvloom.engine.layers.moe import fused_experts, select_experts

from kvloom_testing import assert_all_blocks_free, build_tokenizer, peft_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.15,
    tie_word_embeddings=False,
    num_experts_per_tok=2,
)


def _save(model, path: str, tok) -> str:
    model.config.eos_token_id, model.config.bos_token_id = tok.eos_token_id, tok.bos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_mixtral(path: str, seed: int = 0, **overrides) -> str:
    from transformers import MixtralConfig, MixtralForCausalLM

    tok = build_tokenizer(path)
    torch.manual_seed(seed)
    cfg = MixtralConfig(**{**COMMON, "intermediate_size": 96, "num_local_experts": 4, **overrides})
    return _save(MixtralForCausalLM(cfg), path, tok)


def build_tiny_qwen2_moe(path: str, seed: int = 1) -> str:
    """Layer 0 sparse (4 experts, top-2 not renormalized, a gated shared expert), layer 1 dense."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    tok = build_tokenizer(path)
    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(
        **COMMON,
        intermediate_size=128,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=80,
        num_experts=4,
        norm_topk_prob=False,
        mlp_only_layers=[1],
    )
    model = Qwen2MoeForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:  # non-zero q/k/v biases so the bias path matters
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.3)
    return _save(model, path, tok)


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory) -> str:
    return build_tiny_mixtral(str(tmp_path_factory.mktemp("tiny-mixtral")))


@pytest.fixture(scope="module")
def tiny_qwen2_moe(tmp_path_factory) -> str:
    return build_tiny_qwen2_moe(str(tmp_path_factory.mktemp("tiny-qwen2-moe")))


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]


_HF: dict = {}


def check_against_transformers(llm: LLM, model_dir: str, batch: list[list[int]]) -> None:
    outs = llm.generate(batch, GREEDY, use_tqdm=False)
    for prompt, out in zip(batch, outs):
        key = (model_dir, tuple(prompt))
        if key not in _HF:
            _HF[key] = peft_greedy(model_dir, None, prompt, GREEDY.max_tokens)
        assert out.outputs[0].token_ids == _HF[key]
    assert_all_blocks_free(llm.llm_engine)


@pytest.mark.parametrize("model", ["tiny_mixtral", "tiny_qwen2_moe"])
def test_greedy_batch_and_chunked_prefill_match_transformers(model, request):
    model_dir = request.getfixturevalue(model)
    batch = prompts([7, 33, 50], seed=0)
    check_against_transformers(LLM(model_dir, dtype="float32", num_gpu_blocks_override=64), model_dir, batch)
    # 16 tokens per step: prompts are split into chunks that run alongside other requests' decodes.
    chunked = LLM(model_dir, dtype="float32", num_gpu_blocks_override=64, max_num_batched_tokens=16)
    check_against_transformers(chunked, model_dir, batch)


def _copy_checkpoint(src: str, dst: Path, rewrite) -> None:
    """Copy src's files into dst, its safetensors tensors passed through rewrite(dict) -> dict."""
    for f in Path(src).iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = rewrite(load_file(str(Path(src) / "model.safetensors")))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def _stacked(tensors: dict) -> dict:
    """Mixtral's per-expert w1/w3/w2 as transformers 5's in-memory 3-D experts.gate_up_proj / down_proj."""
    out = {k.replace(".block_sparse_moe.", ".mlp."): t for k, t in tensors.items() if ".experts." not in k}
    for layer in sorted({k.split(".block_sparse_moe.")[0] for k in tensors if ".experts." in k}):
        experts = f"{layer}.block_sparse_moe.experts"
        num = len([k for k in tensors if k.startswith(experts) and k.endswith(".w2.weight")])
        w = {p: [tensors[f"{experts}.{e}.{p}.weight"] for e in range(num)] for p in ("w1", "w3", "w2")}
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat(gu) for gu in zip(w["w1"], w["w3"])])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack(w["w2"])
    return out


def test_stacked_expert_layout_loads_the_same(tiny_mixtral, tmp_path):
    from safetensors import safe_open

    with safe_open(str(Path(tiny_mixtral) / "model.safetensors"), "pt") as f:
        # save_pretrained writes the per-expert layout, which the parity tests load.
        assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in set(f.keys())
    (tmp_path / "stacked").mkdir()
    _copy_checkpoint(tiny_mixtral, tmp_path / "stacked", _stacked)
    batch, short = prompts([20], seed=3), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    per_expert = LLM(tiny_mixtral, dtype="float32", num_gpu_blocks_override=32)
    stacked = LLM(str(tmp_path / "stacked"), dtype="float32", num_gpu_blocks_override=32)
    want = [o.outputs[0].token_ids for o in per_expert.generate(batch, short, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in stacked.generate(batch, short, use_tqdm=False)] == want
    # One expert missing from the checkpoint is an error naming the layer, never random weights.
    (tmp_path / "missing").mkdir()
    drop = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    _copy_checkpoint(tiny_mixtral, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != drop})
    with pytest.raises(ValueError, match=r"missing some experts.*layers\.1\.mlp\.experts\.gate_up_proj"):
        LLM(str(tmp_path / "missing"), dtype="float32", num_gpu_blocks_override=32)


def _naive_moe(x, router, gate_up, down, top_k, renormalize):
    """Token by token, expert by expert, as the models are written down."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ router.T, dim=-1)
        weights, ids = torch.topk(probs, top_k)
        if renormalize:
            weights = weights / weights.sum()
        for w, e in zip(weights, ids.tolist()):
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            out[t] += w * (down[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k, renormalize", [(1, 4, 2, True), (37, 8, 2, False), (64, 6, 3, True)]
)
def test_batched_dispatch_matches_per_token_reference(num_tokens, num_experts, top_k, renormalize):
    gen = torch.Generator().manual_seed(num_tokens)
    hidden, inter = 32, 24
    x = torch.randn(num_tokens, hidden, generator=gen)
    router = torch.randn(num_experts, hidden, generator=gen)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    down = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    weights, ids = select_experts(x @ router.T, top_k, renormalize)
    silu_and_mul = lambda h: F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1]  # noqa: E731
    got = fused_experts(x, gate_up, down, weights, ids, silu_and_mul)
    want = _naive_moe(x, router, gate_up, down, top_k, renormalize)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Experts that receive no token are skipped, and their weights never read.
    unused = torch.ones(num_experts, dtype=torch.bool)
    unused[ids.unique()] = False
    if unused.any():
        poisoned = gate_up.clone()
        poisoned[unused] = float("nan")
        torch.testing.assert_close(fused_experts(x, poisoned, down, weights, ids, silu_and_mul), got)


def test_unsupported_moe_settings_are_refused(tiny_mixtral, tmp_path):
    with pytest.raises(ValueError, match="LoRA is not supported for mixture-of-experts"):
        LLM(tiny_mixtral, dtype="float32", num_gpu_blocks_override=32, enable_lora=True)
    for f in Path(tiny_mixtral).iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": 64}))
    with pytest.raises(ValueError, match="sliding-window"):
        LLM(str(tmp_path), dtype="float32", num_gpu_blocks_override=32)
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        LLM(str(tmp_path), dtype="float32", num_gpu_blocks_override=32)


def test_tp2_greedy_equals_tp1(tiny_qwen2_moe):
    """Every rank holds all experts, each with its slice of the intermediate dimension (and of the
    shared expert's and the dense layer's MLP)."""
    model_dir = tiny_qwen2_moe
    batch = prompts([5, 30, 18], seed=4)
    engine = dict(dtype="float32", num_gpu_blocks_override=32, max_num_batched_tokens=16)
    one = LLM(model_dir, **engine)
    want = [o.outputs[0].token_ids for o in one.generate(batch, GREEDY, use_tqdm=False)]
    one.shutdown()
    two = LLM(model_dir, tensor_parallel_size=2, **engine)
    try:
        assert [o.outputs[0].token_ids for o in two.generate(batch, GREEDY, use_tqdm=False)] == want
    finally:
        two.shutdown()
