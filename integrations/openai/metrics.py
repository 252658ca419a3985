"""Prometheus metrics of one server (its own registry), named as vLLM's with a `kvloom:` prefix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_GAUGES = {
    "num_requests_running": "Requests in the running batch.",
    "num_requests_waiting": "Requests waiting to be scheduled.",
    "kv_cache_usage_perc": "Fraction of KV cache blocks in use (1 = full).",
}
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


class _EngineCollector:
    """Reads gauges and counters from the engine at scrape time."""

    def __init__(self, client, model_name: str) -> None:
        self.client, self.model_name = client, model_name

    def collect(self):
        m = self.client.get_metrics()
        for name, doc in _GAUGES.items():
            g = GaugeMetricFamily(f"kvloom:{name}", doc, labels=["model_name"])
            g.add_metric([self.model_name], float(m[name]))
            yield g
        for key, (name, doc) in _COUNTERS.items():
            c = CounterMetricFamily(f"kvloom:{name}", doc, labels=["model_name"])
            c.add_metric([self.model_name], float(m[key]))
            yield c
        get_config_info = getattr(self.client, "get_config_info", None)
        if get_config_info is not None:
            # An info gauge as vLLM's `vllm:cache_config_info`: value 1, the configuration in its labels.
            info = {"model_name": self.model_name, **{str(k): str(v) for k, v in get_config_info().items()}}
            g = GaugeMetricFamily("kvloom:engine_config_info", "The engine's configuration.", labels=list(info))
            g.add_metric(list(info.values()), 1.0)
            yield g


class ServerMetrics:
    """Engine gauges/counters plus per-request latency histograms."""

    def __init__(self, client, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(client, model_name))
        self.model_name = model_name

        def hist(name: str, doc: str) -> Histogram:
            h = Histogram(f"kvloom:{name}", doc, ["model_name"], buckets=_LATENCY_BUCKETS, registry=self.registry)
            return h.labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token.")
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive output tokens.")
        self.e2e = hist("e2e_request_latency_seconds", "Request latency from arrival to finish.")

    def observe_finished(self, out, num_tokens: int | None = None) -> None:
        """Record a finished request; num_tokens is its longest output (taken from out when cumulative)."""
        m = out.metrics if out is not None else None
        if m is None or m.first_token_time is None:
            return
        self.ttft.observe(m.first_token_time - m.arrival_time)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
        n = num_tokens if num_tokens is not None else max((len(c.token_ids) for c in out.outputs), default=0)
        if n > 1 and m.last_token_time is not None:
            self.itl.observe((m.last_token_time - m.first_token_time) / (n - 1))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
