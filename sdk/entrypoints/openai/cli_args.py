"""vLLM's `vllm serve` flags and environment variables on `kvloom serve` (vLLM's entrypoints/openai/cli_args.py).

A flag kvloom implements is accepted under vLLM's name; a flag whose vLLM behaviour kvloom does not have
is refused with the reason (argparse's exit status 2), or accepted only at the value that means what kvloom
does. Nothing is accepted and then ignored, except the flags in NO_OP_VLLM_FLAGS, whose vLLM effect kvloom
always has (README "kvloom serve flags" lists each).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from dataclasses import dataclass, field

from kvloom.engine.arg_utils import DEFAULT_ONLY_VLLM_ARGS

logger = logging.getLogger("kvloom.serve")

# vLLM flags kvloom refuses, with what kvloom lacks. Any value (or none) is refused.
REFUSED_VLLM_FLAGS: dict[str, str] = {
    "--reasoning-parser": "reasoning (thinking) text is not split from the answer",
    "--enable-reasoning": "reasoning (thinking) text is not split from the answer",
    "--enable-log-requests": "kvloom does not log request contents",
    "--attention-backend": "kvloom picks its own kernels (Triton on CUDA, C++/torch on CPU)",
    "--rope-scaling": "the model's config.json sets RoPE scaling; overriding it is not supported",
    "--rope-theta": "the model's config.json sets RoPE; overriding it is not supported",
    "--hf-overrides": "overriding the model's config is not supported",
    "--override-generation-config": "server-wide sampling defaults are not implemented",
    "--default-chat-template-kwargs": "server-wide chat_template_kwargs are not implemented (send them per request)",
    "--ssl-keyfile": "TLS is not served; put a TLS proxy in front",
    "--ssl-certfile": "TLS is not served; put a TLS proxy in front",
    "--config": "YAML config files are not read; pass the flags",
    "--otlp-traces-endpoint": "OpenTelemetry tracing is not implemented",
    "--kv-transfer-config": "KV transfer (disaggregated prefill) is not implemented",
    "--enable-sleep-mode": "sleep mode is not implemented (shut the engine down instead)",
    "--enable-expert-parallel": "kvloom runs tensor parallelism only",
    "--enable-request-id-headers": "X-Request-Id response headers are not implemented",
    "--mm-processor-kwargs": "kvloom serves text-only models",
    "--max-num-partial-prefills": "one scheduler policy for prefills: --long-prefill-token-threshold bounds them",
    "--structured-outputs-config": "structured output runs on xgrammar with fixed settings",
    "--disable-sliding-window": "sliding-window layers follow the model's config",
    "--num-scheduler-steps": "multi-step scheduling (removed in vLLM V1) is not implemented; every step is scheduled",
    "--speculative-model": "draft-model speculation is not implemented; use --speculative-config "
    '\'{"method": "ngram", "num_speculative_tokens": 4}\'',
    "--num-speculative-tokens": "vLLM's old spelling; use --speculative-config "
    '\'{"method": "ngram", "num_speculative_tokens": 4}\'',
    "--default-mm-loras": "kvloom serves text-only models",
}

# vLLM flags accepted only at the value that means what kvloom does: flag -> (accepted, type, why).
# The engine-level ones come from DEFAULT_ONLY_VLLM_ARGS so both front ends refuse the same values.
ONLY_VALUE_FLAGS: dict[str, tuple[tuple, type, str]] = {
    "--response-role": (("assistant",), str, "responses always carry the assistant role"),
    "--max-logprobs": ((20,), int, "the engine returns at most 20 logprobs per token, as vLLM's default"),
    "--generation-config": (
        ("vllm",),
        str,
        "the model's generation_config.json sampling defaults are not applied (kvloom behaves as `vllm`)",
    ),
    "--chat-template-content-format": (("auto",), str, "the content format is not configurable"),
    "--scheduling-policy": (("fcfs",), str, "requests are scheduled first come, first served"),
    "--guided-decoding-backend": (("auto", "xgrammar"), str, "structured output runs on xgrammar"),
    **{
        "--" + name.replace("_", "-"): (accepted, type(accepted[0]), why)
        for name, (accepted, why) in DEFAULT_ONLY_VLLM_ARGS.items()
    },
}
ONLY_VALUE_FLAGS["--cpu-offload-gb"] = ((0,), float, ONLY_VALUE_FLAGS["--cpu-offload-gb"][2])

# vLLM flags whose effect kvloom always has: accepted, then nothing more to do (README says why for each).
NO_OP_VLLM_FLAGS: dict[str, str] = {
    "--enforce-eager": "kvloom never captures CUDA graphs: it always runs eagerly",
    "--disable-log-requests": "kvloom never logs request contents",
    "--disable-log-stats": "kvloom logs no periodic throughput stats",
    "--disable-custom-all-reduce": "tensor parallelism all-reduces with torch.distributed",
    "--disable-frontend-multiprocessing": "the HTTP front end runs in the serving process",
    "--use-v2-block-manager": "the KV cache is always managed in blocks (vLLM made this the only mode)",
}

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def add_vllm_serve_args(p: argparse.ArgumentParser) -> None:
    """vLLM's serve flags that kvloom's own set lacks (kvloom's names stay as aliases where they differ)."""
    p.add_argument("--model", dest="model_option", default=None, help="the model (same as the positional MODEL)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: the model's)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accepted; kvloom runs its own model code and never executes code shipped with a model",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of GPU memory for weights and KV cache on CUDA; on CPU the KV cache is "
        "--kv-cache-memory-gb (or VLLM_CPU_KVCACHE_SPACE), as in vLLM's CPU backend",
    )
    p.add_argument(
        "--kv-cache-memory-bytes",
        type=_human_bytes,
        default=None,
        help="KV cache size in bytes (1G, 512Mi, ...); same as --kv-cache-memory-gb",
    )
    p.add_argument(
        "--enable-chunked-prefill",
        nargs="?",
        const=True,
        type=_boolean,
        default=None,
        help="split long prompts over steps (on by default; also --enable-chunked-prefill=false)",
    )
    p.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-gpu-blocks-override", type=int, default=None, help="KV blocks to allocate (testing)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--chat-template",
        default=None,
        help="a Jinja chat template, as a file path or the template itself (replaces the model's)",
    )
    p.add_argument("--root-path", default=None, help="the path prefix a reverse proxy serves this app under")
    p.add_argument(
        "--uvicorn-log-level", choices=_LOG_LEVELS, default="warning", help="uvicorn's log level (default warning)"
    )
    p.add_argument("--swap-space", type=float, default=None, help="accepted: preemption recomputes, as vLLM V1")
    p.add_argument("--max-seq-len-to-capture", type=int, default=None, help="accepted: no CUDA graphs are captured")
    p.add_argument("--code-revision", default=None, help="accepted: a model's remote code is never run")
    for flag, why in NO_OP_VLLM_FLAGS.items():
        p.add_argument(flag, action="store_true", help=f"accepted: {why}")
    group = p.add_argument_group("vLLM flags kvloom accepts only at one value")
    for flag, (accepted, kind, why) in ONLY_VALUE_FLAGS.items():
        shown = "accepted: " + ", ".join(map(str, accepted))
        group.add_argument(
            flag,
            action=_OnlyValue,
            nargs=0 if kind is bool else None,
            accepted=accepted,
            kind=kind,
            why=why,
            default=argparse.SUPPRESS,
            help=f"{shown} ({why})",
        )
    group.add_argument(
        "--return-tokens-as-token-ids",
        action=_OnlyValue,
        nargs=0,
        accepted=(False,),
        kind=bool,
        why="logprobs name tokens by their text",
        default=argparse.SUPPRESS,
        help="refused (logprobs name tokens by their text)",
    )
    group.add_argument(
        "--limit-mm-per-prompt",
        action=_TextOnly,
        default=argparse.SUPPRESS,
        help="accepted only with every limit 0 (kvloom serves text-only models)",
    )
    refused = p.add_argument_group("vLLM flags kvloom refuses")
    for flag, why in REFUSED_VLLM_FLAGS.items():
        refused.add_argument(flag, action=_Refused, nargs="?", why=why, default=argparse.SUPPRESS, help=why)


