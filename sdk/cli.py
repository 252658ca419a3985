"""The `kvloom` command line: generate, bench."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from kvloom.engine.log import configure_default_logging

if TYPE_CHECKING:
    from kvloom.engine.arg_utils import EngineArgs
    from kvloom.entrypoints.openai.cli_args import VllmEnvironment


def _generate(args: argparse.Namespace) -> None:
    from kvloom import LLM, SamplingParams

    llm = LLM(
        args.model,
        dtype=args.dtype,
        quantization=args.quantization,
        max_model_len=args.max_model_len,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        speculative_config=args.speculative_config,
        **_parallel_args(args),
        **_hub_args(args),
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


def _add_parallel_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="worker processes, one per TP rank")
    p.add_argument(
        "--distributed-executor-backend",
        choices=["uni", "mp", "external_launcher"],
        default=None,
        help="uni: in-process (TP=1); mp: a process per rank (default for TP>1, and for `kvloom serve`); "
        "external_launcher: under torchrun",
    )
    # vLLM's other parallel flags: accepted only at 1, so a script never silently runs single-process.
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, help="not supported; must be 1")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1, help="not supported; must be 1")


def _add_latency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--long-prefill-token-threshold",
        type=int,
        default=0,
        help="at most this many prompt tokens of one request per step, so decodes never wait behind a long "
        "prefill (0: only --max-num-batched-tokens bounds a step)",
    )
    p.add_argument(
        "--speculative-config",
        default=None,
        help='speculative decoding as JSON, vLLM\'s form: \'{"method": "ngram", "num_speculative_tokens": 4}\' '
        "(optional prompt_lookup_max / prompt_lookup_min)",
    )


def _parallel_args(args: argparse.Namespace) -> dict:
    return dict(
        tensor_parallel_size=args.tensor_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
    )


def _add_quantization_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantization",
        "-q",
        default=None,
        help="gptq, awq, fp8, gguf (keep a .gguf's Q4/Q8 weights), or int8/int4 (quantize a float model "
        "at load); default: the checkpoint's quantization_config",
    )


def _add_hub_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default=None, help="the hub model's branch, tag or commit (default: main)")
    p.add_argument("--tokenizer-revision", default=None, help="the tokenizer's revision (default: --revision)")
    p.add_argument("--download-dir", default=None, help="cache directory for downloads (default: HF_HUB_CACHE)")
    p.add_argument(
        "--hf-token",
        nargs="?",
        const=True,
        default=None,
        help="hub token; without a value, the stored `hf auth login` token (default: HF_TOKEN or the login)",
    )


def _add_pooling_flags(p: argparse.ArgumentParser) -> None:
    """vLLM's flags for embedding models (kvloom.engine.pooling.config checks their values)."""
    p.add_argument("--runner", default="auto", help="auto | generate | pooling (an embedding model: /v1/embeddings)")
    p.add_argument("--convert", default="auto", help="auto | none | embed (serve a decoder as an embedding model)")
    p.add_argument("--task", default=None, help="vLLM's older spelling: generate | embed")
    p.add_argument("--pooler-config", default=None, help='JSON, e.g. \'{"pooling_type": "MEAN", "normalize": true}\'')
    p.add_argument("--override-pooler-config", default=None, help="vLLM's older name of --pooler-config")


def _pooling_args(args: argparse.Namespace) -> dict:
    names = ("runner", "convert", "task", "pooler_config", "override_pooler_config")
    return {name: getattr(args, name) for name in names}


def _hub_args(args: argparse.Namespace) -> dict:
    return dict(
        revision=args.revision,
        tokenizer_revision=args.tokenizer_revision,
        download_dir=args.download_dir,
        hf_token=args.hf_token,
    )


