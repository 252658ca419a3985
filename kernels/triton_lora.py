"""Triton LoRA kernels: SGMV-style shrink and expand (as in Punica / S-LoRA).

Tokens of one adapter are contiguous (see LoRAMetadata), so each program takes one segment and one
tile of it. Both halves are the same segmented matmul over the stacked slot weights: shrink writes
s = x @ A[slot].T ([T, in] -> [T, R]); expand adds s @ B[slot].T into y ([T, R] -> [T, out]).
On CPUs they run only under the interpreter (TRITON_INTERPRET=1), which is how the tests
check them against the torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .metadata import LoRAMetadata

_BLOCK_M = 16
_BLOCK_N = 32
_BLOCK_K = 32


@triton.jit
def _sgmv_kernel(
    in_ptr,
    w_ptr,
    out_ptr,
    seg_start_ptr,
    seg_len_ptr,
    seg_slot_ptr,
    K,
    N,
    stride_im,
    stride_ik,
    stride_wl,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    ADD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[rows] (+)= in[rows] @ w[slot].T for one tile of one segment; w is [slots, N, K]."""
    seg = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_m = tl.program_id(2)
    start = tl.load(seg_start_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (start + offs_m).to(tl.int64)
    m_mask = offs_m < length
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        a = tl.load(
            in_ptr + rows[:, None] * stride_im + kk[None, :] * stride_ik,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + slot * stride_wl + offs_n[None, :] * stride_wn + kk[:, None] * stride_wk,
            mask=n_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        acc += tl.dot(a, w)
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = m_mask[:, None] & n_mask[None, :]
    if ADD:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _sgmv(inp: torch.Tensor, w: torch.Tensor, out: torch.Tensor, meta: LoRAMetadata, add: bool, block_k: int):
    n, k = w.shape[1], w.shape[2]
    grid = (len(meta.segments), triton.cdiv(n, _BLOCK_N), triton.cdiv(meta.max_seg_len, _BLOCK_M))
    _sgmv_kernel[grid](
        inp,
        w,
        out,
        meta.seg_starts,
        meta.seg_lens,
        meta.seg_slots,
        k,
        n,
        inp.stride(0),
        inp.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        ADD=add,
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=block_k,
    )


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMetadata) -> torch.Tensor:
    """Same contract as kvloom.kernels.torch_ref.lora_shrink."""
    out = x.new_zeros(x.shape[0], lora_a.shape[1])
    if meta.segments:
        _sgmv(x, lora_a, out, meta, add=False, block_k=_BLOCK_K)
    return out


def lora_expand(y: torch.Tensor, s: torch.Tensor, lora_b: torch.Tensor, meta: LoRAMetadata) -> None:
    """Same contract as kvloom.kernels.torch_ref.lora_expand (y may be a column slice)."""
    if meta.segments:
        # The reduction runs over the rank, so a narrower K tile wastes less on rank 8 or 16.
        _sgmv(s, lora_b, y, meta, add=True, block_k=16)
