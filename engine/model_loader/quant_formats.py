"""Quantized checkpoint formats: which one a model uses, and its tensors in kvloom's int layout.

`resolve_quantization` reads `quantization=` and config.json's quantization_config (vLLM's rule:
None means "whatever the checkpoint says") into a QuantConfig. `convert_weights` wraps the
checkpoint's tensor stream so that every quantized module arrives as `<module>.weight` (int values
[out, in]), `<module>.weight_scale` [out, groups] and, for int4, `<module>.weight_min` [out, groups]
with w = q * scale + min (kvloom.engine.layers.quant loads those). GPTQ and AWQ int4 are repacked
exactly; FP8 is dequantized to the engine dtype; GGUF Q4_0/Q4_1/Q8_0 blocks are decoded by
`gguf_linear_tensors` when a .gguf is converted with quantization="gguf".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch

from kvloom.engine.layers.quant import QuantConfig

logger = logging.getLogger(__name__)

# quantization= values kvloom implements: checkpoint formats (vLLM's names) and on-the-fly ones.
CHECKPOINT_METHODS = ("gptq", "awq", "fp8", "gguf")
ON_THE_FLY_METHODS = ("int8", "int4")
SUPPORTED_QUANTIZATION = CHECKPOINT_METHODS + ON_THE_FLY_METHODS

_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ GEMM: nibble i of a packed int32 holds column AWQ_ORDER[i]
_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
# The layout kvloom writes for a GGUF kept quantized (config.json quantization_config.kvloom_layout).
GGUF_LAYOUT = "q-scale-min/v1"


def check_quantization_name(requested: object) -> None:
    """Refuse a `quantization=` value kvloom does not implement (vLLM has many more)."""
    if requested is not None and (not isinstance(requested, str) or requested not in SUPPORTED_QUANTIZATION):
        raise ValueError(
            f"quantization={requested!r} is not supported; kvloom implements {', '.join(SUPPORTED_QUANTIZATION)} "
            "(or None: use the checkpoint's quantization_config)"
        )


def resolve_quantization(requested: str | None, hf_config: dict) -> QuantConfig | None:
    """The QuantConfig for `quantization=` and the checkpoint's quantization_config (None: float weights)."""
    check_quantization_name(requested)
    qc = hf_config.get("quantization_config")
    found = None if qc is None else str(qc.get("quant_method", "")).lower()
    if requested in ON_THE_FLY_METHODS:
        if found is not None:
            raise ValueError(
                f"quantization={requested!r} quantizes a float checkpoint at load, but this checkpoint is "
                f"already quantized ({found!r}); leave quantization unset"
            )
        bits = 8 if requested == "int8" else 4
        return QuantConfig(requested, bits)
    if found is None:
        if requested is not None:
            hint = " (pass the .gguf file itself, or the default model)" if requested == "gguf" else ""
            raise ValueError(
                f"quantization={requested!r} needs a {requested} checkpoint, but config.json has no "
                f"quantization_config{hint}; for a float checkpoint use 'int8' or 'int4'"
            )
        return None
    if requested is not None and requested != found:
        raise ValueError(f"quantization={requested!r} does not match the checkpoint's quant_method {found!r}")
    if found == "gptq":
        return _gptq_config(qc)
    if found == "awq":
        return _awq_config(qc)
    if found == "fp8":
        logger.info("fp8 checkpoint: weights are dequantized to the engine dtype at load")
        block = qc.get("weight_block_size")
        return QuantConfig("fp8", None, from_checkpoint=True, weight_block_size=tuple(block) if block else None)
    if found == "gguf":
        if qc.get("kvloom_layout") != GGUF_LAYOUT:
            raise ValueError(f"quant_method 'gguf' in config.json is not kvloom's layout {GGUF_LAYOUT!r}")
        return QuantConfig("gguf", qc["bits"], qc.get("group_size"), from_checkpoint=True, checkpoint_format="gguf")
    raise ValueError(
        f"the checkpoint's quant_method {found!r} is not supported; kvloom loads {', '.join(CHECKPOINT_METHODS)}"
    )


def _group(qc: dict, *keys: str) -> int | None:
    size = next((qc[k] for k in keys if k in qc), -1)
    return None if size in (-1, None) else int(size)


def _gptq_config(qc: dict) -> QuantConfig:
    bits = qc.get("bits", 4)
    if bits != 4:
        raise ValueError(f"GPTQ bits={bits} is not supported; kvloom loads 4-bit GPTQ")
    if qc.get("desc_act"):
        raise ValueError("GPTQ desc_act=True (act-order) is not supported; use a checkpoint made with desc_act=False")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported; kvloom loads 'gptq' and 'gptq_v2'")
    return QuantConfig("gptq", 4, _group(qc, "group_size"), from_checkpoint=True, checkpoint_format=fmt)