def serve_config(args: argparse.Namespace, environ=None) -> tuple[EngineArgs, dict, VllmEnvironment]:
    """The engine arguments and server options `kvloom serve` runs with, without starting anything.

    Flags win over KVLOOM_* variables, which win over vLLM's (VLLM_API_KEY, VLLM_CPU_KVCACHE_SPACE, ...);
    environ (default os.environ) is only read. A flag or variable kvloom cannot honour raises ValueError.
    """
    import os

    from kvloom.engine.arg_utils import EngineArgs
    from kvloom.engine.config import SpeculativeConfig
    from kvloom.engine.model_loader.quant_formats import check_quantization_name
    from kvloom.entrypoints.openai.cli_args import (
        VllmEnvironment,
        allowed_origins,
        load_chat_template,
        model_from_args,
    )
    from kvloom.serving import _env_flag, lora_requests

    environ = os.environ if environ is None else environ
    env = VllmEnvironment.read(environ)
    parallel = _parallel_args(args)
    if parallel["distributed_executor_backend"] is None:
        # The server's event loop and the engine's step loop share this process; the model's
        # intra-op (OpenMP) threads run about 1.5-2x slower when driven from a non-main thread
        # beside them (docs/benchmarks.md). A worker process keeps the forward pass on its own
        # main thread, as vLLM's engine-core process does. --distributed-executor-backend uni opts out.
        parallel["distributed_executor_backend"] = "mp"
    if args.kv_cache_memory_gb is not None and args.kv_cache_memory_bytes is not None:
        raise ValueError("give one of --kv-cache-memory-gb and --kv-cache-memory-bytes")
    kv_cache_gb = args.kv_cache_memory_gb
    if args.kv_cache_memory_bytes is not None:
        kv_cache_gb = args.kv_cache_memory_bytes / 2**30
    if args.swap_space is not None and args.swap_space < 0:
        raise ValueError(f"--swap-space must be >= 0, got {args.swap_space}")
    chunked = {} if args.enable_chunked_prefill is None else {"enable_chunked_prefill": args.enable_chunked_prefill}
    engine_args = EngineArgs.from_kwargs(
        **parallel,
        **_hub_args(args),
        **_pooling_args(args),
        **chunked,
        model=model_from_args(args),
        tokenizer=args.tokenizer,
        trust_remote_code=args.trust_remote_code,
        dtype=args.dtype,
        quantization=args.quantization,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        speculative_config=args.speculative_config,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_cache_memory_gb=kv_cache_gb if kv_cache_gb is not None else env.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        device=args.device,
        seed=args.seed,
        enable_lora=args.enable_lora or bool(args.lora_modules),
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras,
    )
    # What can be checked without the model fails here, before anything loads.
    check_quantization_name(engine_args.quantization)
    SpeculativeConfig.from_user(engine_args.speculative_config)
    server = dict(
        host=args.host,
        port=args.port,
        api_key=_one_or_all(args.api_key) or environ.get("KVLOOM_API_KEY") or env.api_key,
        served_model_name=args.served_model_name,
        allowed_origins=allowed_origins(args.allowed_origins) or None,
        lora_modules=lora_requests(args.lora_modules),
        allow_runtime_lora_updating=args.allow_runtime_lora_updating
        or _env_flag("KVLOOM_ALLOW_RUNTIME_LORA_UPDATING")
        or env.allow_runtime_lora_updating,
        tool_call_parser=args.tool_call_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        max_request_body_bytes=int(args.max_request_body_mb * 2**20),
        lora_root=args.lora_root,
        public_metrics=args.public_metrics,
        uvicorn_log_level=args.uvicorn_log_level,
        root_path=args.root_path or "",
        chat_template=load_chat_template(args.chat_template),
    )
    return engine_args, server, env


def _one_or_all(values: list[str] | None) -> str | list[str] | None:
    return values[0] if values and len(values) == 1 else values


