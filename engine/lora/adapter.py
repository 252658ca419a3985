"""Read a PEFT LoRA adapter directory and check it against the base model.

A PEFT adapter is `adapter_config.json` (r, lora_alpha, target_modules, use_rslora, ...) and
`adapter_model.safetensors` with tensors named like
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ([r, in]) and `...lora_B.weight`
([out, r]). Pickled `adapter_model.bin` files are read only with `torch.load(weights_only=True)`.
The scaling (lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA) is folded into B here, once.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kvloom.engine.lora.request import LoRARequest

# The projections an adapter may target, by their PEFT/HF module names.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


class LoRALoadError(ValueError):
    """An adapter that cannot be used with this engine; the message says why."""


@dataclass
class LoRAAdapter:
    """One adapter's weights, per (layer, module): A [r, in] and B [out, r] with the scaling folded in."""

    lora_int_id: int
    name: str
    path: str
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def lora_shapes(c) -> dict[str, tuple[int, int]]:
    """Full (unsharded) (in_features, out_features) of every projection an adapter may target (c: ArchConfig)."""
    q, kv = c.num_heads * c.head_size, c.num_kv_heads * c.head_size
    return {
        "q_proj": (c.hidden_size, q),
        "k_proj": (c.hidden_size, kv),
        "v_proj": (c.hidden_size, kv),
        "o_proj": (q, c.hidden_size),
        "gate_proj": (c.hidden_size, c.intermediate_size),
        "up_proj": (c.hidden_size, c.intermediate_size),
        "down_proj": (c.intermediate_size, c.hidden_size),
    }


def load_adapter(
    request: LoRARequest,
    shapes: dict[str, tuple[int, int]],
    num_layers: int,
    max_rank: int,
    dtype: torch.dtype,
) -> LoRAAdapter:
    """Load and validate `request`'s adapter; `shapes` maps a target module to its (in, out) features."""
    where = f"LoRA adapter {request.lora_name!r} (id {request.lora_int_id})"
    if not request.lora_path:
        raise LoRALoadError(f"{where}: lora_path is empty")
    path = Path(request.lora_path).expanduser()
    if not path.is_dir():
        raise LoRALoadError(f"{where}: {path} is not a directory (a local PEFT adapter directory is expected)")
    cfg = _read_config(path / "adapter_config.json", where)
    rank = cfg.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise LoRALoadError(f"{where}: adapter_config.json has no valid rank 'r' (got {rank!r})")
    if rank > max_rank:
        raise LoRALoadError(f"{where}: rank {rank} exceeds max_lora_rank={max_rank}; raise max_lora_rank")
    for key, what in (
        ("use_dora", "DoRA adapters"),
        ("modules_to_save", "modules_to_save (fully trained extra modules)"),
        ("rank_pattern", "per-module ranks (rank_pattern)"),
        ("alpha_pattern", "per-module alphas (alpha_pattern)"),
    ):
        if cfg.get(key):
            raise LoRALoadError(f"{where}: {what} are not supported")
    if cfg.get("bias", "none") != "none":
        raise LoRALoadError(f"{where}: trained biases (bias={cfg['bias']!r}) are not supported")
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)):
        unknown = sorted(set(targets) - set(TARGET_MODULES))
        if unknown:
            raise LoRALoadError(
                f"{where}: unknown target module(s) {', '.join(unknown)}; supported: {', '.join(TARGET_MODULES)}"
            )
    alpha = cfg.get("lora_alpha", rank)
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in _read_tensors(path, where).items():
        if "lora_embedding" in key or "lm_head" in key or "embed_tokens" in key:
            raise LoRALoadError(f"{where}: adapters on embeddings or the LM head are not supported ({key})")
        m = _KEY.search(key)
        if m is None:
            raise LoRALoadError(f"{where}: unexpected tensor {key!r} in the adapter weights")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if module not in shapes:
            raise LoRALoadError(f"{where}: unknown target module {module!r}; supported: {', '.join(TARGET_MODULES)}")
        if layer >= num_layers:
            raise LoRALoadError(f"{where}: tensor {key!r} names layer {layer}, but the model has {num_layers}")
        pairs.setdefault((layer, module), {})[which] = tensor
    if not pairs:
        raise LoRALoadError(f"{where}: the adapter has no LoRA weights")

    weights = {}
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise LoRALoadError(f"{where}: layer {layer} {module} has lora_A or lora_B but not both")
        a, b = ab["A"], ab["B"]
        if fan_in_fan_out:
            a, b = a.t(), b.t()
        fan_in, fan_out = shapes[module]
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise LoRALoadError(
                f"{where}: layer {layer} {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, but this base "
                f"model needs A ({rank}, {fan_in}) and B ({fan_out}, {rank}); was it trained for another model?"
            )
        weights[(layer, module)] = (
            a.to(dtype).contiguous(),
            (b.to(torch.float32) * scaling).to(dtype).contiguous(),
        )
    return LoRAAdapter(request.lora_int_id, request.lora_name, str(path), rank, scaling, weights)


def _read_config(path: Path, where: str) -> dict:
    if not path.is_file():
        raise LoRALoadError(f"{where}: {path} is missing")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LoRALoadError(f"{where}: cannot read {path.name}: {e}") from None
    if not isinstance(cfg, dict):
        raise LoRALoadError(f"{where}: {path.name} is not a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise LoRALoadError(f"{where}: peft_type {peft_type!r} is not LORA")
    return cfg


def _read_tensors(path: Path, where: str) -> dict[str, torch.Tensor]:
    st = path / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except Exception as e:  # a truncated or foreign file
            raise LoRALoadError(f"{where}: cannot read {st.name}: {e}") from None
    pickled = path / "adapter_model.bin"
    if pickled.is_file():
        try:
            # weights_only refuses arbitrary pickled objects: tensors and plain containers only.
            return torch.load(str(pickled), map_location="cpu", weights_only=True)
        except Exception as e:
            raise LoRALoadError(f"{where}: refusing {pickled.name} (loaded with weights_only=True): {e}") from None
    raise LoRALoadError(f"{where}: no adapter_model.safetensors (or adapter_model.bin) in {path}")
