"""Quantized weights: int8/int4 layers vs float matmuls, GPTQ/AWQ/FP8/GGUF checkpoints vs the dequantized model.

No library here quantizes to GPTQ/AWQ on a CPU (gptqmodel and autoawq need CUDA), so the test packs
round-to-nearest int4 weights itself, following each format's documented layout: GPTQ packs 8
nibbles of consecutive input rows per int32 (qweight [in/8, out]) and stores zero - 1 (v1) in
qzeros [groups, out/8]; AWQ (GEMM) packs along the output with the nibble order [0, 2, 4, 6, 1, 3,
5, 7]. The reference model is the same checkpoint dequantized to float32 and run by transformers.
GGUF blocks are made by the `gguf` package (gguf.quants.quantize + GGUFWriter).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kvloom import LLM, SamplingParams
from kvloom.engine.arg_utils import EngineArgs
from kvloom.engine.layers.linear import ColumnParallelLinear
from kvloom.engine.layers.quant import QuantConfig, QuantizedLinearMethod, int4_quantize

from kvloom_testing import build_peft_adapter, peft_greedy

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP = 32
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
N_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True)


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in (5, 17, 33)]


# ---- writing checkpoints -------------------------------------------------------------------------
def _rtn_int4(w: torch.Tensor, group: int):
    """Round-to-nearest asymmetric int4 per group (what GPTQ/AWQ store): q, zero (ints) and fp16 scale [N, G]."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-5).half().float()
    zero = torch.round(-lo / scale).clamp(1, 15)  # GPTQ v1 stores zero - 1, so zero 0 has no encoding
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, 15)
    return q.reshape(n, k).to(torch.int64), zero.to(torch.int64), scale


def _pack_nibbles(cols: list[torch.Tensor]) -> torch.Tensor:
    """8 int tensors of the same shape -> one int32 tensor, tensor i in bits 4i..4i+3."""
    acc = np.zeros(cols[0].shape, dtype=np.uint32)
    for i, c in enumerate(cols):
        acc |= c.numpy().astype(np.uint32) << np.uint32(4 * i)
    return torch.from_numpy(acc.view(np.int32))


