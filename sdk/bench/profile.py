"""Where a served token's time goes: one streamed request, timed inside the server and at the client.

Starts the OpenAI server in this process on the default model (or --model), streams one request
(a --prompt-len token prompt, --max-tokens output tokens, greedy, ignore_eos) from a client in a
separate process, and reports per output token: the forward pass (executor.execute_model), the rest
of the engine step (schedule, update, detokenize, RequestOutput), the gap between steps on the
engine thread (delivery, waiting), and the client's TPOT; then the same request offline through
`LLM.generate` in this process for reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

_CLIENT = r"""
import httpx, json, sys, time
url, body = sys.argv[1], json.loads(sys.argv[2])
stamps, t = [], time.perf_counter()
with httpx.stream("POST", url, json=body, timeout=None) as r:
    for line in r.iter_lines():
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0].get("text"):
            stamps.append(time.perf_counter())
print(json.dumps({"ttft": stamps[0] - t, "tpot": (stamps[-1] - stamps[0]) / (len(stamps) - 1), "n": len(stamps)}))
"""


def _instrument(engine) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"forward": [], "step": [], "gap": []}
    executor, last_end = engine.executor, [None]
    execute, step = executor.execute_model, engine.step

    def timed_execute(out):
        t = time.perf_counter()
        try:
            return execute(out)
        finally:
            times["forward"].append(time.perf_counter() - t)

    def timed_step():
        t = time.perf_counter()
        if last_end[0] is not None:
            times["gap"].append(t - last_end[0])
        try:
            return step()
        finally:
            last_end[0] = time.perf_counter()
            times["step"].append(last_end[0] - t)

    executor.execute_model, engine.step = timed_execute, timed_step
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kvloom bench profile", description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt-len", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--distributed-executor-backend",
        choices=["uni", "mp"],
        default="mp",
        help="mp: the model in a worker process (kvloom serve's default); uni: in the server process",
    )
    args = ap.parse_args(argv)

    import kvloom
    from kvloom.async_llm import AsyncLLM
    from kvloom.bench.workload import make_workload

    client = AsyncLLM(model=args.model, distributed_executor_backend=args.distributed_executor_backend)
    engine = client.engine
    tokenizer = engine.tokenizer
    item = make_workload(tokenizer, 1, seed=0, prompt_len=(args.prompt_len, args.prompt_len))[0]
    body = {"prompt": item.prompt_token_ids, "max_tokens": args.max_tokens, "temperature": 0, "stream": True}
    body["ignore_eos"] = True
    report = {"engine_config": client.get_config_info()}
    with kvloom.serve(client) as server:
        body["model"] = client.model_name
        url = f"{server.base_url}/completions"
        runs = []
        for i in range(args.repeats + 1):  # the first run warms up
            times = _instrument(engine)
            out = subprocess.run([sys.executable, "-c", _CLIENT, url, json.dumps(body)], capture_output=True, text=True)
            del engine.executor.execute_model, engine.step
            if out.returncode:
                raise RuntimeError(out.stderr)
            if i == 0:
                continue
            client_side = json.loads(out.stdout)
            # Decode steps only: drop the prefill step(s) and the gap before the first.
            n = args.max_tokens - 1
            fwd, step, gap = times["forward"][-n:], times["step"][-n:], times["gap"][-n:]
            runs.append(
                {
                    "forward_ms": 1000 * statistics.fmean(fwd),
                    "step_other_ms": 1000 * (statistics.fmean(step) - statistics.fmean(fwd)),
                    "between_steps_ms": 1000 * statistics.fmean(gap),
                    "client_tpot_ms": 1000 * client_side["tpot"],
                    "client_ttft_ms": 1000 * client_side["ttft"],
                }
            )
    client.shutdown()
    report["served"] = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}

    from kvloom import LLM, SamplingParams

    llm = LLM(model=args.model)
    times = _instrument(llm.llm_engine)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    offline = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": item.prompt_token_ids}], params, use_tqdm=False)
        offline.append(time.perf_counter() - t)
    n = args.max_tokens - 1
    report["offline"] = {
        "forward_ms": round(1000 * statistics.fmean(times["forward"][-n:]), 2),
        "step_other_ms": round(
            1000 * (statistics.fmean(times["step"][-n:]) - statistics.fmean(times["forward"][-n:])), 2
        ),
        "between_steps_ms": round(1000 * statistics.fmean(times["gap"][-n:]), 2),
        "wall_per_token_ms": round(1000 * statistics.median(offline) / args.max_tokens, 2),
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
