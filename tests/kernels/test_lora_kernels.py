"""Batched LoRA ops: the grouped torch path against a token-by-token reference, Triton against torch.

The Triton kernels run under the interpreter here (TRITON_INTERPRET=1, set in conftest before
triton is imported); on a CUDA machine the same tests run them compiled.
"""

from __future__ import annotations

import os

import pytest
import torch

from kvloom.kernels import LoRAMetadata, torch_ref


def _case(seq_slots: list[int], seq_lens: list[int], num_slots=4, rank=16, d_in=48, d_out=80, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = sum(seq_lens)
    x = torch.randn(t, d_in, generator=g)
    a = torch.randn(num_slots, rank, d_in, generator=g)
    b = torch.randn(num_slots, d_out, rank, generator=g)
    y = torch.randn(t, d_out, generator=g)
    meta = LoRAMetadata.from_token_slots(seq_slots, seq_lens, torch.device(device))
    return x.to(device), a.to(device), b.to(device), y.to(device), meta


CASES = [
    ([0], [1]),
    ([-1, 2, 2, 0, -1, 1], [1, 1, 1, 1, 17, 33]),  # decodes grouped by slot, then prefills
    ([3, 3, -1, 1, 1, 1], [5, 1, 2, 40, 1, 7]),  # neighbouring sequences of one slot merge into a segment
    ([-1, -1], [3, 4]),  # nobody uses an adapter
    ([0, 2, 1, 1, -1, 0], [1, 1, 100, 1, 3, 70]),  # long prefill segments (one matmul each) beside short ones
]


@pytest.mark.parametrize("slots,lens", CASES)
def test_metadata_segments(slots, lens):
    meta = LoRAMetadata.from_token_slots(slots, lens, torch.device("cpu"))
    expected = torch.repeat_interleave(torch.tensor(slots), torch.tensor(lens))
    assert torch.equal(meta.token_indices, expected)
    covered = torch.full_like(expected, -1)
    for start, end, slot in meta.segments:
        covered[start:end] = slot
    assert torch.equal(covered, expected)
    assert all(s1[1] < s2[0] or s1[2] != s2[2] for s1, s2 in zip(meta.segments, meta.segments[1:]))
    # Every token with an adapter is computed once: either in the padded grid or in a long segment.
    rows = meta.pad_rows.tolist() if meta.pad_rows is not None else []
    rows += [t for start, end, _ in meta.long_segments for t in range(start, end)]
    assert sorted(rows) == [t for t, slot in enumerate(expected.tolist()) if slot >= 0]


@pytest.mark.parametrize("slots,lens", CASES)
def test_torch_grouped_matches_token_by_token(slots, lens):
    x, a, b, y, meta = _case(slots, lens)
    want = y + torch_ref.lora_reference(x, a, b, meta.token_indices)
    s = torch_ref.lora_shrink(x, a, meta)
    torch_ref.lora_expand(y, s, b, meta)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)


def test_torch_expand_into_column_slice():
    """Fused layers expand each sub-projection into a column slice of the output."""
    x, a, b, y, meta = _case([1, -1, 0], [3, 2, 4], d_out=96)
    want = y.clone()
    want[:, 32:64] += torch_ref.lora_reference(x, a, b[:, 32:64], meta.token_indices)
    s = torch_ref.lora_shrink(x, a, meta)
    torch_ref.lora_expand(y[:, 32:64], s, b[:, 32:64], meta)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)


triton = pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[dev]' installs it)")


@pytest.fixture(scope="module")
def triton_lora():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1", "without a GPU, Triton runs only under TRITON_INTERPRET=1"
    from kvloom.kernels import triton_lora

    return triton_lora


@pytest.mark.parametrize("slots,lens", CASES)
@pytest.mark.parametrize("rank", [16, 24])
def test_triton_matches_torch(triton_lora, slots, lens, rank):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, a, b, y, meta = _case(slots, lens, rank=rank, device=device)
    y_ref = y.clone()
    s_ref = torch_ref.lora_shrink(x, a, meta)
    torch_ref.lora_expand(y_ref, s_ref, b, meta)
    s = triton_lora.lora_shrink(x, a, meta)
    torch.testing.assert_close(s, s_ref, rtol=2e-3, atol=2e-3)
    # Expand into a column slice with a non-unit row stride, as fused layers do.
    wide = torch.zeros(y.shape[0], y.shape[1] + 16, device=device)
    wide[:, 8 : 8 + y.shape[1]] = y
    triton_lora.lora_expand(wide[:, 8 : 8 + y.shape[1]], s, b, meta)
    torch.testing.assert_close(wide[:, 8 : 8 + y.shape[1]], y_ref, rtol=2e-3, atol=2e-2)
    assert torch.count_nonzero(wide[:, :8]) == 0 and torch.count_nonzero(wide[:, 8 + y.shape[1] :]) == 0
