"""Linear layers that know how they are split across tensor-parallel ranks.

Each parameter carries a `weight_loader(param, loaded, shard_id)` that copies this rank's slice
of a checkpoint tensor, so the model files stay plain descriptions of the network. The same slicing
serves LoRA weights: `output_slices()` names the sub-projections of a fused layer, `shard_rows()`
cuts a tensor's output rows for this rank, `shard_cols()` its input columns. A layer with `lora`
set adds the batched per-token LoRA delta after its matmul (see kvloom.engine.lora.layers).
"""

from __future__ import annotations

import torch
from torch import nn

from kvloom.engine.parallel import SINGLE, TPContext
from kvloom.kernels import dense_linear, pack_linear_weight, packed_linear


class _Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPContext) -> None:
        super().__init__()
        self.tp = tp
        # This rank's sizes; a quantized layer (kvloom.engine.layers.quant) replaces `weight` by int tensors.
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.params_dtype, self.params_device = self.weight.dtype, self.weight.device
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        self.lora = None  # a LinearLoRA once the engine enables LoRA
        self.quant = None  # a QuantizedLinearMethod when the weights are int8/int4
        self.weight_packed = None  # the C++ kernel's panels once pack_weight() ran (then `weight` is gone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x, self.bias)
        if self.lora is not None:
            self.lora.apply(x, y)
        return y

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.apply(x, bias)
        if self.weight_packed is not None:
            return packed_linear(x, self.weight_packed, self.out_features, bias)
        return dense_linear(x, self.weight, bias)

    def pack_weight(self, dtype: torch.dtype = torch.float32) -> int:
        """Replace the float32 CPU weight by the C++ kernel's packed layout in dtype (float32, or bfloat16 in
        the CPU bfloat16 mode) after loading; its bytes, 0 if kept."""
        return 0 if self.quant is not None else pack_module_weight(self, dtype)

    # ---- this rank's slices (checkpoint weights and LoRA weights alike) ----------------------
    def output_slices(self) -> list[tuple[object, int, int]]:
        """(shard id, offset, size) of each sub-projection in this rank's output features."""
        return [(None, 0, self.out_features)]

    def shard_rows(self, t: torch.Tensor, shard_id: object = None) -> torch.Tensor:
        """This rank's output rows of a full tensor for sub-projection shard_id."""
        return t

    def shard_cols(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's input columns of a full [*, in_features] tensor."""
        return t

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
        if dst.shape != src.shape:
            raise ValueError(f"checkpoint tensor for {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(src)


class ColumnParallelLinear(_Linear):
    """Output features split across ranks; no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPContext = SINGLE):
        super().__init__(in_features, tp.shard(out_features, "output features"), bias, tp)

    def shard_rows(self, t: torch.Tensor, shard_id: object = None) -> torch.Tensor:
        size = self.out_features
        return t.narrow(0, self.tp.rank * size, size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        self._copy(param.data, self.shard_rows(loaded), "column-parallel weight")


class MergedColumnParallelLinear(_Linear):
    """Several column-parallel outputs (gate and up) stored as one matrix for one matmul."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False, tp: TPContext = SINGLE):
        self.out_sizes = [tp.shard(n, "output features") for n in out_sizes]
        super().__init__(in_features, sum(self.out_sizes), bias, tp)

    def output_slices(self) -> list[tuple[object, int, int]]:
        return [(i, sum(self.out_sizes[:i]), size) for i, size in enumerate(self.out_sizes)]

    def shard_rows(self, t: torch.Tensor, shard_id: object = 0) -> torch.Tensor:
        size = self.out_sizes[shard_id]
        return t.narrow(0, self.tp.rank * size, size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        _, offset, size = self.output_slices()[shard_id]
        self._copy(param.data.narrow(0, offset, size), self.shard_rows(loaded, shard_id), f"merged shard {shard_id}")


class QKVParallelLinear(_Linear):
    """Query, key and value projections in one matrix, split across ranks by heads."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp: TPContext = SINGLE,
    ):
        self.num_heads = tp.shard(num_heads, "num_attention_heads")
        # With fewer KV heads than ranks each KV head is replicated.
        self.num_kv_heads = tp.kv_heads(num_kv_heads)
        self.head_size = head_size
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias, tp)

    def output_slices(self) -> list[tuple[object, int, int]]:
        return [
            ("q", 0, self.q_size),
            ("k", self.q_size, self.kv_size),
            ("v", self.q_size + self.kv_size, self.kv_size),
        ]

    def shard_rows(self, t: torch.Tensor, shard_id: object = "q") -> torch.Tensor:
        if shard_id == "q":
            return t.narrow(0, self.tp.rank * self.q_size, self.q_size)
        replicas = max(1, self.tp.size // (t.shape[0] // self.head_size))
        return t.narrow(0, (self.tp.rank // replicas) * self.kv_size, self.kv_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str = "q") -> None:
        _, offset, size = next(s for s in self.output_slices() if s[0] == shard_id)
        self._copy(param.data.narrow(0, offset, size), self.shard_rows(loaded, shard_id), f"{shard_id}_proj")


class RowParallelLinear(_Linear):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPContext = SINGLE):
        super().__init__(tp.shard(in_features, "input features"), out_features, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self._matmul(x, None))
        if self.lora is not None:
            # Shrink on this rank's input columns, sum the partial [T, r] over ranks, then expand.
            self.lora.apply(x, y, reduce=self.tp.all_reduce)
        # The bias is added once, after the sum.
        return y + self.bias if self.bias is not None else y

    def shard_cols(self, t: torch.Tensor) -> torch.Tensor:
        size = self.in_features
        return t.narrow(1, self.tp.rank * size, size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:
            self._copy(param.data, loaded, "row-parallel bias")
            return
        self._copy(param.data, self.shard_cols(loaded), "row-parallel weight")


def pack_module_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace module.weight (float32 on CPU, row-major [N, K]) by module.weight_packed, the C++ kernel's
    panels in dtype (kvloom.kernels.pack_linear_weight); its bytes, or 0 where the kernel does not serve
    the weight."""
    if module.weight_packed is not None:
        return 0
    packed = pack_linear_weight(module.weight.data, dtype)
    if packed is None:
        return 0
    del module.weight
    module.weight_packed = nn.Parameter(packed, requires_grad=False)
    return packed.numel() * packed.element_size()


def pack_linear_weights(model: nn.Module, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """Pack every float32 CPU linear weight of a loaded model, and its logits head (see
    VocabParallelEmbedding.pack_weight), as panels in dtype; (layers packed, their bytes)."""
    count = total = 0
    head = getattr(model, "logits_head", None)
    modules = [m for m in model.modules() if isinstance(m, _Linear)] + ([head()] if head is not None else [])
    for module in modules:
        nbytes = module.pack_weight(dtype)
        count += nbytes > 0
        total += nbytes
    return count, total