def _pack_gptq(q, zero, scale) -> dict[str, torch.Tensor]:
    qt, zt = q.T, zero.T  # [K, N], [G, N]
    k = qt.shape[0]
    return {
        "qweight": _pack_nibbles([qt[j::8] for j in range(8)]),  # row r holds input rows 8r..8r+7
        "qzeros": _pack_nibbles([(zt - 1)[:, j::8] for j in range(8)]),  # GPTQ v1 stores zero - 1
        "scales": scale.T.half().contiguous(),
        "g_idx": (torch.arange(k) // GROUP).to(torch.int32),
    }


def _pack_awq(q, zero, scale) -> dict[str, torch.Tensor]:
    qt, zt = q.T, zero.T
    return {
        "qweight": _pack_nibbles([qt[:, AWQ_ORDER[i] :: 8] for i in range(8)]),
        "qzeros": _pack_nibbles([zt[:, AWQ_ORDER[i] :: 8] for i in range(8)]),
        "scales": scale.T.half().contiguous(),
    }


def _copy_model_files(src: str, dst: Path) -> dict:
    dst.mkdir(parents=True, exist_ok=True)
    for p in Path(src).iterdir():
        if p.suffix != ".safetensors":
            shutil.copy(p, dst / p.name)
    return json.loads((dst / "config.json").read_text())


def _write(dst: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> str:
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    return str(dst)


def _is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEARS


def make_int4_checkpoint(float_dir: str, root: Path, fmt: str) -> tuple[str, str]:
    """(a GPTQ or AWQ checkpoint of float_dir's model, the same weights dequantized in float32)."""
    weights = load_file(str(Path(float_dir) / "model.safetensors"))
    quant, deq = {}, {}
    for name, w in weights.items():
        if not _is_linear(name):
            quant[name] = deq[name] = w
            continue
        q, zero, scale = _rtn_int4(w.float(), GROUP)
        module = name.removesuffix(".weight")
        packed = _pack_gptq(q, zero, scale) if fmt == "gptq" else _pack_awq(q, zero, scale)
        quant.update({f"{module}.{k}": v for k, v in packed.items()})
        zero_full = zero.repeat_interleave(GROUP, 1)
        deq[name] = ((q - zero_full).float() * scale.repeat_interleave(GROUP, 1)).contiguous()
    cfg = _copy_model_files(float_dir, root / fmt)
    _copy_model_files(float_dir, root / f"{fmt}-dequantized")
    qc = {"quant_method": fmt, "bits": 4, "group_size": GROUP}
    qc.update({"desc_act": False, "sym": False, "checkpoint_format": "gptq"} if fmt == "gptq" else {})
    qc.update({"zero_point": True, "version": "gemm"} if fmt == "awq" else {})
    qdir = _write(root / fmt, {**cfg, "quantization_config": qc}, quant)
    return qdir, _write(root / f"{fmt}-dequantized", cfg, deq)


@pytest.fixture(scope="module")
def int4_checkpoints(tiny_llama, tmp_path_factory) -> dict[str, tuple[str, str]]:
    root = tmp_path_factory.mktemp("quant")
    return {fmt: make_int4_checkpoint(tiny_llama, root, fmt) for fmt in ("gptq", "awq")}


def _runner(llm: LLM):
    return llm.llm_engine.executor.worker.runner


def _prompt_logprobs(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    values = []
    for prompt, out in zip(prompts, outs):
        values += [pos[tok].logprob for tok, pos in zip(prompt[1:], out.prompt_logprobs[1:])]
    return torch.tensor(values)


def _greedy(llm: LLM, prompts, **kw) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False, **kw)]


# ---- layers ------------------------------------------------------------------------------------
def _layer(n: int, k: int, method: str, seed: int = 0) -> tuple[ColumnParallelLinear, torch.Tensor]:
    torch.manual_seed(seed)
    layer = ColumnParallelLinear(k, n)
    w = torch.randn(n, k) * 0.1
    layer.weight.data.copy_(w)
    layer.quant = QuantizedLinearMethod(layer, QuantConfig(method, 8 if method == "int8" else 4), "test")
    layer.quant.finish()
    return layer, w


def test_int8_linear_matches_the_dequantized_matmul():
    layer, w = _layer(96, 192, "int8")
    assert layer.quant.path == "int8pack_mm" and not hasattr(layer, "weight")
    deq = layer.quant.dequantized()
    # Per-channel symmetric rounding: every weight within half a step of its channel's scale.
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((deq - w).abs() <= step / 2 + 1e-7).all()
    x = torch.randn(7, 192)
    ref = x @ deq.T
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert layer.quant.num_bytes == 96 * 192 + 96 * 4


@pytest.mark.parametrize("k", [128, 192, 96])  # groups of 128, 64 and 32
def test_int4_linear_fused_kernel_matches_the_dequantized_matmul(k):
    layer, w = _layer(80, k, "int4")
    assert layer.quant.path == "int4pack_mm"
    assert layer.quant.group_size == {128: 128, 192: 64, 96: 32}[k]
    deq = layer.quant.dequantized()
    g = w.reshape(80, -1, layer.quant.group_size)
    step = (g.amax(-1) - g.amin(-1)) / 15
    assert ((deq - w).abs().reshape(g.shape) <= step[..., None] / 2 + 1e-6).all()
    x = torch.randn(5, k)
    # The fallback (dequantize chunks of rows, float32 matmul) computes the same product.
    fallback, _ = _layer(80, k, "int4")
    q, scale, minimum = int4_quantize(w, layer.quant.group_size)
    fallback.quant.path, fallback.quant.packed, fallback.quant.scale, fallback.quant.minimum = (
        "dequant",
        q,
        scale,
        minimum,
    )
    ref = x @ deq.T
    tol = dict(rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    torch.testing.assert_close(layer(x), ref, **tol)
    torch.testing.assert_close(fallback(x), ref, **tol)


# ---- checkpoints -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_int4_checkpoint_matches_the_dequantized_model(int4_checkpoints, fmt):
    qdir, deq_dir = int4_checkpoints[fmt]
    llm = LLM(qdir, num_gpu_blocks_override=64)
    model = _runner(llm).model
    qkv = model.layers[0].self_attn.qkv_proj
    assert qkv.quant.path == "int4pack_mm" and qkv.quant.group_size == GROUP
    # The fused q/k/v layer multiplies by exactly the dequantized checkpoint weights, in q, k, v order.
    ref = load_file(str(Path(deq_dir) / "model.safetensors"))
    want = torch.cat([ref[f"model.layers.0.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
    torch.testing.assert_close(qkv.quant.dequantized(), want, rtol=1e-5, atol=1e-6)
    prompts = _prompts()
    # Greedy tokens equal transformers on the dequantized float32 weights.
    assert _greedy(llm, prompts) == [peft_greedy(deq_dir, None, p, N_TOKENS) for p in prompts]
    # Prompt log-probabilities within 1e-3 of kvloom's float32 run of the dequantized weights.
    float_llm = LLM(deq_dir, num_gpu_blocks_override=64)
    diff = (_prompt_logprobs(llm, prompts) - _prompt_logprobs(float_llm, prompts)).abs().max().item()
    assert diff < 1e-3, diff


def test_quantized_checkpoint_under_lora_matches_peft(int4_checkpoints, tmp_path):
    qdir, deq_dir = int4_checkpoints["gptq"]
    adapter = build_peft_adapter(deq_dir, str(tmp_path / "adapter"), r=8, seed=2)
    from kvloom import LoRARequest

    llm = LLM(qdir, enable_lora=True, max_lora_rank=8, num_gpu_blocks_override=64)
    prompt = _prompts(seed=3)[1]
    out = _greedy(llm, [prompt], lora_request=LoRARequest("a", 1, adapter))[0]
    assert out == peft_greedy(deq_dir, adapter, prompt, N_TOKENS)
    assert out != peft_greedy(deq_dir, None, prompt, N_TOKENS)  # the adapter changes the output


def test_on_the_fly_int8_and_int4(tiny_llama):
    prompts = _prompts(seed=4)
    float_llm = LLM(tiny_llama, num_gpu_blocks_override=64)
    ref = _prompt_logprobs(float_llm, prompts)
    float_bytes = sum(
        p.numel() * p.element_size()
        for n, p in _runner(float_llm).model.named_parameters()
        if n.endswith(("proj.weight", "proj.weight_packed"))  # float32 weights on CPU are packed
    )
    for method, bits, max_diff in (("int8", 8, 0.2), ("int4", 4, 1.5)):
        llm = LLM(tiny_llama, quantization=method, num_gpu_blocks_override=64)
        layers = [m for m in _runner(llm).model.modules() if getattr(m, "quant", None) is not None]
        assert len(layers) == 4 * 2 and {m.quant.path for m in layers} == {f"{method}pack_mm"}
        qbytes = sum(m.quant.num_bytes for m in layers)
        assert qbytes < float_bytes * (0.3 if bits == 8 else 0.2)
        diff = (_prompt_logprobs(llm, prompts) - ref).abs().max().item()
        assert 0 < diff < max_diff, (method, diff)
        if method == "int8":  # close enough to keep the float model's greedy tokens on this model
            assert _greedy(llm, prompts) == _greedy(float_llm, prompts)


def test_fp8_checkpoint_loads_dequantized(tiny_llama, tmp_path):
    weights = load_file(str(Path(tiny_llama) / "model.safetensors"))
    fp8, deq = {}, {}
    for i, (name, w) in enumerate(sorted(weights.items())):
        if not _is_linear(name):
            fp8[name] = deq[name] = w
            continue
        module = name.removesuffix(".weight")
        if i % 2:  # per-tensor scale
            scale = w.abs().max() / 448
            q = (w / scale).to(torch.float8_e4m3fn)
            fp8[f"{module}.weight_scale"] = scale.reshape(())
            deq[name] = q.float() * scale
        else:  # 32x32 block scales (weight_scale_inv, as DeepSeek/Qwen FP8)
            blocks = w.reshape(w.shape[0] // 32, 32, w.shape[1] // 32, 32)
            scale = blocks.abs().amax(dim=(1, 3)) / 448
            full = scale.repeat_interleave(32, 0).repeat_interleave(32, 1)
            q = (w / full).to(torch.float8_e4m3fn)
            fp8[f"{module}.weight_scale_inv"] = scale
            deq[name] = q.float() * full
        fp8[name] = q
        fp8[f"{module}.input_scale"] = torch.tensor(1.0)
    cfg = _copy_model_files(tiny_llama, tmp_path / "fp8")
    _copy_model_files(tiny_llama, tmp_path / "deq")
    qc = {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [32, 32]}
    qdir = _write(tmp_path / "fp8", {**cfg, "quantization_config": qc}, fp8)
    deq_dir = _write(tmp_path / "deq", cfg, deq)
    prompts = _prompts(seed=5)
    assert _greedy(LLM(qdir, num_gpu_blocks_override=64), prompts) == [
        peft_greedy(deq_dir, None, p, N_TOKENS) for p in prompts
    ]


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py's LlamaModel.permute: the rotary halves interleaved.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_kept_quantized(tiny_llama, tmp_path, qtype):
    import gguf

    from kvloom.engine.model_loader.quant_formats import gguf_linear_tensors

    weights = load_file(str(Path(tiny_llama) / "model.safetensors"))
    cfg = json.loads((Path(tiny_llama) / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    gtype = getattr(gguf.GGMLQuantizationType, qtype)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    names.update({"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"})
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    reference = {}
    for name, w in sorted(weights.items()):
        if not _is_linear(name):
            continue
        layer, proj = name.split(".")[2], name.split(".")[-2]
        n_head = {"q_proj": heads, "k_proj": kv_heads}.get(proj)
        w_file = _llama_cpp_permute(w, n_head) if n_head else w
        data = gguf.quants.quantize(w_file.numpy(), gtype)
        writer.add_tensor(f"blk.{layer}.{names[proj]}.weight", data, raw_dtype=gtype)
        back = torch.from_numpy(gguf.quants.dequantize(data, gtype).copy()).reshape(w.shape)
        if n_head:  # transformers' reverse of llama.cpp's permutation
            d = back.shape[0] // n_head // 2
            back = back.reshape(n_head, d, 2, back.shape[1]).swapaxes(2, 1).reshape(back.shape)
        reference[name] = back
        assert (back - w).abs().max() < w.abs().max() / (6 if qtype != "Q8_0" else 100)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    kept, qc = gguf_linear_tensors(str(tmp_path / "m.gguf"), cfg, reference)
    assert qc["bits"] == (8 if qtype == "Q8_0" else 4) and qc["group_size"] == 32
    tensors = {k: v for k, v in weights.items() if k not in reference} | kept
    cfg_dir = tmp_path / "kept"
    _copy_model_files(tiny_llama, cfg_dir)
    qdir = _write(cfg_dir, {**cfg, "quantization_config": qc}, tensors)
    deq_dir = _write(_copy_and_return(tiny_llama, tmp_path / "deq"), cfg, {**weights, **reference})
    llm = LLM(qdir, num_gpu_blocks_override=64)
    paths = {m.quant.path for m in _runner(llm).model.modules() if getattr(m, "quant", None) is not None}
    assert paths == ({"dequant"} if qtype == "Q8_0" else {"int4pack_mm"})
    prompts = _prompts(seed=6)
    assert _greedy(llm, prompts) == [peft_greedy(deq_dir, None, p, N_TOKENS) for p in prompts]
    # A corrupted reference (e.g. a wrong row order) is caught when converting.
    reference["model.layers.0.self_attn.q_proj.weight"] = reference["model.layers.0.self_attn.q_proj.weight"].flip(0)
    with pytest.raises(RuntimeError, match="attn_q"):
        gguf_linear_tensors(str(tmp_path / "m.gguf"), cfg, reference)


def _copy_and_return(src: str, dst: Path) -> Path:
    _copy_model_files(src, dst)
    return dst


# ---- refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["bitsandbytes", "marlin", "awq_marlin", "squeezellm", "compressed-tensors", 4])
def test_unsupported_quantization_values_raise(tiny_llama, value):
    with pytest.raises(ValueError, match=rf"quantization={value!r} is not supported.*gptq, awq, fp8, gguf, int8, int4"):
        LLM(tiny_llama, quantization=value)


def test_quantization_is_an_engine_argument_not_ignored():
    assert EngineArgs.from_kwargs(quantization="int4").quantization == "int4"


def test_mismatched_quantization_raises(int4_checkpoints, tiny_llama):
    gptq_dir, _ = int4_checkpoints["gptq"]
    with pytest.raises(ValueError, match="'awq' does not match the checkpoint's quant_method 'gptq'"):
        LLM(gptq_dir, quantization="awq")
    with pytest.raises(ValueError, match="already quantized"):
        LLM(gptq_dir, quantization="int8")
    with pytest.raises(ValueError, match="needs a gptq checkpoint"):
        LLM(tiny_llama, quantization="gptq")
    with pytest.raises(ValueError, match="needs a gguf checkpoint"):
        LLM(tiny_llama, quantization="gguf")


def test_unsupported_gptq_variants_raise(int4_checkpoints, tmp_path):
    gptq_dir, _ = int4_checkpoints["gptq"]
    for change, match in (({"desc_act": True}, "desc_act=True"), ({"bits": 8}, "bits=8")):
        dst = tmp_path / next(iter(change))
        shutil.copytree(gptq_dir, dst)
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"].update(change)
        (dst / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=match):
            LLM(str(dst))


def test_tensor_parallel_int4_checkpoint_equals_one_rank(int4_checkpoints):
    # Row-parallel layers take whole groups of input columns; column-parallel ones their rows.
    qdir, _ = int4_checkpoints["awq"]
    prompts = _prompts(seed=7)
    one = LLM(qdir, num_gpu_blocks_override=64)
    expected, scores = _greedy(one, prompts), _prompt_logprobs(one, prompts)
    one.shutdown()
    two = LLM(qdir, tensor_parallel_size=2, num_gpu_blocks_override=64)
    try:
        assert _greedy(two, prompts) == expected
        assert (_prompt_logprobs(two, prompts) - scores).abs().max() < 1e-4
    finally:
        two.shutdown()
