"""Read checkpoint tensors from safetensors files (never pickle)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open


def safetensors_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        hint = (
            f" (found {', '.join(pickled)}: pickle checkpoints are refused; convert them to safetensors)"
            if pickled
            else ""
        )
        raise ValueError(f"no .safetensors weights in {model_dir}{hint}")
    return files


def iter_weights(model_dir: str | Path, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of the checkpoint, cast to dtype (None: as stored, for quantized checkpoints)."""
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                yield name, tensor if dtype is None else tensor.to(dtype)