def _awq_config(qc: dict) -> QuantConfig:
    bits = qc.get("bits", qc.get("w_bit", 4))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm" or not qc.get("zero_point", True):
        raise ValueError(
            f"AWQ bits={bits}, version={version!r}, zero_point={qc.get('zero_point', True)} is not supported; "
            "kvloom loads 4-bit GEMM AWQ with zero points"
        )
    return QuantConfig("awq", 4, _group(qc, "group_size", "q_group_size"), from_checkpoint=True)


def convert_weights(
    weights: Iterable[tuple[str, torch.Tensor]], cfg: QuantConfig | None, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with quantized modules in kvloom's int layout, the rest cast to dtype."""
    if cfg is None or cfg.method in ON_THE_FLY_METHODS or cfg.method == "gguf":
        for name, t in weights:
            yield name, (t.to(dtype) if t.is_floating_point() and not name.endswith(_INT_PARTS) else t)
        return
    if cfg.method == "fp8":
        yield from _fp8(weights, dtype, cfg.weight_block_size)
        return
    parts = ("qweight", "qzeros", "scales") + (("g_idx",) if cfg.method == "gptq" else ())
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in weights:
        module, _, part = name.rpartition(".")
        if part not in parts:
            yield name, t.to(dtype) if t.is_floating_point() else t
            continue
        pending.setdefault(module, {})[part] = t
        if all(p in pending[module] for p in parts):
            yield from _repack(module, pending.pop(module), cfg)
    for module, got in pending.items():  # GPTQ exports without g_idx
        if cfg.method == "gptq" and all(p in got for p in parts[:3]):
            yield from _repack(module, got, cfg)
        else:
            raise ValueError(f"{module}: incomplete {cfg.method} tensors (have {sorted(got)}, need {list(parts)})")


_INT_PARTS = (".weight_scale", ".weight_min")


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] holding 8 nibbles each along dim 0 (nibble j of row r is row 8r+j) -> [8R, C]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nib = (packed[:, None, :] >> shifts[None, :, None]) & 15
    return nib.reshape(-1, packed.shape[1]).to(torch.uint8)


