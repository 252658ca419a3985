"""Prometheus metrics of one server (its own registry): vLLM's `vllm:` names and kvloom's `kvloom:` mirror.

The `vllm:` families carry vLLM's names, meanings and labels (model_name, engine; finished_reason on
request_success) so dashboards and guides that grep for them work; the `kvloom:` families are the same
figures under kvloom's prefix (label model_name), kept for existing scrapers.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_GAUGES = {
    "num_requests_running": "Requests in the running batch.",
    "num_requests_waiting": "Requests waiting to be scheduled.",
    "kv_cache_usage_perc": "Fraction of KV cache blocks in use (1 = full).",
}
# vLLM's names for the same gauges: gpu_cache_usage_perc is vLLM 0.x's name of kv_cache_usage_perc.
_VLLM_GAUGES = {name: (name, doc) for name, doc in _GAUGES.items()}
_VLLM_GAUGES["gpu_cache_usage_perc"] = ("kv_cache_usage_perc", "KV cache usage (vLLM 0.x's name; 1 = full).")
# metric key -> (exported name, help); counters are exposed with Prometheus' `_total` suffix.
_COUNTERS = {
    "prompt_tokens": ("prompt_tokens", "Prompt tokens computed."),
    "generation_tokens": ("generation_tokens", "Tokens generated."),
    "prefix_cache_queries": ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits": ("prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    "num_preemptions": ("num_preemptions", "Requests preempted for lack of KV blocks."),
    "spec_num_draft_tokens": ("spec_decode_num_draft_tokens", "Speculative tokens proposed and scored."),
    "spec_num_accepted_tokens": ("spec_decode_num_accepted_tokens", "Speculative tokens accepted."),
}
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# vLLM's buckets for its histograms of the same names.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)
_ENGINE = "0"  # vLLM's `engine` label: the index of the engine core behind the server (one here)


class _EngineCollector:
    """Reads gauges and counters from the engine at scrape time."""

    def __init__(self, client, model_name: str) -> None:
        self.client, self.model_name = client, model_name

    def collect(self):
        m = self.client.get_metrics()
        labels = ["model_name", "engine"]
        values = [self.model_name, _ENGINE]
        for name, doc in _GAUGES.items():
            yield _family(GaugeMetricFamily, f"kvloom:{name}", doc, ["model_name"], [self.model_name], m[name])
        for name, (key, doc) in _VLLM_GAUGES.items():
            yield _family(GaugeMetricFamily, f"vllm:{name}", doc, labels, values, m[key])
        for key, (name, doc) in _COUNTERS.items():
            yield _family(CounterMetricFamily, f"kvloom:{name}", doc, ["model_name"], [self.model_name], m[key])
            yield _family(CounterMetricFamily, f"vllm:{name}", doc, labels, values, m[key])
        get_config_info = getattr(self.client, "get_config_info", None)
        if get_config_info is not None:
            config = get_config_info()
            # An info gauge as vLLM's `vllm:cache_config_info`: value 1, the configuration in its labels.
            info = {"model_name": self.model_name, **{str(k): str(v) for k, v in config.items()}}
            g = GaugeMetricFamily("kvloom:engine_config_info", "The engine's configuration.", labels=list(info))
            g.add_metric(list(info.values()), 1.0)
            yield g
            yield self._cache_config_info(config)
        lora = self._lora_requests_info(m)
        if lora is not None:
            yield lora

    def _cache_config_info(self, config: dict) -> GaugeMetricFamily:
        engine = getattr(self.client, "engine", None)
        args = getattr(engine, "args", None)
        info = {
            "block_size": config.get("block_size", ""),
            "cache_dtype": "auto",  # the KV cache is kept in the model's dtype
            "enable_prefix_caching": config.get("enable_prefix_caching", ""),
            "gpu_memory_utilization": str(getattr(args, "gpu_memory_utilization", "")),
            "num_gpu_blocks": config.get("num_kv_blocks", ""),
            "num_cpu_blocks": "None",  # no swap space: preemption recomputes
        }
        g = GaugeMetricFamily("vllm:cache_config_info", "Information of the KV cache configuration.", labels=list(info))
        g.add_metric(list(info.values()), 1.0)
        return g

    def _lora_requests_info(self, m: dict) -> GaugeMetricFamily | None:
        """vLLM's `vllm:lora_requests_info`: adapters running and waiting, by name; the value is the time."""
        args = getattr(getattr(self.client, "engine", None), "args", None)
        if args is None or not args.enable_lora or "running_lora_ids" not in m:
            return None
        names = {lora.lora_int_id: lora.lora_name for lora in self.client.list_lora_requests()}

        def named(ids) -> str:
            return ",".join(names.get(i, str(i)) for i in ids)

        g = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on LoRA requests.",
            labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
        )
        g.add_metric([str(args.max_loras), named(m["waiting_lora_ids"]), named(m["running_lora_ids"])], time.time())
        return g


def _family(kind, name: str, doc: str, labels: list[str], values: list[str], value) -> object:
    family = kind(name, doc, labels=labels)
    family.add_metric(values, float(value))
    return family


class ServerMetrics:
    """Engine gauges/counters plus per-request latency histograms and finish reasons."""

    def __init__(self, client, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(client, model_name))
        self.model_name = model_name

        def hist(name: str, doc: str, buckets=_LATENCY_BUCKETS, prefix: str = "kvloom") -> Histogram:
            labels = ["model_name"] if prefix == "kvloom" else ["model_name", "engine"]
            h = Histogram(f"{prefix}:{name}", doc, labels, buckets=buckets, registry=self.registry)
            return h.labels(model_name) if prefix == "kvloom" else h.labels(model_name, _ENGINE)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token.")
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive output tokens.")
        self.e2e = hist("e2e_request_latency_seconds", "Request latency from arrival to finish.")
        # vLLM's: time_per_output_token is one observation per request (its mean gap after the first token).
        self.vllm_ttft = hist("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS, "vllm")
        self.vllm_tpot = hist("time_per_output_token_seconds", "Time per output token.", _TPOT_BUCKETS, "vllm")
        self.vllm_e2e = hist("e2e_request_latency_seconds", "End-to-end request latency.", _E2E_BUCKETS, "vllm")
        self._success = Counter(
            "vllm:request_success",
            "Finished requests, by finish reason.",
            ["model_name", "engine", "finished_reason"],
            registry=self.registry,
        )

    def observe_finished(self, out, num_tokens: int | None = None) -> None:
        """Record a finished request; num_tokens is its longest output (taken from out when cumulative)."""
        if out is None:
            return
        for completion in out.outputs:
            if completion.finish_reason is not None:
                self._success.labels(self.model_name, _ENGINE, completion.finish_reason).inc()
        m = out.metrics
        if m is None or m.first_token_time is None:
            return
        ttft = m.first_token_time - m.arrival_time
        self.ttft.observe(ttft)
        self.vllm_ttft.observe(ttft)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
            self.vllm_e2e.observe(m.finished_time - m.arrival_time)
        n = num_tokens if num_tokens is not None else max((len(c.token_ids) for c in out.outputs), default=0)
        if n > 1 and m.last_token_time is not None:
            gap = (m.last_token_time - m.first_token_time) / (n - 1)
            self.itl.observe(gap)
            self.vllm_tpot.observe(gap)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
