"""The logit-mask kernel against a per-token reference, and against xgrammar's own bit layout."""

from __future__ import annotations

import torch

from kvloom.kernels import torch_ref


def reference(logits, bitmask, rows):
    out = logits.clone()
    for i, row in enumerate(rows):
        for token in range(out.shape[1]):
            word, bit = divmod(token, 32)
            if word >= bitmask.shape[1] or not (int(bitmask[i, word]) >> bit) & 1:
                out[row, token] = float("-inf")
    return out


def test_matches_the_reference_with_padding_and_row_selection():
    gen = torch.Generator().manual_seed(0)
    for vocab, words in [(70, 3), (96, 3), (100, 3), (33, 2)]:
        logits = torch.randn(5, vocab, generator=gen)
        bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), generator=gen, dtype=torch.int64).to(torch.int32)
        rows = torch.tensor([4, 0, 2])
        expected = reference(logits, bitmask, rows.tolist())
        torch_ref.apply_token_bitmask(logits, bitmask, rows)
        assert torch.equal(logits, expected)


def test_bit_layout_matches_xgrammar():
    import xgrammar

    vocab = 100
    allowed = [0, 31, 32, 63, 64, 99]
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)
    bitmask.zero_()
    for t in allowed:
        bitmask[0, t // 32] |= 1 << (t % 32) if t % 32 != 31 else -(2**31)
    ours = torch.zeros(1, vocab)
    torch_ref.apply_token_bitmask(ours, bitmask, torch.tensor([0]))
    theirs = torch.zeros(1, vocab)
    xgrammar.apply_token_bitmask_inplace(theirs, bitmask)
    assert torch.equal(ours, theirs)
    assert torch.isfinite(ours[0]).nonzero().flatten().tolist() == allowed
