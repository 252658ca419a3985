"""`kvloom bench serve`'s load generator against a live in-process server."""

from __future__ import annotations

import asyncio

import kvloom
from kvloom import AsyncLLM
from kvloom.bench.serve import run_load
from kvloom.bench.workload import make_workload


def test_load_generator_measures_streamed_requests(tiny_llama):
    engine = AsyncLLM(model=tiny_llama, num_gpu_blocks_override=256, max_model_len=512)
    try:
        items = make_workload(engine.get_tokenizer(), 6, seed=1, prompt_len=(8, 40), output_len=(4, 12))
        with kvloom.serve(engine, served_model_name="tiny") as server:
            result = asyncio.run(
                run_load(server.base_url, "tiny", items, concurrency=3, rate=50.0, seed=1, api_key=None)
            )
    finally:
        engine.shutdown()
    assert result["requests"] == 6 and result["concurrency"] == 3
    assert result["output_tok_per_s"] > 0
    assert 0 < result["ttft_p50_ms"] <= result["ttft_p99_ms"]
    assert result["itl_p50_ms"] > 0 and result["tpot_p50_ms"] > 0