def _serve(args: argparse.Namespace) -> None:
    import logging
    import signal
    import threading

    from kvloom.async_llm import AsyncLLM
    from kvloom.integrations.openai.server import start_server

    engine_args, server, env = serve_config(args)
    if env.logging_level is not None and "KVLOOM_LOGGING_LEVEL" not in os.environ:
        logging.getLogger("kvloom").setLevel(env.logging_level)  # this command's own process
    env.warn_not_read()
    loras, chat_template = server["lora_modules"], server.pop("chat_template")
    client = AsyncLLM(engine_args)
    if chat_template is not None:
        # vLLM's --chat-template: this server's engine renders every chat with it.
        client.get_tokenizer().chat_template = chat_template
    try:
        handle = start_server(client, **server)
    except BaseException:
        client.shutdown()
        raise
    for lora in loras:
        print(f"kvloom: LoRA adapter {lora.lora_name!r} (id {lora.lora_int_id}) from {lora.lora_path}", flush=True)
    print(f"kvloom: serving {client.model_name} at {handle.base_url}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("kvloom: shutting down", flush=True)
    handle.stop()
    client.shutdown()


def add_serve_args(srv: argparse.ArgumentParser) -> None:
    """`kvloom serve`'s flags, also those of `python -m kvloom.entrypoints.openai.api_server`."""
    from kvloom.entrypoints.openai.cli_args import add_vllm_serve_args

    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--api-key",
        nargs="+",
        default=None,
        help="require this bearer key on /v1/* (several: any of them; or KVLOOM_API_KEY / VLLM_API_KEY)",
    )
    srv.add_argument("--served-model-name", nargs="+", default=None)
    srv.add_argument("--allowed-origins", nargs="*", default=[], help="enable CORS for these origins")
    srv.add_argument(
        "--lora-modules",
        nargs="*",
        default=[],
        help='adapters as name=path or JSON {"name", "path"}; a request\'s model selects one (enables LoRA)',
    )
    srv.add_argument("--enable-lora", action="store_true")
    srv.add_argument("--max-loras", type=int, default=1, help="adapters in one batch (slots)")
    srv.add_argument("--max-lora-rank", type=int, default=16)
    srv.add_argument("--max-cpu-loras", type=int, default=None, help="adapters kept in host memory (LRU)")
    srv.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter (or KVLOOM_ALLOW_RUNTIME_LORA_UPDATING=1)",
    )
    srv.add_argument(
        "--tool-call-parser",
        default=None,
        help="tool-call format: hermes, llama3_json, mistral or pythonic (default: the chat template's, else hermes)",
    )
    srv.add_argument(
        "--enable-auto-tool-choice",
        action=argparse.BooleanOptionalAction,
        default=True,
        help='let the model choose between text and tool calls (tool_choice "auto"); on by default',
    )
    srv.add_argument(
        "--max-request-body-mb", type=float, default=8.0, help="larger request bodies get a 413 (default 8 MiB)"
    )
    srv.add_argument(
        "--lora-root", default=None, help="runtime LoRA loading takes adapter paths under this directory only"
    )
    srv.add_argument(
        "--public-metrics", action="store_true", help="serve /metrics without the API key (for Prometheus scrapers)"
    )
    srv.add_argument("--max-model-len", type=int, default=None)
    srv.add_argument("--max-num-seqs", type=int, default=256)
    srv.add_argument("--max-num-batched-tokens", type=int, default=None)
    _add_latency_args(srv)
    srv.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    srv.add_argument(
        "--dtype",
        choices=["auto", "half", "float16", "bfloat16", "float", "float32"],
        default="auto",
        help="weights and activations; auto: float32 on CPU, the checkpoint's half type on CUDA; bfloat16 on "
        "CPU: bfloat16 weights and KV cache, float32 activations (linear inputs rounded to bfloat16 where the "
        "CPU has AVX512_BF16)",
    )
    _add_quantization_flag(srv)
    srv.add_argument("--kv-cache-memory-gb", type=float, default=None)
    srv.add_argument("--seed", type=int, default=0)
    _add_parallel_flags(srv)
    _add_hub_flags(srv)
    _add_pooling_flags(srv)
    add_vllm_serve_args(srv)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from kvloom.entrypoints.openai.cli_args import normalize_flag_names

        argv = ["serve", *normalize_flag_names(argv[1:])]
    run(parser.parse_args(argv))


def build_parser() -> argparse.ArgumentParser:
    """The `kvloom` command line's parser (generate, serve, bench)."""
    parser = argparse.ArgumentParser(prog="kvloom", description="In-process LLM serving SDK.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt and print the answer")
    gen.add_argument("prompt")
    gen.add_argument(
        "--model",
        default=None,
        help="hub id (org/name), local HF dir, .gguf file, or alias (default: smollm2-135m-instruct)",
    )
    gen.add_argument("--raw", action="store_true", help="plain completion instead of the chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--dtype", default="auto")
    _add_quantization_flag(gen)
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--kv-cache-memory-gb", type=float, default=None)
    _add_parallel_flags(gen)
    _add_latency_args(gen)
    _add_hub_flags(gen)
    gen.set_defaults(func=_generate)

    srv = sub.add_parser(
        "serve", help="run the OpenAI-compatible server (vLLM's `vllm serve` flags)", usage="%(prog)s [MODEL] [flags]"
    )
    srv.add_argument(
        "model", nargs="?", default=None, help="hub id (org/name), local HF dir, .gguf, or alias (default if omitted)"
    )
    add_serve_args(srv)
    srv.set_defaults(func=_serve)

    benches = ["throughput", "prefix", "serve", "profile", "ops", "linear", "lora", "structured", "soak", "tp", "quant"]
    bench = sub.add_parser("bench", help=f"benchmarks: {', '.join(benches)}")
    bench.add_argument("which", choices=benches)
    bench.add_argument("rest", nargs=argparse.REMAINDER)

    return parser


def run(args: argparse.Namespace) -> None:
    """Run a parsed command line; a ValueError, TypeError or RuntimeError exits with status 2 and its message."""
    # A command line owns its process: show the engine's INFO lines unless logging was configured already.
    configure_default_logging()
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
