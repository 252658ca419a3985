"""The `kvloom` command line: generate, bench."""

from __future__ import annotations

import argparse
import sys


def _generate(args: argparse.Namespace) -> None:
    from kvloom import LLM, SamplingParams

    llm = LLM(
        args.model, dtype=args.dtype, max_model_len=args.max_model_len, kv_cache_memory_gb=args.kv_cache_memory_gb
    )
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
        stop=args.stop or None,
    )
    if args.raw:
        out = llm.generate([args.prompt], params, use_tqdm=False)[0]
    else:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
    print(out.outputs[0].text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kvloom", description="In-process LLM serving SDK.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt and print the answer")
    gen.add_argument("prompt")
    gen.add_argument(
        "--model", default=None, help="local HF dir, .gguf file, or alias (default: smollm2-135m-instruct)"
    )
    gen.add_argument("--raw", action="store_true", help="plain completion instead of the chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--kv-cache-memory-gb", type=float, default=None)
    gen.set_defaults(func=_generate)

    bench = sub.add_parser("bench", help="benchmarks: throughput, prefix")
    bench.add_argument("which", choices=["throughput", "prefix"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)

    args = parser.parse_args(argv)
    if args.command == "bench":
        import importlib

        importlib.import_module(f"kvloom.bench.{args.which}").main(args.rest)
        return
    try:
        args.func(args)
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"kvloom: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