def _unpack_cols(packed: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [R, C] holding 8 nibbles along dim 1 -> [R, 8C]; nibble i is column order[i] of its eight."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nib = (packed[:, :, None] >> shifts) & 15
    if order is not None:
        nib = nib[:, :, [order.index(c) for c in range(8)]]
    return nib.reshape(packed.shape[0], -1).to(torch.uint8)


def _repack(module: str, t: dict[str, torch.Tensor], cfg: QuantConfig) -> Iterator[tuple[str, torch.Tensor]]:
    scales = t["scales"].float()  # [G, N]
    if cfg.method == "gptq":
        q = _unpack_rows(t["qweight"].to(torch.int32))  # [K, N]
        zeros = _unpack_cols(t["qzeros"].to(torch.int32)).float()  # [G, N]
        if cfg.checkpoint_format == "gptq":
            zeros = zeros + 1  # GPTQ v1 stores zero - 1
        k = q.shape[0]
        g_idx = t.get("g_idx")
        if g_idx is not None:
            group = k // scales.shape[0]
            if not torch.equal(g_idx.long(), torch.arange(k) // group):
                raise ValueError(f"{module}: g_idx is not in input order (act-order GPTQ is not supported)")
    else:
        q = _unpack_cols(t["qweight"].to(torch.int32), _AWQ_ORDER)  # [K, N]
        zeros = _unpack_cols(t["qzeros"].to(torch.int32), _AWQ_ORDER).float()
    n = q.shape[1]
    zeros = zeros[:, :n]
    yield f"{module}.weight", q.T.contiguous()
    yield f"{module}.weight_scale", scales.T.contiguous()
    yield f"{module}.weight_min", (-zeros * scales).T.contiguous()


def _fp8(
    weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype, block: tuple[int, int] | None
) -> Iterator[tuple[str, torch.Tensor]]:
    held: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, t in weights:
        module, _, part = name.rpartition(".")
        if part == "weight" and t.dtype in _FP8_DTYPES:
            held[module] = t
        elif part in ("weight_scale", "weight_scale_inv"):
            scales[module] = t.float()
        elif part == "input_scale":
            continue  # static activation scales: activations stay in the engine dtype (weight-only)
        else:
            yield name, t.to(dtype) if t.is_floating_point() else t
            continue
        if module in held and module in scales:
            yield f"{module}.weight", _fp8_dequantize(held.pop(module), scales.pop(module), block).to(dtype)
    if held or scales:
        raise ValueError(
            f"fp8 checkpoint: weights without scales (or scales without weights): {sorted(held | scales)[:4]}"
        )


def _fp8_dequantize(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    w = w.float()
    n, k = w.shape
    if scale.numel() == 1:  # per tensor
        return w * scale.reshape(())
    if scale.numel() == n and (scale.dim() == 1 or scale.shape[1] == 1):  # per output channel
        return w * scale.reshape(n, 1)
    # Block scales [ceil(N/bn), ceil(K/bk)] (weight_block_size, as DeepSeek/Qwen FP8).
    if block is None or scale.shape != (-(-n // block[0]), -(-k // block[1])):
        raise ValueError(f"fp8 scale of shape {tuple(scale.shape)} does not fit a [{n}, {k}] weight (block {block})")
    full = scale.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return w * full


# ---- GGUF kept quantized ----------------------------------------------------------------------
_GGUF_LINEARS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_blocks(data, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Decode rows of Q4_0 / Q4_1 / Q8_0 blocks (32 weights each) into (q, scale [N, G], min [N, G])."""
    import numpy as np

    raw = torch.from_numpy(np.array(data, copy=True)).view(torch.uint8)
    n = raw.shape[0]
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[qtype]
    blocks = raw.reshape(n, -1, size)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()[..., 0]
    if qtype == "Q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8)
        return q.reshape(n, -1), d, None
    qs = blocks[..., -16:]
    # Element j of a block is the low nibble of byte j, element j+16 the high nibble.
    q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(n, -1)
    if qtype == "Q4_0":
        return q, d, -8 * d
    m = blocks[..., 2:4].contiguous().view(torch.float16).float()[..., 0]
    return q, d, m


def _unpermute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row order for q/k (what transformers' GGUF loader does)."""
    dim = t.shape[0] // n_head // 2
    return t.reshape(n_head, dim, 2, *t.shape[1:]).swapaxes(2, 1).reshape(t.shape)


def gguf_linear_tensors(
    gguf_path: str, hf_config: dict, reference: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict]:
    """The decoder's linear weights of a GGUF in kvloom's int layout, and the quantization_config to write.

    Q4_0/Q4_1 become int4 with groups of 32, Q8_0 group-wise int8; a file mixing them (or using
    other types, e.g. K-quants) in its linear layers is refused (without quantization="gguf" kvloom
    dequantizes it to float32 instead). Every decoded weight is checked against `reference`, the
    float weights transformers' GGUF reader made of the same file (names and row order included).
    """
    from gguf import GGUFReader

    from kvloom.engine.layers.quant import dequantize

    reader = GGUFReader(gguf_path)
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    out: dict[str, torch.Tensor] = {}
    types: set[str] = set()
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _GGUF_LINEARS or parts[3] != "weight":
            continue
        qtype = t.tensor_type.name
        if qtype not in ("Q4_0", "Q4_1", "Q8_0"):
            raise ValueError(
                f"{gguf_path}: {t.name} is {qtype}; quantization='gguf' keeps Q4_0, Q4_1 and Q8_0 "
                "(leave quantization unset to dequantize this file to float32)"
            )
        types.add("Q8_0" if qtype == "Q8_0" else "Q4")
        q, scale, minimum = _gguf_blocks(t.data, qtype)
        if arch == "llama" and parts[2] in ("attn_q", "attn_k"):
            n_head = heads if parts[2] == "attn_q" else kv_heads
            q, scale = _unpermute(q, n_head), _unpermute(scale, n_head)
            minimum = None if minimum is None else _unpermute(minimum, n_head)
        prefix = f"model.layers.{parts[1]}.{_GGUF_LINEARS[parts[2]]}"
        ref = reference.get(f"{prefix}.weight")
        if ref is None or not torch.allclose(dequantize(q, scale, minimum), ref.float(), rtol=1e-4, atol=1e-6):
            raise RuntimeError(f"{gguf_path}: decoding {t.name} does not match transformers' reading of it")
        out[f"{prefix}.weight"] = q.contiguous()
        out[f"{prefix}.weight_scale"] = scale.contiguous()
        if minimum is not None:
            out[f"{prefix}.weight_min"] = minimum.contiguous()
    if len(types) != 1:
        raise ValueError(
            f"{gguf_path}: its linear layers mix {sorted(types) or 'no'} block types; quantization='gguf' "
            "needs all Q4_0/Q4_1 or all Q8_0 (leave quantization unset to dequantize to float32)"
        )
    bits = 8 if types == {"Q8_0"} else 4
    qc = {"quant_method": "gguf", "kvloom_layout": GGUF_LAYOUT, "bits": bits, "group_size": 32}
    return out, qc
