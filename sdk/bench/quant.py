"""Lower-precision weights on the default model: single-stream decode tok/s and memory, float32 vs bfloat16,
int8 and int4.

Each variant runs in its own process (so peak RSS is its own): float32 (the default conversion),
bfloat16 (dtype="bfloat16": on CPU the bfloat16 mode, bfloat16 weight panels and KV cache with float32
activations), quantization="int8" and "int4" (the float32 model quantized at load) and
quantization="gguf" (the default model's Q4_1 GGUF kept quantized: int4, groups of 32). A variant's
weight memory counts every parameter plus the packed int weights; decode tok/s is (max_tokens - 1)
tokens over the time between the first token and the last of one greedy request; `same_tokens`
counts how many leading tokens agree with float32's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("float32", "bfloat16", "int8", "int4", "gguf")
PROMPT = "Write a short story about a robot who learns to paint."


def _weight_bytes(model) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(m.quant.num_bytes for m in model.modules() if getattr(m, "quant", None) is not None)


def _child(model: str | None, variant: str, max_tokens: int, repeats: int) -> dict:
    import psutil

    from kvloom import LLM, SamplingParams

    quantization = None if variant in ("float32", "bfloat16") else variant
    dtype = "bfloat16" if variant == "bfloat16" else "auto"
    t0 = time.perf_counter()
    llm = LLM(model, dtype=dtype, quantization=quantization, kv_cache_memory_gb=0.25, enable_prefix_caching=False)
    load_s = time.perf_counter() - t0
    rss_loaded = psutil.Process().memory_info().rss
    runner = llm.llm_engine.executor.worker.runner
    paths = sorted({m.quant.path for m in runner.model.modules() if getattr(m, "quant", None) is not None})
    packed = sorted({str(p.dtype).removeprefix("torch.") for n, p in runner.model.named_parameters() if "packed" in n})
    paths += [f"C++ GEMM on {d} panels" for d in packed]
    prompt = [{"role": "user", "content": PROMPT}]
    first = SamplingParams(temperature=0.0, max_tokens=1)
    full = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.chat(prompt, full, use_tqdm=False)  # warm-up
    rates, tokens = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.chat(prompt, first, use_tqdm=False)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = llm.chat(prompt, full, use_tqdm=False)[0]
        t_all = time.perf_counter() - t0
        rates.append((max_tokens - 1) / (t_all - t_first))
        tokens = out.outputs[0].token_ids
    result = {
        "variant": variant,
        "kernels": paths or ["float matmul"],
        "load_s": round(load_s, 2),
        "weight_mib": round(_weight_bytes(runner.model) / 2**20, 1),
        "rss_after_load_mib": round(rss_loaded / 2**20, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1),
        "decode_tok_s": round(sorted(rates)[len(rates) // 2], 1),
        "tokens": tokens,
    }
    llm.shutdown()
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kvloom bench quant", description=__doc__)
    ap.add_argument("--model", default=None, help="model dir, .gguf or alias (default: the default model)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.model, args.child, args.max_tokens, args.repeats)))
        return
    if "gguf" in args.variants:  # convert once beforehand, so that no variant's peak RSS includes a conversion
        from kvloom.engine.model_loader.resolve import resolve_gguf_quantized

        resolve_gguf_quantized(args.model)
    results = []
    for variant in args.variants:
        cmd = [sys.executable, "-m", "kvloom.bench.quant", "--child", variant]
        cmd += ["--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats)]
        cmd += ["--model", args.model] if args.model else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            results.append({"variant": variant, "error": out.stderr.strip().splitlines()[-3:]})
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = next((r["tokens"] for r in results if r.get("variant") == "float32"), None)
    for r in results:
        tokens = r.pop("tokens", None)
        if ref is not None and tokens is not None:
            r["same_tokens"] = next((i for i, (a, b) in enumerate(zip(ref, tokens)) if a != b), len(ref))
    print(json.dumps({"max_tokens": args.max_tokens, "results": results}, indent=2))


if __name__ == "__main__":
    main()
