"""A soak test of `kvloom serve`: many streamed requests, some clients leaving mid-stream.

`kvloom bench soak --launch --num-requests 10000 --concurrency 64 --disconnect-fraction 0.25` starts
a server (or uses `--base-url`), sends the requests (short seeded prompts, `--max-tokens` each,
`ignore_eos`) with at most `--concurrency` in flight, and closes a `--disconnect-fraction` of them
after a few chunks. It reports completed and disconnected requests, 5xx and other errors, hangs
(requests over `--request-timeout`), whether the engine is idle with no KV block in use afterwards
(from /metrics), and the server's resident memory after the warm-up (the first tenth of the
requests), its peak during the run and at the end. The KV cache is an anonymous mapping whose pages
become resident as blocks are first used: give `--serve-args '--kv-cache-memory-gb 1'` so that the
warm-up touches all of it and a leak would show as growth.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import shlex
import threading
import time

import httpx

from kvloom.bench.serve import _launch


async def _one(client, url, model, i, rng, args, headers, counts, errors: set) -> None:
    leave_after = rng.randint(1, 5) if rng.random() < args.disconnect_fraction else None
    body = {
        "model": model,
        "prompt": f"Request {i}: {' '.join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))}",
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
        "stream": True,
    }

    async def request() -> None:
        async with client.stream("POST", f"{url}/completions", json=body, headers=headers) as r:
            if r.status_code >= 500:
                counts["5xx"] += 1
                errors.add((await r.aread())[:300].decode(errors="replace"))
                return
            if r.status_code != 200:
                counts["4xx"] += 1
                return
            chunks = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    if line.startswith('data: {"error"'):
                        counts["stream_errors"] += 1
                        errors.add(line[6:300])
                        return
                    chunks += 1
                    if leave_after is not None and chunks >= leave_after:
                        counts["disconnected"] += 1
                        return  # closing the response drops the connection mid-stream
                elif line == "data: [DONE]":
                    counts["completed"] += 1
                    return
            counts["truncated"] += 1

    try:
        await asyncio.wait_for(request(), args.request_timeout)
    except asyncio.TimeoutError:
        counts["hangs"] += 1
    except httpx.HTTPError:
        counts["transport_errors"] += 1


WORDS = "paged attention keys values blocks batch decode prefill cache token model engine server stream".split()


async def run(url: str, args, headers: dict) -> dict:
    counts = dict.fromkeys(
        ("completed", "disconnected", "5xx", "4xx", "stream_errors", "hangs", "truncated", "transport_errors"), 0
    )
    errors: set = set()
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        model = (await client.get(f"{url}/models", headers=headers)).json()["data"][0]["id"]
        gate = asyncio.Semaphore(args.concurrency)

        async def guarded(i):
            async with gate:
                await _one(client, url, model, i, rng, args, headers, counts, errors)

        await asyncio.gather(*(guarded(i) for i in range(args.num_requests)))
    counts["error_samples"] = sorted(errors)[:5]
    return counts


def _metrics(root: str, headers: dict) -> dict[str, float]:
    text = httpx.get(f"{root}/metrics", headers=headers, timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("kvloom:") and "{" in line:
            name, value = line.split("{", 1)[0], line.rsplit(" ", 1)[1]
            out[name.removeprefix("kvloom:")] = float(value)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kvloom bench soak", description=__doc__)
    ap.add_argument("--base-url", default=None, help="a running server's /v1 URL")
    ap.add_argument("--launch", action="store_true", help="start `kvloom serve` (default model) in a subprocess")
    ap.add_argument("--model", default=None, help="model to launch (with --launch)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--num-requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--disconnect-fraction", type=float, default=0.25)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--request-timeout", type=float, default=300.0, help="seconds after which a request is a hang")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--serve-args", default="", help="extra `kvloom serve` flags with --launch, e.g. '--kv-cache-memory-gb 1'"
    )
    args = ap.parse_args(argv)
    if not (args.launch or args.base_url):
        ap.error("give --base-url or --launch")

    proc = None
    if args.launch:
        extra = ["--max-num-seqs", str(max(args.concurrency, 1)), *shlex.split(args.serve_args)]
        proc, url = _launch(args.model, extra)
    else:
        url = args.base_url.rstrip("/")
    root = url.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        rss = None
        if proc is not None:
            import psutil

            rss = psutil.Process(proc.pid)
        warm = max(args.num_requests // 10, 1)
        t0 = time.perf_counter()
        warm_counts = asyncio.run(run(url, argparse.Namespace(**{**vars(args), "num_requests": warm}), headers))
        rss_warm = rss.memory_info().rss if rss else None
        samples: list[int] = []
        done = threading.Event()

        def sample() -> None:  # the server's RSS every 5 s while the main run goes
            while not done.wait(5.0):
                samples.append(rss.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        if rss:
            sampler.start()
        counts = asyncio.run(run(url, args, headers))
        done.set()
        seconds = time.perf_counter() - t0
        time.sleep(1.0)  # aborts of the last disconnects reach the engine
        after = _metrics(root, headers)
        rss_end = rss.memory_info().rss if rss else None
        total = {k: counts[k] + warm_counts[k] for k in counts}
        total["error_samples"] = sorted(set(counts["error_samples"]) | set(warm_counts["error_samples"]))[:5]
        print(
            json.dumps(
                {
                    "requests": args.num_requests + warm,
                    "warm_up_requests": warm,
                    "concurrency": args.concurrency,
                    "disconnect_fraction": args.disconnect_fraction,
                    "max_tokens": args.max_tokens,
                    **total,
                    "seconds": round(seconds, 1),
                    "engine_idle_after": after.get("num_requests_running") == 0
                    and after.get("num_requests_waiting") == 0,
                    "kv_cache_usage_after": after.get("kv_cache_usage_perc"),
                    "rss_after_warm_up_mb": None if rss_warm is None else round(rss_warm / 2**20, 1),
                    "rss_max_after_warm_up_mb": round(max(samples) / 2**20, 1) if samples else None,
                    "rss_end_mb": None if rss_end is None else round(rss_end / 2**20, 1),
                    "machine": f"{platform.processor() or platform.machine()}",
                }
            ),
            flush=True,
        )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
