"""Multi-LoRA throughput: the core throughput workload with requests spread over many adapters.

`kvloom bench lora` makes `--num-adapters` random PEFT-format adapters of rank `--rank` on all seven
projections of the model (written as adapter_config.json + adapter_model.safetensors, the files
PEFT saves), then runs the seeded throughput workload twice in one process on one engine
(enable_lora=True, max_loras = number of adapters): once with no adapter and once with request i
using adapter i % N. Greedy with ignore_eos, so both runs produce exactly the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_random_adapter(model_dir: str, out_dir: Path, rank: int, seed: int, alpha: int = 32) -> str:
    """A PEFT LoRA adapter with random A and B on every projection of model_dir's architecture."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv = cfg.get("num_key_value_heads", heads) * head_dim
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.01
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "bias": "none",
        "base_model_name_or_path": str(model_dir),
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return str(out_dir)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kvloom bench lora", description=__doc__)
    ap.add_argument("--model", default=None, help="model (default: the SDK's default model)")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--num-adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from kvloom import LLM, LoRARequest, SamplingParams
    from kvloom.bench.workload import make_workload
    from kvloom.engine.model_loader.resolve import resolve_model

    model_dir = resolve_model(args.model)
    with tempfile.TemporaryDirectory(prefix="kvloom-lora-bench-") as tmp:
        loras = [
            LoRARequest(f"adapter-{i}", i + 1, make_random_adapter(model_dir, Path(tmp) / f"a{i}", args.rank, i))
            for i in range(args.num_adapters)
        ]
        llm = LLM(model_dir, enable_lora=True, max_loras=args.num_adapters, max_lora_rank=args.rank)
        items = make_workload(llm.get_tokenizer(), args.num_prompts, args.seed)
        prompts = [it.prompt_token_ids for it in items]
        params = [SamplingParams(temperature=0.0, max_tokens=it.max_tokens, ignore_eos=True) for it in items]
        out_tokens = sum(it.max_tokens for it in items)
        for lora in loras:  # load every adapter before timing
            llm.add_lora(lora)
        results = {}
        for name, lora_requests in (("base", None), ("mixed", [loras[i % len(loras)] for i in range(len(items))])):
            llm.reset_prefix_cache()
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora_requests)
            seconds = time.perf_counter() - t0
            assert sum(len(o.outputs[0].token_ids) for o in outs) == out_tokens
            results[name] = {
                "run": name,
                "adapters": 0 if lora_requests is None else len(loras),
                "rank": args.rank,
                "requests": len(items),
                "output_tokens": out_tokens,
                "seconds": round(seconds, 2),
                "output_tok_per_s": round(out_tokens / seconds, 2),
            }
            print(json.dumps(results[name]), flush=True)
        ratio = results["mixed"]["output_tok_per_s"] / results["base"]["output_tok_per_s"]
        print(
            json.dumps(
                {
                    "mixed_over_base": round(ratio, 3),
                    "bar": 0.7,
                    "machine": f"{platform.processor() or platform.machine()}, {_cores()} cores",
                }
            ),
            flush=True,
        )


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    main()
