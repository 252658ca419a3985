"""Float32 linear layers at decode batch sizes: torch's F.linear (BLAS) vs kvloom's C++ kernel.

For each projection shape of the default model (qkv, o, gate_up, down, LM head) and each row count,
times BLAS, the kernel on a row-major weight (`kernel_*`: it transposes its panels per call) and, with
an AVX2 build, the kernel on weights packed once as the engine holds them (`packed_*`) and on the CPU
bfloat16 mode's bfloat16 panels (`packed_bf16_*`: AVX512_BF16 dot products over inputs rounded to
bfloat16 where the CPU has them, `bf16_gemm` says which), each over 30 weight matrices (so the weights
stream from memory, as in a forward pass), and prints one JSON line with microseconds per call and the
weight bandwidth and GFLOP/s each reaches.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def _time(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kvloom bench linear", description=__doc__)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    from kvloom.kernels import bf16_dot_products, pack_linear_weight
    from kvloom.kernels.cpu_ops import load_cpu_ops

    ops = load_cpu_ops()
    if ops is None:
        raise SystemExit("the C++ CPU kernels are unavailable here")
    gen = torch.Generator().manual_seed(0)
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k, generator=gen) for _ in range(1 if name == "lm_head" else 30)]
        packs = [ops.pack_linear_weight(w) for w in weights] if ops.packed_linear_available() else None
        bf16_packs = [pack_linear_weight(w, torch.bfloat16) for w in weights] if packs is not None else None
        for rows in args.rows:
            x = torch.randn(rows, k, generator=gen)
            blas = _time(lambda x=x, ws=weights: [torch.nn.functional.linear(x, w) for w in ws], args.repeats)
            kernel = _time(lambda x=x, ws=weights: [ops.linear_small_m(x, w, None) for w in ws], args.repeats)
            times = {"blas": blas / len(weights), "kernel": kernel / len(weights)}
            if packs is not None:
                packed = _time(lambda x=x, ps=packs, n=n: [ops.linear_packed(x, p, n) for p in ps], args.repeats)
                times["packed"] = packed / len(weights)
                bf16 = _time(lambda x=x, ps=bf16_packs, n=n: [ops.linear_packed(x, p, n) for p in ps], args.repeats)
                times["packed_bf16"] = bf16 / len(weights)
            flops = 2 * rows * n * k / 1e9
            result = {"shape": name, "n": n, "k": k, "rows": rows}
            if packs is not None:
                result["bf16_gemm"] = "avx512_bf16 dot products" if bf16_dot_products() else "widened to float32"
            for what, t in times.items():
                gb = n * k * (2 if what == "packed_bf16" else 4) / 1e9
                result |= {f"{what}_us": round(t * 1e6, 1), f"{what}_gb_s": round(gb / t, 1)}
                result[f"{what}_gflop_s"] = round(flops / t, 1)
            result["speedup"] = round(times["blas"] / min(times["kernel"], times.get("packed", times["kernel"])), 2)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
