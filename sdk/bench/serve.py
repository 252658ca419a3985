"""Online serving: stream a seeded workload to an OpenAI-compatible server and measure latencies.

Each request streams /v1/completions (prompt token ids, greedy, ignore_eos) at a fixed
concurrency, optionally paced by a Poisson request rate. Reported: TTFT, TPOT (per request, mean
time between its output tokens) and inter-token latency (every gap between streamed chunks), each
as p50/p90/p99, plus output tokens/s. `--launch` starts `kvloom serve` in a subprocess first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time

import httpx

from kvloom.bench.workload import WorkItem, make_workload


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


async def _one(client: httpx.AsyncClient, url: str, model: str, item: WorkItem, headers: dict) -> dict:
    body = {
        "model": model,
        "prompt": item.prompt_token_ids,
        "max_tokens": item.max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    start = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", url, json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    n = item.max_tokens
    ttft = stamps[0] - start if stamps else float("nan")
    tpot = (stamps[-1] - stamps[0]) / (n - 1) if len(stamps) > 1 and n > 1 else float("nan")
    return {"ttft": ttft, "tpot": tpot, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": n}


async def run_load(
    base_url: str, model: str, items: list[WorkItem], concurrency: int, rate: float, seed: int, api_key: str | None
) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)
    results: list[dict] = []

    async with httpx.AsyncClient(timeout=None) as client:

        async def guarded(item):
            async with sem:
                results.append(await _one(client, f"{base_url}/completions", model, item, headers))

        start = time.perf_counter()
        tasks = []
        for item in items:
            tasks.append(asyncio.ensure_future(guarded(item)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tpot"] == r["tpot"]]
    itl = [x for r in results for x in r["itl"]]
    out_tokens = sum(r["tokens"] for r in results)
    summary = {
        "concurrency": concurrency,
        "request_rate": "inf" if rate == float("inf") else rate,
        "requests": len(results),
        "seconds": round(elapsed, 2),
        "output_tok_per_s": round(out_tokens / elapsed, 2),
        "ttft_mean_s": round(statistics.fmean(ttft), 3),
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        for p in (50, 90, 99):
            summary[f"{name}_p{p}_ms"] = round(_pct(values, p) * 1000, 1)
    return summary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(model: str | None, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "kvloom.cli", "serve", *([model] if model else []), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, env={**os.environ, "KVLOOM_LOGGING_LEVEL": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`kvloom serve` exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, f"{url}/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("`kvloom serve` did not become healthy in 600 s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kvloom bench serve", description=__doc__)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--launch", action="store_true", help="start `kvloom serve` (default model) in a subprocess")
    ap.add_argument("--model", default=None, help="model to launch (with --launch)")
    ap.add_argument("--num-prompts", "-n", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16])
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-key", default=os.environ.get("KVLOOM_API_KEY"))
    args = ap.parse_args(argv)

    proc = None
    base_url = args.base_url
    if args.launch:
        proc, base_url = _launch(args.model, [])
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = httpx.get(f"{base_url}/models", headers=headers).json()["data"][0]["id"]
        from transformers import AutoTokenizer

        from kvloom.engine.model_loader.resolve import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
        items = make_workload(tokenizer, args.num_prompts, args.seed)
        for c in args.concurrency:
            result = asyncio.run(run_load(base_url, model, items, c, args.request_rate, args.seed, args.api_key))
            print(json.dumps({"model": model, **result}), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
