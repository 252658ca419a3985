"""Shared-prefix workloads: time to first token and total time with the prefix cache on vs off.

Workload `system`: one system prompt of about 1,000 tokens followed by N short questions.
Workload `docs`: D long documents (about 1,000 tokens each), each asked Q questions.
Both submit every request at once (as a RAG pipeline or an agent swarm would) and run greedy.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from kvloom.bench.workload import english_like_text


def _ids(tokenizer, text: str, n: int) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < n:
        ids += ids
    return ids[:n]


def make_prompts(tokenizer, kind: str, seed: int, prefix_tokens: int, num_questions: int, num_docs: int):
    rng = random.Random(seed)
    topics = ["river", "city", "garden", "engine"]
    questions = [
        f" Question {i}: what does part {rng.randint(1, 99)} say about the {rng.choice(topics)}?"
        for i in range(num_questions * max(num_docs, 1))
    ]
    if kind == "system":
        prefix = _ids(tokenizer, english_like_text(rng, prefix_tokens), prefix_tokens)
        return [prefix + tokenizer.encode(q, add_special_tokens=False) for q in questions[:num_questions]]
    docs = [_ids(tokenizer, english_like_text(rng, prefix_tokens), prefix_tokens) for _ in range(num_docs)]
    return [
        docs[d] + tokenizer.encode(questions[d * num_questions + q], add_special_tokens=False)
        for q in range(num_questions)
        for d in range(num_docs)
    ]


def run(model: str | None, prompts: list[list[int]], caching: bool, max_tokens: int) -> dict:
    from kvloom import LLM, SamplingParams

    llm = LLM(model, enable_prefix_caching=caching)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    total = time.perf_counter() - t0
    ttft = sorted(o.metrics.time_to_first_token for o in outs)
    m = llm.get_metrics()
    return {
        "prefix_caching": caching,
        "requests": len(prompts),
        "total_s": round(total, 2),
        "ttft_mean_s": round(statistics.fmean(ttft), 3),
        "ttft_p99_s": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 3),
        "prompt_tokens": sum(len(p) for p in prompts),
        "computed_prompt_tokens": m["prompt_tokens"],
        "hit_rate": round(m["prefix_cache_hits"] / max(m["prefix_cache_queries"], 1), 3),
        "kv_waste_at_peak": round(m["kv_waste_at_peak"], 4),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kvloom bench prefix", description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--workload", choices=["system", "docs"], default="system")
    ap.add_argument("--prefix-tokens", type=int, default=1000)
    ap.add_argument("--num-questions", type=int, default=64, help="questions (per document for `docs`)")
    ap.add_argument("--num-docs", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from kvloom.engine.llm_engine import _load_tokenizer
    from kvloom.engine.model_loader.resolve import resolve_model

    model_dir = resolve_model(args.model)
    prompts = make_prompts(
        _load_tokenizer(model_dir),
        args.workload,
        args.seed,
        args.prefix_tokens,
        args.num_questions,
        args.num_docs if args.workload == "docs" else 0,
    )
    results = [run(model_dir, prompts, caching, args.max_tokens) for caching in (True, False)]
    for r in results:
        print(json.dumps({"workload": args.workload, **r}), flush=True)
    on, off = results
    print(
        json.dumps(
            {
                "summary": {
                    "workload": args.workload,
                    "ttft_mean_speedup": round(off["ttft_mean_s"] / on["ttft_mean_s"], 2),
                    "total_speedup": round(off["total_s"] / on["total_s"], 2),
                }
            }
        )
    )


if __name__ == "__main__":
    main()
