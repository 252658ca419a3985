"""Triton LoRA kernels: SGMV-style shrink and expand (as in Punica / S-LoRA).

Tokens of one adapter are contiguous (see LoRAMetadata), so each program takes one segment and one
tile of it: shrink computes s = x @ A[slot].T ([T, in] -> [T, R]), expand adds s @ B[slot].T into
y ([T, R] -> [T, out]). Both read the adapter's weights once per tile, from the stacked slot
tensors. On CPUs they run only under the interpreter (TRITON_INTERPRET=1), which is how the tests
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
def _shrink_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    seg_start_ptr,
    seg_len_ptr,
    seg_slot_ptr,
    K,
    N,
    stride_xm,
    stride_xk,
    stride_al,
    stride_an,
    stride_ak,
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
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
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        a = tl.load(
            a_ptr + slot * stride_al + offs_n[None, :] * stride_an + kk[:, None] * stride_ak,
            mask=n_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        acc += tl.dot(x, a)
    tl.store(
        out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@triton.jit
def _expand_kernel(
    s_ptr,
    b_ptr,
    y_ptr,
    seg_start_ptr,
    seg_len_ptr,
    seg_slot_ptr,
    R,
    N,
    stride_sm,
    stride_sr,
    stride_bl,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_m = tl.program_id(2)
    start = tl.load(seg_start_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    rows = (start + offs_m).to(tl.int64)
    m_mask = offs_m < length
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + offs_r
        r_mask = rr < R
        s = tl.load(
            s_ptr + rows[:, None] * stride_sm + rr[None, :] * stride_sr,
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + slot * stride_bl + offs_n[None, :] * stride_bn + rr[:, None] * stride_br,
            mask=n_mask[None, :] & r_mask[:, None],
            other=0.0,
        )
        acc += tl.dot(s, b)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMetadata) -> torch.Tensor:
    """Same contract as kvloom.kernels.torch_ref.lora_shrink."""
    out = x.new_zeros(x.shape[0], lora_a.shape[1])
    if not meta.segments:
        return out
    n, k = lora_a.shape[1], lora_a.shape[2]
    grid = (len(meta.segments), triton.cdiv(n, _BLOCK_N), triton.cdiv(meta.max_seg_len, _BLOCK_M))
    _shrink_kernel[grid](
        x,
        lora_a,
        out,
        meta.seg_starts,
        meta.seg_lens,
        meta.seg_slots,
        k,
        n,
        x.stride(0),
        x.stride(1),
        lora_a.stride(0),
        lora_a.stride(1),
        lora_a.stride(2),
        out.stride(0),
        out.stride(1),
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K,
    )
    return out


def lora_expand(y: torch.Tensor, s: torch.Tensor, lora_b: torch.Tensor, meta: LoRAMetadata) -> None:
    """Same contract as kvloom.kernels.torch_ref.lora_expand (y may be a column slice)."""
    if not meta.segments:
        return
    n, r = lora_b.shape[1], lora_b.shape[2]
    grid = (len(meta.segments), triton.cdiv(n, _BLOCK_N), triton.cdiv(meta.max_seg_len, _BLOCK_M))
    _expand_kernel[grid](
        s,
        lora_b,
        y,
        meta.seg_starts,
        meta.seg_lens,
        meta.seg_slots,
        r,
        n,
        s.stride(0),
        s.stride(1),
        lora_b.stride(0),
        lora_b.stride(1),
        lora_b.stride(2),
        y.stride(0),
        y.stride(1),
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_R=16,
    )