class _Refused(argparse.Action):
    def __init__(self, option_strings, dest, why: str, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.why = why

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} is not supported by kvloom: {self.why}")


class _OnlyValue(argparse.Action):
    def __init__(self, option_strings, dest, accepted, kind, why: str, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.accepted, self.kind, self.why = accepted, kind, why

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if self.kind is bool:  # a switch: giving it asks for True
            value = True
        else:
            try:
                value = self.kind(values)
            except ValueError:
                parser.error(f"{option_string}: invalid {self.kind.__name__} value {values!r}")
        if value not in self.accepted:
            if self.kind is bool:
                parser.error(f"{option_string} is not supported by kvloom: {self.why}")
            accepted = ", ".join(map(str, self.accepted))
            parser.error(f"{option_string} {values} is not supported by kvloom: {self.why}; accepted: {accepted}")
        setattr(namespace, self.dest, value)


class _TextOnly(argparse.Action):
    """vLLM's --limit-mm-per-prompt ('{"image": 0}' or image=0,video=0): only all-zero limits mean text-only."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            limits = json.loads(values) if values.strip().startswith("{") else _key_values(values)
            nonzero = sorted(k for k, v in limits.items() if (v.get("count", 0) if isinstance(v, dict) else int(v)))
        except (ValueError, AttributeError) as e:
            parser.error(f"{option_string}: cannot read {values!r} ({e})")
        if nonzero:
            parser.error(
                f"{option_string} {values} is not supported by kvloom: it serves text-only models "
                f"(no {', '.join(nonzero)} inputs); only limits of 0 are accepted"
            )
        setattr(namespace, self.dest, limits)


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("true", "1")


def normalize_flag_names(argv: list[str]) -> list[str]:
    """vLLM's parser takes --max_model_len for --max-model-len: the same here (values are left alone)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


def _key_values(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if item.strip())


def _human_bytes(text: str) -> int:
    """vLLM's human-readable sizes: 1000, 1k/1M/1G (powers of 1000), 1Ki/1Mi/1Gi (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r}")
    number, unit, binary = m.groups()
    power = " KMGT".index(unit.upper()) if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def model_from_args(args: argparse.Namespace) -> str | None:
    """The model from the positional MODEL or --model (both only when they agree)."""
    positional, option = getattr(args, "model", None), getattr(args, "model_option", None)
    if positional is not None and option is not None and positional != option:
        raise ValueError(f"the model is given twice: MODEL {positional!r} and --model {option!r}")
    return positional if positional is not None else option


def allowed_origins(values: list[str]) -> list[str]:
    """kvloom's `--allowed-origins A B` or vLLM's JSON list `--allowed-origins '["A", "B"]'`."""
    if len(values) == 1 and values[0].lstrip().startswith("["):
        origins = json.loads(values[0])
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            raise ValueError(f"--allowed-origins must be a JSON list of strings, got {values[0]!r}")
        return origins
    return list(values)


def load_chat_template(value: str | None) -> str | None:
    """vLLM's --chat-template: a file's contents, else the value itself when it looks like a template."""
    if value is None:
        return None
    try:
        with open(value, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        if not any(c in value for c in "{}\n"):
            raise ValueError(f"--chat-template {value!r} looks like a file path, but it cannot be read: {e}") from None
    # A template given inline: interpret its escapes (\n) as vLLM does.
    return value.encode("utf-8").decode("unicode_escape")


# vLLM environment variables `kvloom serve` reads (a kvloom flag or KVLOOM_* variable wins).
READ_VLLM_ENV = ("VLLM_API_KEY", "VLLM_CPU_KVCACHE_SPACE", "VLLM_LOGGING_LEVEL", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")
# Values that mean what kvloom does (unset counts too); any other value is refused at start-up.
_ENV_ACCEPTED = {
    "VLLM_CPU_OMP_THREADS_BIND": ("", "auto", "nobind", "all"),
    "VLLM_CPU_NUM_OF_RESERVED_CPU": ("", "0"),
    "VLLM_USE_MODELSCOPE": ("", "0", "false", "False"),
    "VLLM_ALLOW_LONG_MAX_MODEL_LEN": ("", "0", "false", "False"),
}
_ENV_WHY = {
    "VLLM_CPU_OMP_THREADS_BIND": "kvloom does not pin threads itself; start it under `taskset -c CPUS` (it uses the "
    "process's CPU affinity)",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "kvloom does not pin threads itself; start it under `taskset -c CPUS`",
    "VLLM_USE_MODELSCOPE": "models resolve through the Hugging Face hub only",
    "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "max_model_len is bounded by the model's context length",
}


@dataclass
class VllmEnvironment:
    """What vLLM's environment variables ask of `kvloom serve` (read at call time, never written)."""

    api_key: str | None = None
    kv_cache_memory_gb: float | None = None
    logging_level: str | None = None
    allow_runtime_lora_updating: bool = False
    not_read: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, environ: os._Environ | dict[str, str]) -> VllmEnvironment:
        """Parse the variables; a value kvloom cannot honour raises ValueError naming the variable."""
        for name, accepted in _ENV_ACCEPTED.items():
            value = environ.get(name, "").strip()
            if value not in accepted:
                raise ValueError(f"environment variable {name}={value!r} is not supported by kvloom: {_ENV_WHY[name]}")
        env = cls(api_key=environ.get("VLLM_API_KEY") or None)
        space = environ.get("VLLM_CPU_KVCACHE_SPACE", "").strip()
        if space:
            try:
                gib = float(space)
            except ValueError:
                raise ValueError(f"VLLM_CPU_KVCACHE_SPACE must be a number of GiB, got {space!r}") from None
            if gib < 0:
                raise ValueError(f"VLLM_CPU_KVCACHE_SPACE must be >= 0 GiB, got {space!r}")
            env.kv_cache_memory_gb = gib or None  # 0: vLLM's "pick a default"
        level = environ.get("VLLM_LOGGING_LEVEL", "").strip().upper()
        if level:
            if not isinstance(logging.getLevelName(level), int):
                raise ValueError(f"VLLM_LOGGING_LEVEL={level!r} is not a logging level")
            env.logging_level = level
        env.allow_runtime_lora_updating = environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in (
            "1",
            "true",
            "yes",
        )
        known = set(READ_VLLM_ENV) | set(_ENV_ACCEPTED)
        env.not_read = sorted(k for k in environ if k.startswith("VLLM_") and k not in known)
        return env

    def warn_not_read(self) -> None:
        if self.not_read:
            logger.warning(
                "kvloom does not read these vLLM environment variables (README, 'kvloom serve flags'): %s",
                ", ".join(self.not_read),
            )
