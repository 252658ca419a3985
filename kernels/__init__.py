"""Attention, cache, norm, LoRA and logit-mask kernels behind one door.

Pure torch is the reference and the fallback; C++ kernels serve float32 activations on CPUs (over
float32 weights and KV caches, or bfloat16 ones in the CPU bfloat16 mode: see compute_dtype); Triton
LoRA kernels (SGMV shrink/expand) serve CUDA when Triton is installed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch

from . import torch_ref
from .cpu_ops import load_cpu_ops
from .metadata import AttentionMetadata, LoRAMetadata

__all__ = [
    "AttentionMetadata",
    "KernelBackend",
    "LoRAMetadata",
    "argmax_rows",
    "bf16_dot_products",
    "compute_dtype",
    "dense_linear",
    "get_backend",
    "pack_linear_weight",
    "packed_linear",
    "packed_rows",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelBackend:
    """The ops a model calls; every implementation matches the torch reference."""

    name: str
    write_kv: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    rms_norm: Callable[..., tuple] = torch_ref.rms_norm
    rotary_embedding: Callable[..., tuple] = torch_ref.rotary_embedding
    silu_and_mul: Callable[..., torch.Tensor] = torch_ref.silu_and_mul
    lora_shrink: Callable[..., torch.Tensor] = torch_ref.lora_shrink
    lora_expand: Callable[..., None] = torch_ref.lora_expand
    apply_token_bitmask: Callable[..., None] = torch_ref.apply_token_bitmask


TORCH = KernelBackend("torch", torch_ref.write_kv, torch_ref.paged_attention)

# For weights not packed at load (the engine packs its own: see pack_linear_weight), up to this
# many rows a float32 linear layer on CPU runs the C++ kernel (kernels/cpu/gemm.cpp:
# a weight stream for decode batches of 1-4, packed 6 x 16 register tiles above, prefill chunks
# included); longer chunks than the default budget of 2048 tokens, which were never timed, keep
# MKL's sgemm. `kvloom bench linear --rows ...` times both side by side.
KERNEL_MAX_ROWS = 2048


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the C++ kernel for float32 on CPU (decode batches, prefill chunks) when it is built."""
    if (
        x.dim() == 2
        and x.shape[0] <= KERNEL_MAX_ROWS
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        ops = load_cpu_ops()
        if ops is not None:
            return ops.linear_small_m(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


# Panels of the packed layout: 16 weight rows, stored [K][16] (kernels/cpu/gemm.cpp).
PANEL_ROWS = 16


# Where each of a row's 16 weights sits in a bfloat16 panel (an involution: it also maps back):
# kernels/cpu/gemm.cpp widens a row with two in-lane unpacks, which need this order.
_BF16_PANEL_ORDER = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15])


