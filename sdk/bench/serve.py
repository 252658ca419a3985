"""Online serving: stream a seeded workload to an OpenAI-compatible server and measure latencies.

Each request streams /v1/completions (prompt token ids, greedy, ignore_eos) at a fixed
concurrency, optionally paced by a Poisson request rate. Reported: TTFT, TPOT (per request, mean
time between its output tokens) and inter-token latency (every gap between streamed chunks), each
as p50/p90/p99, plus output tokens/s. `--launch` starts `kvloom serve` in a subprocess first.

`--compare vllm-cpu` runs the same seeded workload against vLLM's CPU build's OpenAI server, then
against `kvloom serve` (never both at once: each server and every process it started is gone before
the next starts), both warmed up the same way, and ends with a table of kvloom/vllm-cpu ratios. Each
system's results follow a `{"settings": ...}` line: commit, CPU, the server's CPU affinity, dtype,
KV cache size, environment, versions and the engine's own configuration (scraped from /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

from kvloom.bench import settings as run_settings
from kvloom.bench.workload import WorkItem, make_copy_workload, make_workload

PEER_PYTHON = "~/.cache/kvloom-peers/vllm-cpu/bin/python"
SYSTEMS = ("kvloom", "vllm-cpu")
# (metric, which way is better) in the comparison table; every ratio is kvloom/vllm-cpu.
COMPARED_METRICS = (
    ("output_tok_per_s", "higher"),
    ("ttft_mean_s", "lower"),
    *((f"{name}_p{p}_ms", "lower") for name in ("ttft", "tpot", "itl") for p in (50, 90, 99)),
)


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


@dataclass
class ServerCommand:
    """How one system's OpenAI server is started: its command line and the variables set for it."""

    system: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=_free_port)

    def shell(self) -> str:
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()), shlex.join(self.cmd)])


def kvloom_command(model: str | None, extra: list[str]) -> ServerCommand:
    cmd = [sys.executable, "-m", "kvloom.cli", "serve", *([model] if model else [])]
    command = ServerCommand("kvloom", cmd, {"KVLOOM_LOGGING_LEVEL": "WARNING"})
    command.cmd += ["--port", str(command.port), *extra]
    return command


def peer_command(
    python: str, model_dir: str, dtype: str, kv_cache_gb: float, omp_bind: str, extra: list[str]
) -> ServerCommand:
    """vLLM's CPU build's OpenAI server (its `vllm serve` fails to find its own package metadata)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gb:g}", "VLLM_CPU_OMP_THREADS_BIND": omp_bind}
    command = ServerCommand("vllm-cpu", [python, "-m", "vllm.entrypoints.openai.api_server"], env)
    command.cmd += ["--model", model_dir, "--host", "127.0.0.1", "--port", str(command.port), "--dtype", dtype]
    command.cmd += extra
    return command


def _peer_model_dir(model_dir: str) -> str:
    """A GGUF-converted copy keeps quantization_config {'quant_method': 'gguf'}, which vLLM rejects for
    a safetensors directory: give vLLM a view of the directory without it."""
    import tempfile

    cfg_path = os.path.join(model_dir, "config.json")
    cfg = json.load(open(cfg_path)) if os.path.isfile(cfg_path) else {}
    if (cfg.get("quantization_config") or {}).get("quant_method") != "gguf":
        return model_dir
    del cfg["quantization_config"]
    view = tempfile.mkdtemp(prefix="kvloom-peer-model-")
    for name in os.listdir(model_dir):
        if name != "config.json":
            os.symlink(os.path.join(os.path.abspath(model_dir), name), os.path.join(view, name))
    with open(os.path.join(view, "config.json"), "w") as f:
        json.dump(cfg, f)
    return view


def _start(command: ServerCommand, stdout=None, timeout: float = 600) -> tuple[subprocess.Popen, str]:
    """Start a server in its own session (so all it starts can be found and stopped) and wait for /health."""
    proc = subprocess.Popen(command.cmd, env={**os.environ, **command.env}, stdout=stdout, start_new_session=True)
    url = f"http://127.0.0.1:{command.port}"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{command.system} server exited with {proc.returncode}: {command.shell()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return proc, f"{url}/v1"
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{command.system} server did not become healthy in {timeout:g} s")
    except BaseException:
        _stop(proc)
        raise


def _launch(model: str | None, extra: list[str]) -> tuple[subprocess.Popen, str]:
    return _start(kvloom_command(model, extra))


def _alive(procs: list) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _session_processes(proc: subprocess.Popen) -> list:
    """The launched server, its descendants and whatever else runs in its session (orphans included)."""
    import psutil

    procs = {}
    try:
        root = psutil.Process(proc.pid)
        procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter():
        try:
            if p.pid not in procs and os.getsid(p.pid) == proc.pid:
                procs[p.pid] = p
        except (OSError, psutil.Error):
            pass
    return list(procs.values())


def _vllm_processes() -> list:
    """Live processes whose command line mentions vllm (vLLM's engine core renames itself VLLM::EngineCore)."""
    import psutil

    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.parents())}
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.pid in skip or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if "vllm" in " ".join(p.info["cmdline"] or []).lower():
            found.append(p)
    return found


