"""What a benchmark run used: commit, CPU, the server's CPU affinity, its engine config, peer versions.

Recorded next to every result so figures from different machines, hours or configurations are never
compared unknowingly.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess

import httpx


def git_commit(path: str | None = None) -> str:
    """`git rev-parse --short HEAD` of the checkout holding path (the kvloom source), `+dirty` if modified."""
    if path is None:
        import kvloom

        path = os.path.dirname(os.path.abspath(kvloom.__file__))

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_settings() -> dict:
    return {
        "commit": git_commit(),
        "cpu_model": cpu_model(),
        "num_cores": os.cpu_count(),
        "bench_cpu_affinity": sorted(os.sched_getaffinity(0)),
    }


def process_affinity(pid: int) -> dict:
    """The CPU affinity of a server process and of every process and thread under it.

    Thread affinities matter because OpenMP binding (vLLM's VLLM_CPU_OMP_THREADS_BIND) pins threads,
    not the process.
    """
    import psutil

    root = psutil.Process(pid)
    procs = []
    for p in [root, *root.children(recursive=True)]:
        try:
            threads = set()
            for t in p.threads():
                try:
                    threads.add(tuple(sorted(os.sched_getaffinity(t.id))))
                except OSError:  # the thread ended meanwhile
                    pass
            procs.append(
                {
                    "pid": p.pid,
                    "name": p.name(),
                    "cpu_affinity": p.cpu_affinity(),
                    "num_threads": p.num_threads(),
                    "thread_affinities": sorted(list(t) for t in threads),
                }
            )
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {"cpu_affinity": procs[0]["cpu_affinity"] if procs else None, "processes": procs}


def parse_info_metric(text: str, name: str) -> dict[str, str] | None:
    """The labels of an info gauge (e.g. `kvloom:engine_config_info`) in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return dict(sample.labels)
    return None


def scrape_info_metric(root_url: str, name: str, headers: dict) -> dict[str, str] | None:
    """GET root_url/metrics and return the labels of the info gauge `name` (None if absent or unreachable)."""
    try:
        r = httpx.get(f"{root_url}/metrics", headers=headers, timeout=10)
        r.raise_for_status()
    except httpx.HTTPError:
        return None
    return parse_info_metric(r.text, name)


def package_versions(*names: str) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def peer_versions(python: str) -> dict[str, str]:
    """vllm and torch versions in the peer's venv (imports vllm there: a few seconds)."""
    code = "import json, torch, vllm; print(json.dumps({'vllm': vllm.__version__, 'torch': torch.__version__}))"
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, IndexError, json.JSONDecodeError):
        return {"vllm": "unknown", "torch": "unknown"}