def pack_linear_weight(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """A float32 CPU weight [N, K] laid out once as the C++ kernel's panels [ceil(N / 16), K, 16].

    dtype torch.bfloat16 stores the panels rounded to bfloat16 (half the bytes). Where the CPU has
    AVX512_BF16 (bf16_dot_products()) and K is even they hold K in pairs, [ceil(N / 16), K / 2, 32], and
    the kernel rounds x to bfloat16 too and runs vdpbf16ps dot products; otherwise it widens them to
    float32 as it reads, so x stays float32. Accumulation and outputs are float32 either way. None where that
    kernel does not serve the weight (another dtype or device, a build without AVX2/FMA, no
    compiler). `packed_linear` multiplies by the result at any row count, so a layer that packs its
    weight can drop the row-major copy; `packed_rows` reads rows back (embeddings).
    """
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.shape[0] == 0:
        return None
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"linear weights pack as float32 or bfloat16, not {dtype}")
    ops = load_cpu_ops()
    if ops is None or not ops.packed_linear_available():
        return None
    if dtype == torch.float32:
        return ops.pack_linear_weight(weight.detach())
    n, k = weight.shape
    padded = torch.zeros(-(-n // PANEL_ROWS) * PANEL_ROWS, k, dtype=torch.bfloat16)
    padded[:n] = weight.detach()  # rounds to nearest even
    if k % 2 == 0 and ops.bf16_dot_available():
        # With AVX512_BF16 the panels hold K in pairs, [N / 16][K / 2][16][2]: vdpbf16ps's operand (an odd
        # K, which no known model has, keeps the layout below).
        panels = padded.view(padded.shape[0] // PANEL_ROWS, PANEL_ROWS, k // 2, 2).transpose(1, 2)
        return panels.reshape(panels.shape[0], k // 2, 2 * PANEL_ROWS).contiguous()
    panels = padded.view(padded.shape[0] // PANEL_ROWS, PANEL_ROWS, k)[:, _BF16_PANEL_ORDER]
    return panels.transpose(1, 2).contiguous()


def bf16_dot_products() -> bool:
    """Whether bfloat16 panels multiply as AVX512_BF16 dot products on this CPU: linear inputs are then
    rounded to bfloat16 too (twice float32's FLOP rate); otherwise the kernel widens the weights to float32."""
    ops = load_cpu_ops()
    return ops is not None and ops.bf16_dot_available()


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear(x, weight, bias) for packed = pack_linear_weight(weight); x float32 [..., K], no autograd."""
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("packed linear weights have no backward pass (the engine runs under inference mode)")
    if x.dtype != torch.float32:
        raise TypeError(f"packed linear layers take float32 inputs; the input is {x.dtype}")
    shape = x.shape
    rows = math.prod(shape[:-1])  # not -1: a [rows, 0] input (K = 0) cannot infer it
    y = load_cpu_ops().linear_packed(x.reshape(rows, shape[-1]), packed, out_features, bias)
    return y.reshape(*shape[:-1], out_features)


def packed_rows(packed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the weight that `packed` holds (F.embedding(ids, weight)), as float32: [*ids.shape, K]."""
    if packed.dtype == torch.bfloat16 and packed.shape[2] == 2 * PANEL_ROWS:  # pairs: [P, K / 2, 16, 2]
        quads = packed.view(packed.shape[0], packed.shape[1], PANEL_ROWS, 2)
        return quads[ids // PANEL_ROWS, :, ids % PANEL_ROWS].flatten(-2).float()
    if packed.dtype == torch.bfloat16:
        return packed[ids // PANEL_ROWS, :, _BF16_PANEL_ORDER[ids % PANEL_ROWS]].float()
    return packed[ids // PANEL_ROWS, :, ids % PANEL_ROWS]


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a model of this dtype computes in on device.

    bfloat16 on a CPU whose C++ kernels hold bfloat16 weight panels runs the CPU bfloat16 mode:
    linear weights and the KV cache in bfloat16 (half the bytes to stream), activations, residual
    and accumulation in float32: float32 here. Elsewhere dtype itself.
    """
    if device.type == "cpu" and dtype == torch.bfloat16:
        ops = load_cpu_ops()
        if ops is not None and ops.packed_linear_available():
            return torch.float32
    return dtype


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) for [rows, vocab] logits, with the C++ kernel for float32 on CPU."""
    if logits.dim() == 2 and logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.shape[1] > 0:
        ops = load_cpu_ops()
        if ops is not None:
            return ops.argmax_rows(logits)
    return logits.argmax(dim=-1)


def _cpu_backend() -> KernelBackend | None:
    ops = load_cpu_ops()
    if ops is None:
        return None

    def decode(
        q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, sliding_window=None, logits_soft_cap=None
    ):
        args = (q, k_cache, v_cache, block_tables, seq_lens, block_size, scale)
        if q.dtype != torch.float32 or k_cache.dtype not in (torch.float32, torch.bfloat16):
            return torch_ref.decode_attention_ref(*args, sliding_window, logits_soft_cap)
        # The C++ kernel takes 0 for "no window" and "no soft cap".
        if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
            q = q.contiguous()  # the kernel takes rows any stride apart (the fused qkv's q slice), not other layouts
        return ops.paged_attention_decode(q, *args[1:], sliding_window or 0, logits_soft_cap or 0.0)

    def prompt(q, k, v, out, scale):
        if q.dtype != torch.float32 or k.dtype != torch.float32 or not ops.prefill_attention_supported(q.shape[-1]):
            return False
        if any(t.stride(2) != 1 or t.stride(1) != t.shape[2] for t in (q, k, v, out)):
            return False
        ops.prefill_attention(q, k, v, out, scale)
        return True

    def write_kv(key, value, k_cache, v_cache, slot_mapping):
        if key.dtype != torch.float32 or k_cache.dtype not in (torch.float32, torch.bfloat16):
            return torch_ref.write_kv(key, value, k_cache, v_cache, slot_mapping)
        ops.write_kv(key, value, k_cache, v_cache, slot_mapping)

    def rms_norm(x, residual, weight, eps):
        if residual is None:
            return ops.rms_norm(x, None, weight, eps), None
        return ops.rms_norm(x, residual, weight, eps), residual

    def rotary_embedding(positions, q, k, cos, sin):
        ops.rotary_embedding(positions, q, k, cos, sin)
        return q, k

    return KernelBackend(
        "cpu-c++",
        write_kv,
        partial(torch_ref.paged_attention, decode_attention=decode, prompt_attention=prompt),
        rms_norm,
        rotary_embedding,
        ops.silu_and_mul,
    )


def _with_triton_lora(backend: KernelBackend) -> KernelBackend:
    try:
        from . import triton_lora
    except ImportError:
        return backend
    return replace(
        backend,
        name=f"{backend.name}+triton-lora",
        lora_shrink=triton_lora.lora_shrink,
        lora_expand=triton_lora.lora_expand,
    )


def get_backend(device: torch.device, dtype: torch.dtype = torch.float32) -> KernelBackend:
    """Pick the kernels for a device and dtype, and log the choice."""
    backend = TORCH
    if device.type == "cpu" and dtype == torch.float32:
        backend = _cpu_backend() or TORCH
    elif device.type == "cuda":
        backend = _with_triton_lora(backend)
    logger.info("kernels: %s backend on %s", backend.name, device)
    return backend