def _wait_for_no_vllm(timeout: float = 60.0) -> None:
    """A leftover vLLM engine core keeps using the cores: wait for it before timing anything."""
    deadline = time.monotonic() + timeout
    while (left := _vllm_processes()) and time.monotonic() < deadline:
        time.sleep(1.0)
    for p in _alive(left):
        try:
            cmdline = " ".join(p.cmdline())[:120]
        except Exception:
            cmdline = "?"
        print(f"kvloom bench serve: warning: a vllm process is still running: {p.pid} {cmdline}", file=sys.stderr)


def _stop(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGINT, then SIGTERM; after `timeout` s SIGKILL whatever of the server's session is left; wait until
    none of it is alive and no vllm process is left."""
    import psutil

    ours = {p.pid: p for p in _session_processes(proc)}
    start = time.monotonic()
    for sig, wait in ((signal.SIGINT, timeout / 3), (signal.SIGTERM, timeout / 3)):
        if proc.poll() is not None:
            break
        proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass
    ours.update((p.pid, p) for p in _session_processes(proc))
    while (left := _alive(list(ours.values()))) and time.monotonic() - start < timeout:
        time.sleep(0.5)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        print(f"kvloom bench serve: warning: server {proc.pid} did not exit", file=sys.stderr)
    _wait_for_no_vllm()


def _warm_up(base_url: str, model: str, tokenizer, num_requests: int, seed: int, api_key: str | None) -> None:
    """Short requests sent at once and awaited, so start-up effects are not timed (prompts unlike the workload's)."""
    if num_requests > 0:
        items = make_workload(tokenizer, num_requests, seed + 1_000_003, prompt_len=(16, 32), output_len=(8, 8))
        asyncio.run(run_load(base_url, model, items, num_requests, float("inf"), seed, api_key))


def compare(results: list[dict], baseline: str = "vllm-cpu", candidate: str = "kvloom") -> list[dict]:
    """One row per (concurrency, metric) both systems have: both values and the ratio candidate/baseline."""
    by_key = {(r["system"], r["concurrency"]): r for r in results}
    rows = []
    for c in dict.fromkeys(r["concurrency"] for r in results):
        base, cand = by_key.get((baseline, c)), by_key.get((candidate, c))
        if base is None or cand is None:
            continue
        for metric, better in COMPARED_METRICS:
            b, k = base.get(metric), cand.get(metric)
            ok = isinstance(b, (int, float)) and isinstance(k, (int, float)) and math.isfinite(b) and math.isfinite(k)
            ratio = round(k / b, 3) if ok and b != 0 else None
            row = {"concurrency": c, "metric": metric, candidate: k, baseline: b}
            rows.append({**row, f"{candidate}/{baseline}": ratio, "better": better})
    return rows


def format_comparison(rows: list[dict], baseline: str = "vllm-cpu", candidate: str = "kvloom") -> str:
    """The rows as a table; each line says which way is better and which system won."""
    ratio_key = f"{candidate}/{baseline}"
    lines = [
        f"{candidate} vs {baseline}: ratio {ratio_key} (tok/s: higher is better; latencies: lower is better)",
        f"{'concurrency':>11}  {'metric':<18} {candidate:>12} {baseline:>12} {ratio_key:>18}  better",
    ]
    for r in rows:
        ratio = r[ratio_key]
        if ratio is None:
            shown, winner = "n/a", "?"
        else:
            shown = f"{ratio:.2f}x"
            wins = ratio > 1 if r["better"] == "higher" else ratio < 1
            winner = "=" if ratio == 1 else candidate if wins else baseline
        lines.append(
            f"{r['concurrency']:>11}  {r['metric']:<18} {r[candidate]!s:>12} {r[baseline]!s:>12} {shown:>18}"
            f"  {r['better']} is better: {winner}"
        )
    return "\n".join(lines)


class _Emitter:
    """Prints JSON lines and appends them to --output."""

    def __init__(self, path: str | None) -> None:
        self.file = open(path, "a") if path else None

    def __call__(self, obj: dict) -> None:
        line = json.dumps(obj)
        print(line, flush=True)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _command_for(system: str, args: argparse.Namespace, peer_model_dir: str) -> ServerCommand:
    if system == "vllm-cpu":
        peer = (args.peer_python, peer_model_dir, args.dtype, args.kv_cache_memory_gb, args.peer_omp_bind)
        return peer_command(*peer, shlex.split(args.peer_args))
    extra = (["--dtype", args.dtype] if args.dtype else []) + (
        ["--kv-cache-memory-gb", f"{args.kv_cache_memory_gb:g}"] if args.kv_cache_memory_gb is not None else []
    )
    return kvloom_command(args.model, extra + shlex.split(args.serve_args))


def _bench(
    system: str,
    base_url: str,
    args: argparse.Namespace,
    tokenizer,
    items: list[WorkItem],
    settings: dict,
    emit,
    pid: int | None = None,
) -> list[dict]:
    """Warm up, record the settings (with the CPU affinity of the server process pid), then run the
    workload at each concurrency against one server."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = httpx.get(f"{base_url}/models", headers=headers).json()["data"][0]["id"]
    _warm_up(base_url, model, tokenizer, args.warmup_requests, args.seed, args.api_key)
    info_metric = "vllm:cache_config_info" if system == "vllm-cpu" else "kvloom:engine_config_info"
    engine_config = run_settings.scrape_info_metric(base_url.removesuffix("/v1"), info_metric, headers)
    affinity = run_settings.process_affinity(pid) if pid is not None else {}
    emit({"settings": {**settings, "served_model": model, **affinity, "engine_config": engine_config}})
    results = []
    for c in args.concurrency:
        result = {"system": system, "model": model}
        result.update(asyncio.run(run_load(base_url, model, items, c, args.request_rate, args.seed, args.api_key)))
        emit(result)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kvloom bench serve", description=__doc__)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--launch", action="store_true", help="start `kvloom serve` (default model) in a subprocess")
    ap.add_argument("--model", default=None, help="model to launch (with --launch)")
    ap.add_argument("--num-prompts", "-n", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16])
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--workload",
        choices=["random", "copy"],
        default="random",
        help="random: prompts 32-512, outputs 32-256 tokens of English-like text; copy: chat requests to repeat "
        "a 96-256 token passage (what n-gram speculation speeds up)",
    )
    ap.add_argument("--api-key", default=os.environ.get("KVLOOM_API_KEY"))
    ap.add_argument("--compare", choices=["vllm-cpu"], help="launch vLLM's CPU build, then kvloom, and compare")
    ap.add_argument(
        "--systems", default=None, help="systems to launch, in order (default with --compare: vllm-cpu,kvloom)"
    )
    ap.add_argument("--peer-python", default=PEER_PYTHON, help="python of the vllm-cpu venv (setup-vllm-cpu.sh)")
    ap.add_argument("--peer-omp-bind", default=f"0-{os.cpu_count() - 1}", help="VLLM_CPU_OMP_THREADS_BIND (all cores)")
    ap.add_argument("--peer-args", default="", help="extra vLLM api_server flags (use --peer-args='--flag ...')")
    ap.add_argument("--serve-args", default="", help="extra `kvloom serve` flags (use --serve-args='--flag ...')")
    ap.add_argument("--dtype", default=None, help="both servers' dtype (default with vllm-cpu: float32)")
    ap.add_argument("--kv-cache-memory-gb", type=float, default=None, help="KV cache GB (default with vllm-cpu: 4)")
    ap.add_argument("--warmup-requests", type=int, default=2, help="short requests sent at once before timing")
    ap.add_argument("--output", default=None, help="append every JSON line to this file")
    ap.add_argument("--dry-run", action="store_true", help="print the server commands and exit")
    args = ap.parse_args(argv)

    if args.systems is not None:
        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        if not systems or any(s not in SYSTEMS for s in systems) or len(set(systems)) != len(systems):
            ap.error(f"--systems takes distinct names from {', '.join(SYSTEMS)}, comma-separated")
    elif args.compare:
        systems = [args.compare, "kvloom"]
    else:
        systems = ["kvloom"] if args.launch else []
    if "vllm-cpu" in systems:
        args.dtype = args.dtype or "float32"
        args.kv_cache_memory_gb = 4.0 if args.kv_cache_memory_gb is None else args.kv_cache_memory_gb
        args.peer_python = os.path.expanduser(args.peer_python)

    from kvloom.engine.model_loader.resolve import resolve_model

    model_dir = resolve_model(args.model)
    peer_model_dir = _peer_model_dir(model_dir) if "vllm-cpu" in systems else model_dir
    if args.dry_run:
        for s in systems:
            print(f"# {s}\n{_command_for(s, args, peer_model_dir).shell()}")
        return
    if "vllm-cpu" in systems and not os.access(args.peer_python, os.X_OK):
        ap.error(f"no peer python at {args.peer_python}: run shared/peers/setup-vllm-cpu.sh or give --peer-python")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    make = make_copy_workload if args.workload == "copy" else make_workload
    items = make(tokenizer, args.num_prompts, args.seed)
    common = {
        **run_settings.machine_settings(),
        "model_dir": model_dir,
        "workload": args.workload,
        "num_prompts": args.num_prompts,
        "seed": args.seed,
        "request_rate": "inf" if args.request_rate == float("inf") else args.request_rate,
        "concurrency": args.concurrency,
        "warmup_requests": args.warmup_requests,
        "dtype": args.dtype,
        "kv_cache_memory_gb": args.kv_cache_memory_gb,
    }
    emit = _Emitter(args.output)
    results: list[dict] = []
    try:
        if not systems:
            settings = {**common, "system": "external", "base_url": args.base_url}
            results += _bench("external", args.base_url, args, tokenizer, items, settings, emit)
        for s in systems:
            command = _command_for(s, args, peer_model_dir)
            settings = {**common, "system": s, "command": command.shell(), "env": command.env}
            if s == "vllm-cpu":
                settings["versions"] = run_settings.peer_versions(args.peer_python)
                settings["peer_args"] = args.peer_args
            else:
                settings["versions"] = run_settings.package_versions("torch", "transformers")
                settings["serve_args"] = args.serve_args
            _wait_for_no_vllm()
            settings["loadavg_before_launch"] = [round(x, 2) for x in os.getloadavg()]  # others' load skews timing
            proc, base_url = _start(command, stdout=sys.stderr)
            try:
                results += _bench(s, base_url, args, tokenizer, items, settings, emit, proc.pid)
            finally:
                _stop(proc)
        if len(systems) > 1 and set(systems) == set(SYSTEMS):
            rows = compare(results)
            emit({"comparison": rows})
            print(format_comparison(rows), flush=True)
    finally:
        emit.close()


if __name__ == "__main__":
    main()
