"""Weight-only int8 / int4 linear layers (activations and accumulation in float32).

A quantized linear keeps its int weights packed for torch's CPU kernels:
int8 per output channel, symmetric (w = q * scale), multiplied by `aten._weight_int8pack_mm`;
int4 group-wise along the input features (w = q * scale + min, q in 0..15), repacked by
`aten._convert_weight_to_int4pack_for_cpu` and multiplied by `aten._weight_int4pack_mm_for_cpu`.
Where a fused op is missing or refuses a shape (or int8 has several scales per row, as GGUF's
Q8_0), the layer dequantizes chunks of rows and multiplies them in float32 instead; the path is logged.

Two ways in. A quantized checkpoint (GPTQ, AWQ, a kept-quantized GGUF; kvloom.engine.model_loader.
quant_formats turns each into these names) loads into int parameters that replace `weight`:
`weight` (int8 q, or uint8 q in 0..15 for int4) [out, in], `weight_scale` [out, groups] and, for int4,
`weight_min` [out, groups], each with a weight loader that slices this rank's rows (and, row-parallel,
whole groups of columns) like the float weight's. An on-the-fly "int8"/"int4" loads the float
checkpoint as usual and quantizes each linear after loading. Either way `finish_quantization` packs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# Group sizes torch's int4 CPU kernel is used with (largest that divides the layer's input features).
INT4_GROUP_SIZES = (128, 64, 32)
_DEQUANT_CHUNK_ROWS = 1024


@dataclass(frozen=True)
class QuantConfig:
    """How the engine's linear layers hold their weights.

    method: the user-facing name (gptq, awq, fp8, gguf, int8, int4). bits: 8 or 4 for int layers,
    None where weights end up in the engine dtype (fp8 is dequantized at load). group_size: the
    checkpoint's int4 group (None: chosen per layer, or per output channel for int8).
    from_checkpoint: the checkpoint holds the int weights; otherwise float weights are quantized
    after loading.
    """

    method: str
    bits: int | None
    group_size: int | None = None
    from_checkpoint: bool = False
    checkpoint_format: str | None = None
    weight_block_size: tuple[int, int] | None = None  # fp8 block scales


def int8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (q [N, K] int8, scale [N, 1] float32)."""
    w = w.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale


def int4_quantize(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4: (q [N, K] uint8 in 0..15, scale [N, G], min [N, G]) with w ~ q * scale + min."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, lo


def dequantize(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> torch.Tensor:
    """Float32 weight [N, K] from int values and per-group scale (and min, for int4)."""
    n, k = q.shape
    groups = scale.shape[1]
    w = q.float().reshape(n, groups, k // groups) * scale.float()[..., None]
    if minimum is not None:
        w = w + minimum.float()[..., None]
    return w.reshape(n, k)


def int4_group_size(in_features: int, checkpoint_group: int | None, name: str) -> int:
    """The kernel's group size for a layer: the largest supported one that divides its input features
    and the checkpoint's group (a checkpoint group of 128 runs as 128, of -1 as 128/64/32 with the
    scale repeated)."""
    for g in INT4_GROUP_SIZES:
        if in_features % g == 0 and (checkpoint_group is None or checkpoint_group % g == 0):
            return g
    raise ValueError(
        f"{name}: int4 needs in_features ({in_features}, per rank) and the group size "
        f"({checkpoint_group or 'per row'}) to be multiples of one of {INT4_GROUP_SIZES}"
        + ("" if checkpoint_group else "; use quantization='int8' for this model")
    )


class QuantizedLinearMethod:
    """The int weights of one linear layer (layer.quant): loaders, packing, and the matmul."""

    def __init__(self, layer: nn.Module, cfg: QuantConfig, name: str) -> None:
        self.layer = layer
        self.cfg = cfg
        self.name = name
        self.bits = cfg.bits
        self.out_features = layer.out_features
        self.in_features = layer.in_features
        self.row_parallel = layer.tp.size > 1 and _is_row_parallel(layer)
        self.path = "unpacked"
        self.packed: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.minimum: torch.Tensor | None = None
        self.scales_and_zeros: torch.Tensor | None = None
        self.group_size: int | None = None
        if cfg.from_checkpoint:
            self._create_checkpoint_params()

    # ---- loading ----------------------------------------------------------------------------
    def _create_checkpoint_params(self) -> None:
        """Replace the float `weight` by int parameters that the quantized checkpoint's tensors load into."""
        layer, n, k = self.layer, self.out_features, self.in_features
        device = layer.weight.device
        if self.bits == 4:
            self.group_size = int4_group_size(k, self.cfg.group_size, self.name)
            groups = k // self.group_size
        elif self.cfg.group_size is not None:  # group-wise int8 (GGUF Q8_0)
            if k % self.cfg.group_size:
                raise ValueError(
                    f"{self.name}: in_features {k} is not a multiple of the group size {self.cfg.group_size}"
                )
            groups = k // self.cfg.group_size
        else:
            groups = 1
        del layer.weight
        qdtype = torch.int8 if self.bits == 8 else torch.uint8
        layer.weight = nn.Parameter(torch.empty(n, k, dtype=qdtype, device=device), requires_grad=False)
        layer.weight_scale = nn.Parameter(torch.empty(n, groups, dtype=torch.float32, device=device), False)
        names = ["weight", "weight_scale"]
        if self.bits == 4:
            layer.weight_min = nn.Parameter(torch.empty(n, groups, dtype=torch.float32, device=device), False)
            names.append("weight_min")
        for pname in names:
            getattr(layer, pname).weight_loader = self._loader

    def _loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        layer = self.layer
        if loaded.is_floating_point() and param.dtype in (torch.int8, torch.uint8):
            raise ValueError(
                f"{self.name}: the checkpoint holds a float weight for a layer that its quantization_config "
                "quantizes (modules left unquantized are not supported)"
            )
        if param.dtype == torch.float32 and self.bits == 4:
            # Repeat a coarser checkpoint group (or one scale per row) down to the kernel's group size.
            full_groups = param.shape[1] * (layer.tp.size if self.row_parallel else 1)
            if full_groups % loaded.shape[1]:
                raise ValueError(f"{self.name}: {loaded.shape[1]} scale groups do not divide into {full_groups}")
            loaded = loaded.float().repeat_interleave(full_groups // loaded.shape[1], dim=1)
        slices = layer.output_slices()
        if shard_id is None:
            dst = param.data
            src = layer.shard_rows(loaded)
        else:
            _, offset, size = next(s for s in slices if s[0] == shard_id)
            dst = param.data.narrow(0, offset, size)
            src = layer.shard_rows(loaded, shard_id)
        if self.row_parallel and not (param.dtype == torch.float32 and loaded.shape[1] == 1):
            per_rank = dst.shape[1]
            src = src.narrow(1, layer.tp.rank * per_rank, per_rank)
        if dst.shape != src.shape:
            raise ValueError(
                f"checkpoint tensor for {self.name} ({shard_id or 'weight'}) has shape {tuple(src.shape)}, "
                f"expected {tuple(dst.shape)}"
            )
        dst.copy_(src)

    # ---- after loading ----------------------------------------------------------------------
    def finish(self) -> None:
        """Quantize (on the fly) or take the loaded int tensors, pack them for the kernel, drop the rest."""
        layer = self.layer
        if self.cfg.from_checkpoint:
            q = layer.weight.data
            scale = layer.weight_scale.data
            minimum = layer.weight_min.data if self.bits == 4 else None
            for pname in ("weight", "weight_scale", "weight_min"):
                if hasattr(layer, pname):
                    delattr(layer, pname)
        else:
            w = layer.weight.data
            del layer.weight
            if self.bits == 8:
                q, scale = int8_quantize(w)
                minimum = None
            else:
                self.group_size = int4_group_size(self.in_features, None, self.name)
                q, scale, minimum = int4_quantize(w, self.group_size)
            del w
        if self.bits == 8:
            self._pack_int8(q, scale)
        else:
            self._pack_int4(q, scale, minimum)
        self.layer = None  # no reference cycle: the layer owns this, not the other way round

    def _pack_int8(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.packed = q.contiguous()
        if scale.shape[1] == 1:
            self.scale = scale[:, 0].float().contiguous()
            self.path = "int8pack_mm"
            if not self._kernel_works(dequantize(q, scale, None)):
                self.path, self.scale = "dequant", scale.float().contiguous()
        else:
            self.scale = scale.float().contiguous()
            self.path = "dequant"

    def _pack_int4(self, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> None:
        self.scale, self.minimum = scale.float().contiguous(), minimum.float().contiguous()
        self.packed = q.contiguous()
        self.path = "dequant"
        if self.group_size in INT4_GROUP_SIZES and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            try:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            except RuntimeError as exc:
                logger.debug("%s: int4 packing refused (%s)", self.name, exc)
            else:
                # The kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale: [groups, out, 2].
                zero = self.minimum + 8 * self.scale
                sz = torch.stack([self.scale, zero], dim=-1).transpose(0, 1).contiguous()
                keep = self.packed, self.scales_and_zeros
                self.packed, self.scales_and_zeros, self.path = packed, sz, "int4pack_mm"
                if self._kernel_works(dequantize(q, scale, minimum)):
                    self.scale = self.minimum = None
                    return
                self.packed, self.scales_and_zeros, self.path = *keep, "dequant"

    def _kernel_works(self, reference: torch.Tensor) -> bool:
        """Run the fused op once against the dequantized weight; a refusal or mismatch means dequant."""
        x = torch.randn(2, self.in_features, device=self.packed.device)
        try:
            y = self._matmul(x)
        except (RuntimeError, NotImplementedError) as exc:
            logger.debug("%s: %s unavailable (%s)", self.name, self.path, exc)
            return False
        ref = x @ reference.T
        return bool(torch.allclose(y, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()) + 1e-5))

    # ---- forward ----------------------------------------------------------------------------
    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.path == "int8pack_mm":
            return torch.ops.aten._weight_int8pack_mm(x, self.packed, self.scale)
        if self.path == "int4pack_mm":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)
        out = []
        for start in range(0, self.out_features, _DEQUANT_CHUNK_ROWS):
            rows = slice(start, start + _DEQUANT_CHUNK_ROWS)
            minimum = None if self.minimum is None else self.minimum[rows]
            out.append(F.linear(x, dequantize(self.packed[rows], self.scale[rows], minimum)))
        return torch.cat(out, dim=-1)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T (+ bias) with float32 activations, in x's dtype."""
        shape = x.shape
        y = self._matmul(x.reshape(-1, shape[-1]).float().contiguous()).to(x.dtype)
        y = y.reshape(*shape[:-1], self.out_features)
        return y + bias if bias is not None else y

    def dequantized(self) -> torch.Tensor:
        """The float32 weight this layer multiplies by (for tests and references)."""
        if self.path == "int4pack_mm":
            eye = torch.eye(self.in_features, device=self.packed.device)
            return self._matmul(eye).T.contiguous()
        scale = self.scale if self.scale.dim() == 2 else self.scale[:, None]
        return dequantize(self.packed, scale, self.minimum)

    @property
    def num_bytes(self) -> int:
        tensors = (self.packed, self.scale, self.minimum, self.scales_and_zeros)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _is_row_parallel(layer: nn.Module) -> bool:
    from kvloom.engine.layers.linear import RowParallelLinear

    return isinstance(layer, RowParallelLinear)


def quantized_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from kvloom.engine.layers.linear import _Linear

    return [(name, m) for name, m in model.named_modules() if isinstance(m, _Linear)]


def prepare_quantization(model: nn.Module, cfg: QuantConfig) -> None:
    """Give every linear layer of the model its int weights (before loading the checkpoint)."""
    if cfg.bits is None:
        return
    for name, layer in quantized_linears(model):
        layer.quant = QuantizedLinearMethod(layer, cfg, name)


def finish_quantization(model: nn.Module, cfg: QuantConfig) -> None:
    """Pack every quantized linear after loading, and log the kernels and weight memory."""
    if cfg.bits is None:
        return
    paths: dict[str, int] = {}
    total = 0
    for _, layer in quantized_linears(model):
        layer.quant.finish()
        paths[layer.quant.path] = paths.get(layer.quant.path, 0) + 1
        total += layer.quant.num_bytes
    summary = ", ".join(f"{n} via {p}" for p, n in sorted(paths.items()))
    logger.info("quantization %s: int%d linear weights %.1f MiB (%s)", cfg.method, cfg.bits, total / 2**20, summary)
