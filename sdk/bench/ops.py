"""Where a batched step's time goes, kernel by kernel.

Runs the throughput workload (-n prompts of --prompt-len 32-512 tokens, seed 0, every output --max-tokens long,
greedy, ignore_eos) through `LLM.generate` in this process on the default model (or --model) in
float32, and during steps --start .. --start + --steps - 1 times every call into the C++ CPU kernels
(each linear layer shape on its own line) and each step's forward pass. Prints one JSON line per
kernel (milliseconds and calls per step), then one for the window: its steps' mean batch (sequences,
tokens), the forward pass per step, and what is left outside the kernels (torch ops, Python). With
-n 64 the steps from ~10 on decode all 64 sequences; lower --start to see prefill steps (-n 1 --start 1
--steps 1: one prompt's prefill). Steps are counted after a one-token warm-up request.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict


class _WindowDone(Exception):
    """Raised from the forward pass once the timed window is over, to stop generation early."""


class _TimedOps:
    """Stands in for the compiled kernel module: every call is timed while `on` is set."""

    def __init__(self, ops) -> None:
        self._ops = ops
        self.on = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __getattr__(self, name: str):
        fn = getattr(self._ops, name)

        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            key = name
            if name == "linear_small_m":
                key = f"linear {args[1].shape[0]}x{args[1].shape[1]}"
            elif name == "linear_packed":  # (x, packed [N / 16, K, 16], N): the engine's own weights
                key = f"linear {args[2]}x{args[1].shape[1]}"
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
                self.calls[key] += 1

        return timed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kvloom bench ops", description=__doc__)
    ap.add_argument("--model", default=None, help="model dir, .gguf or alias (default: the embedded model)")
    ap.add_argument("-n", "--num-prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[32, 512], metavar=("MIN", "MAX"))
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--start", type=int, default=20, help="first timed step (1-based)")
    ap.add_argument("--steps", type=int, default=10, help="steps timed")
    ap.add_argument("--engine-kwargs", default="{}", help="JSON of extra LLM(...) arguments")
    args = ap.parse_args(argv)
    if args.start < 1 or args.steps < 1:
        ap.error("--start and --steps must be at least 1")

    from kvloom import LLM, SamplingParams
    from kvloom.bench.workload import make_workload
    from kvloom.engine.llm_engine import _load_tokenizer
    from kvloom.engine.model_loader.resolve import resolve_model
    from kvloom.kernels import cpu_ops

    ops = cpu_ops.load_cpu_ops()
    if ops is None:
        raise SystemExit("kvloom bench ops: the C++ CPU kernels are unavailable (nothing to time)")
    model_dir = resolve_model(args.model)
    items = make_workload(_load_tokenizer(model_dir), args.num_prompts, 0, prompt_len=tuple(args.prompt_len))
    timed = _TimedOps(ops)
    # The engine's kernel backend and the linear layers look the module up here: give them the timed one.
    cpu_ops._loaded["ops"] = timed
    try:
        llm = LLM(model_dir, dtype="float32", **json.loads(args.engine_kwargs))
        # One tiny request first, so that the window holds no first-call costs (pool start-up, page faults).
        llm.generate([items[0].prompt_token_ids[:8]], SamplingParams(max_tokens=1), use_tqdm=False)
        engine = llm.llm_engine
        execute, engine_step = engine.executor.execute_model, engine.step
        step, forward, batch = [0], [], []

        def timed_execute(out):
            step[0] += 1
            inside = args.start <= step[0] < args.start + args.steps
            timed.on = inside
            t = time.perf_counter()
            try:
                return execute(out)
            finally:
                timed.on = False
                if inside:
                    forward.append(time.perf_counter() - t)
                    batch.append((len(out.seqs), out.num_batched_tokens))

        def stepping():
            outputs = engine_step()
            if step[0] >= args.start + args.steps - 1:
                raise _WindowDone  # from outside the engine core, which isolates a failing forward
            return outputs

        engine.executor.execute_model, engine.step = timed_execute, stepping
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        try:
            llm.generate([it.prompt_token_ids for it in items], params, use_tqdm=False)
        except _WindowDone:
            pass
        llm.shutdown()
    finally:
        cpu_ops._loaded["ops"] = ops
    n = len(forward)
    if n == 0:
        raise SystemExit(f"kvloom bench ops: the workload ended after {step[0]} steps, before step {args.start}")
    if not timed.seconds:
        raise SystemExit(
            "kvloom bench ops: no kernel call ran in this process (the model ran in a worker process?); "
            'time it with the in-process executor: --engine-kwargs \'{"distributed_executor_backend": "uni"}\''
        )
    in_kernels = 0.0
    for key in sorted(timed.seconds, key=timed.seconds.get, reverse=True):
        in_kernels += timed.seconds[key]
        ms = timed.seconds[key] / n * 1e3
        print(json.dumps({"op": key, "ms_per_step": round(ms, 2), "calls_per_step": round(timed.calls[key] / n, 1)}))
    print(
        json.dumps(
            {
                "steps": n,
                "first_step": args.start,
                "mean_seqs": round(sum(b[0] for b in batch) / n, 1),
                "mean_tokens": round(sum(b[1] for b in batch) / n, 1),
                "forward_ms_per_step": round(sum(forward) / n * 1e3, 2),
                "kernels_ms_per_step": round(in_kernels / n * 1e3, 2),
                "outside_kernels_ms_per_step": round((sum(forward) - in_kernels) / n * 1e3, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
