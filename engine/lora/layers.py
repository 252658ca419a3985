"""LoRA on a (possibly fused, possibly sharded) linear layer: stacked slot weights and the batched delta."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvloom.kernels import KernelBackend, LoRAMetadata


class LoRAContext:
    """Per-step LoRA metadata shared by every LoRA layer of a model; None when no token uses an adapter."""

    def __init__(self) -> None:
        self.meta: LoRAMetadata | None = None


class LinearLoRA:
    """Slot weights for one linear layer, one sub-projection per fused slice (q/k/v, gate/up).

    A: [max_loras, num_slices * max_rank, in] (slice i in rows i*R..i*R+r), so one shrink serves
    every slice; B: [max_loras, out, max_rank] (slice i's rows at its output offset), expanded
    slice by slice into the layer's output. Unused rank rows stay zero, so they add nothing.
    """

    def __init__(
        self,
        layer,
        layer_idx: int,
        modules: list[str],
        max_loras: int,
        max_rank: int,
        ctx: LoRAContext,
        kernels: KernelBackend,
    ) -> None:
        self.layer = layer
        self.layer_idx = layer_idx
        self.modules = modules
        self.slices = layer.output_slices()
        if len(modules) != len(self.slices):
            raise ValueError(f"{type(layer).__name__} has {len(self.slices)} output slices, got modules {modules}")
        self.rank = max_rank
        self.ctx = ctx
        self.kernels = kernels
        # Sizes from the layer, not its weight: a quantized base layer holds packed int weights.
        dtype, device = layer.params_dtype, layer.params_device
        self.a = torch.zeros(max_loras, len(modules) * max_rank, layer.in_features, dtype=dtype, device=device)
        self.b = torch.zeros(max_loras, layer.out_features, max_rank, dtype=dtype, device=device)

    def set_slot(self, slot: int, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        """Copy an adapter's weights for this layer into a slot (None clears it)."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        if weights is None:
            return
        R = self.rank
        for i, (module, (shard_id, offset, size)) in enumerate(zip(self.modules, self.slices)):
            ab = weights.get((self.layer_idx, module))
            if ab is None:
                continue
            a, b = ab
            r = a.shape[0]
            self.a[slot, i * R : i * R + r].copy_(self.layer.shard_cols(a))
            self.b[slot, offset : offset + size, :r].copy_(self.layer.shard_rows(b, shard_id))

    def apply(self, x: torch.Tensor, y: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """y += the LoRA delta of every token that uses an adapter (in place)."""
        meta = self.ctx.meta
        if meta is None:
            return
        s = self.kernels.lora_shrink(x, self.a, meta)
        if reduce is not None:
            s = reduce(s)
        R = self.rank
        for i, (_, offset, size) in enumerate(self.slices):
            self.kernels.lora_expand(
                y[:, offset : offset + size], s[:, i * R : (i + 1) * R], self.b[:, offset : offset + size], meta
            )

    @property
    def num_bytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()
