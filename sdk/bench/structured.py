"""Structured-output cost: the same chat requests with and without a ~10-field JSON schema, one engine.

`kvloom bench structured` sends `--num-prompts` chat prompts asking for a JSON record (nested object,
array, enums) first constrained by the schema, then unconstrained with each request's max_tokens
set to the token count its constrained answer had (and ignore_eos), so both runs produce exactly
the same tokens in the same batches: the output tok/s ratio is the price of the constraint. It also
reports the share of constrained outputs that validate, the time the step loop spent on bitmasks,
and the p50 time to compile a schema the engine has not seen (`--num-schemas` variants).
`--compare-backends` also times xgrammar against llguidance (if installed) on the same tokenizer:
compile time of the schema and the time to compute one token's bitmask along a valid answer.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

NAMES = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "John"]
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Kyoto", "Cairo", "Quito", "Perth"]


def schema(variant: int = 0) -> dict:
    """A record with ten fields: strings, numbers, a boolean, enums, a nested object and an array."""
    suffix = f"_{variant}" if variant else ""
    return {
        "type": "object",
        "properties": {
            f"name{suffix}": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "maxLength": 60},
            "active": {"type": "boolean"},
            "score": {"type": "number"},
            "role": {"type": "string", "enum": ["engineer", "scientist", "teacher", "artist"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 30},
                    "country": {"type": "string", "maxLength": 30},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "country", "zip"],
            },
            "level": {"type": "string", "enum": ["junior", "senior", "principal"]},
            "notes": {"type": "string", "maxLength": 80},
        },
        "required": [f"name{suffix}", "age", "email", "active", "score", "role", "tags", "address", "level", "notes"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kvloom bench structured", description=__doc__)
    ap.add_argument("--model", default=None, help="model (default: the SDK's default model)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--num-schemas", type=int, default=10, help="new schemas whose compile time is measured")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--compare-backends", action="store_true", help="also time xgrammar against llguidance")
    args = ap.parse_args(argv)

    import jsonschema

    from kvloom import LLM, SamplingParams
    from kvloom.engine.structured_output import StructuredOutputsParams

    llm = LLM(args.model, max_model_len=2048)
    engine = llm.llm_engine
    manager = engine.structured_output

    # Compile times of schemas the engine has not seen (the first also builds the tokenizer's index).
    compile_ms = []
    for variant in range(args.num_schemas + 1):
        t0 = time.perf_counter()
        manager.compile(StructuredOutputsParams(json=schema(variant))).result()
        compile_ms.append((time.perf_counter() - t0) * 1e3)

    ask = "as a JSON record with name, age, email, active, score, role, tags, address, level and notes."
    conversations = []
    for i in range(args.num_prompts):
        who, where = NAMES[i % len(NAMES)], CITIES[i // len(NAMES) % len(CITIES)]
        conversations.append([{"role": "user", "content": f"Describe {who}, a person who lives in {where}, {ask}"}])
    constrained = SamplingParams(
        temperature=0, max_tokens=args.max_tokens, structured_outputs=StructuredOutputsParams(json=schema())
    )
    steps0, mask0 = engine.stats.num_steps, manager.stats.mask_seconds
    t0 = time.perf_counter()
    outs = llm.chat(conversations, constrained, use_tqdm=False)
    constrained_s = time.perf_counter() - t0
    steps = engine.stats.num_steps - steps0
    mask_s = manager.stats.mask_seconds - mask0
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    valid = 0
    for o in outs:
        try:
            jsonschema.validate(json.loads(o.outputs[0].text), schema())
            valid += 1
        except (json.JSONDecodeError, jsonschema.ValidationError):
            pass

    free = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    llm.reset_prefix_cache()
    t0 = time.perf_counter()
    free_outs = llm.chat(conversations, free, use_tqdm=False)
    free_s = time.perf_counter() - t0
    assert [len(o.outputs[0].token_ids) for o in free_outs] == lengths

    tokens = sum(lengths)
    for run, seconds in (("unconstrained", free_s), ("json_schema", constrained_s)):
        print(
            json.dumps(
                {
                    "run": run,
                    "requests": len(outs),
                    "output_tokens": tokens,
                    "seconds": round(seconds, 2),
                    "output_tok_per_s": round(tokens / seconds, 2),
                }
            ),
            flush=True,
        )
    print(
        json.dumps(
            {
                "constrained_over_unconstrained": round(free_s / constrained_s, 3),
                "bar": 0.9,
                "valid_outputs": f"{valid}/{len(outs)}",
                "cut_by_max_tokens": sum(o.outputs[0].finish_reason == "length" for o in outs),
                "first_compile_ms": round(compile_ms[0], 1),
                "new_schema_compile_ms_p50": round(statistics.median(compile_ms[1:]), 1),
                "mask_ms_per_step": round(mask_s * 1e3 / max(steps, 1), 3),
                "mask_share_of_constrained_run": round(mask_s / constrained_s, 4),
                "steps": steps,
                "machine": f"{platform.processor() or platform.machine()}, {_cores()} cores",
            }
        ),
        flush=True,
    )
    if args.compare_backends:
        answer = next(o.outputs[0].text for o in outs if o.outputs[0].finish_reason == "stop")
        compare_backends(llm.get_tokenizer(), engine.arch.vocab_size, schema(), answer)


def compare_backends(tokenizer, vocab_size: int, spec: dict, answer: str) -> None:
    """Compile time and per-token bitmask time of each grammar library, on one tokenizer and answer."""
    import torch

    ids = tokenizer.encode(answer, add_special_tokens=False)
    text = json.dumps(spec)

    def report(name: str, setup_s: float, compile_s: float, fill, accept) -> None:
        bitmask = torch.full((1, (vocab_size + 31) // 32), -1, dtype=torch.int32)
        times = []
        for token in ids:
            t0 = time.perf_counter()
            fill(bitmask)
            times.append(time.perf_counter() - t0)
            assert accept(token), f"{name} rejected token {token}"
        print(
            json.dumps(
                {
                    "backend": name,
                    "tokenizer_setup_ms": round(setup_s * 1e3, 1),
                    "compile_ms": round(compile_s * 1e3, 1),
                    "mask_us_p50": round(statistics.median(times) * 1e6, 1),
                    "mask_us_max": round(max(times) * 1e6, 1),
                    "tokens": len(ids),
                }
            ),
            flush=True,
        )

    import xgrammar

    t0 = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    t1 = time.perf_counter()
    compiled = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False).compile_json_schema(text)
    t2 = time.perf_counter()
    matcher = xgrammar.GrammarMatcher(compiled)
    report("xgrammar", t1 - t0, t2 - t1, lambda b: matcher.fill_next_token_bitmask(b, 0), matcher.accept_token)
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        print(json.dumps({"backend": "llguidance", "skipped": "not installed (pip install llguidance)"}), flush=True)
        return
    t0 = time.perf_counter()
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    t1 = time.perf_counter()
    ll_matcher = llguidance.LLMatcher(ll_tokenizer, llguidance.LLMatcher.grammar_from_json_schema(text))
    t2 = time.perf_counter()
    fill = lambda b: llguidance.torch.fill_next_token_bitmask(ll_matcher, b, 0)
    report("llguidance", t1 - t0, t2 - t1, fill, ll_matcher.consume_token)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    main()
