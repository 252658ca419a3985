"""Decode steps at TP=1 and TP=N, one after the other: step time and the executor's per-step overhead.

Each (TP size, batch) runs in its own process: a warm-up, then `--max-tokens` decode steps of a
batch of short prompts. The overhead is the multiprocess executor's round trip per step minus rank
0's own time in the step (pickling, pipes, wake-ups).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _child(model: str | None, tp: int, batch: int, max_tokens: int) -> dict:
    from kvloom import LLM, SamplingParams

    llm = LLM(model, tensor_parallel_size=tp, kv_cache_memory_gb=1)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8 + i] for i in range(batch)]
    llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
    executor = llm.llm_engine.executor
    steps0 = llm.get_metrics()["num_steps"]
    overhead0, calls0 = getattr(executor, "overhead_seconds", 0.0), getattr(executor, "num_steps", 0)
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    seconds = time.perf_counter() - t0
    steps = llm.get_metrics()["num_steps"] - steps0
    ms = round(seconds / steps * 1e3, 2)
    result = {"tensor_parallel_size": tp, "batch": batch, "steps": steps, "ms_per_step": ms}
    if tp > 1:
        overhead = (executor.overhead_seconds - overhead0) / (executor.num_steps - calls0)
        result["overhead_us_per_step"] = round(overhead * 1e6, 1)
    llm.shutdown()
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kvloom bench tp", description=__doc__)
    ap.add_argument("--model", default=None, help="model dir, .gguf or alias (default: the embedded model)")
    ap.add_argument("--tensor-parallel-size", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--child", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.model, args.child[0], args.child[1], args.max_tokens)))
        return
    results: dict[tuple[int, int], dict] = {}
    for batch in args.batch:
        for tp in (1, args.tensor_parallel_size):
            cmd = [sys.executable, "-m", "kvloom.bench.tp", "--child", str(tp), str(batch)]
            cmd += ["--max-tokens", str(args.max_tokens)] + (["--model", args.model] if args.model else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(json.dumps({"tp": tp, "batch": batch, "error": out.stderr.strip().splitlines()[-3:]}))
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[(tp, batch)] = res
            print(json.dumps(res), flush=True)
    for batch in args.batch:
        one, many = results.get((1, batch)), results.get((args.tensor_parallel_size, batch))
        if one and many and "overhead_us_per_step" in many:
            share = many["overhead_us_per_step"] / 1e3 / one["ms_per_step"]
            print(
                json.dumps(
                    {
                        "batch": batch,
                        "tp1_ms_per_step": one["ms_per_step"],
                        f"tp{args.tensor_parallel_size}_ms_per_step": many["ms_per_step"],
                        "overhead_vs_tp1_decode_step": round(share, 4),
                    }
                )
            )


if __name__ == "__main__":
    main()
