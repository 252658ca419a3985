"""vLLM's serve flags, environment variables, module entry point and `vllm:` metric names on kvloom.

Every command line below was copied from a vLLM guide or a public deployment script (source on the line
above it; `$VAR`s replaced by values). Each either parses into the expected engine arguments and server
options, or is refused with an error that names the flag or variable. Parsing starts no model.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvloom.cli import build_parser, serve_config
from kvloom.entrypoints.openai.api_server import make_arg_parser
from kvloom.entrypoints.openai.cli_args import normalize_flag_names

DOCS = "https://docs.vllm.ai/en"
CODE = "GitHub code index hit, excerpt id"  # public scripts found with the find_string tool
OK, REFUSED = "ok", "refused"

# (source, command line, expected): expected is (OK, {engine or server field: value}) or (REFUSED, needle),
# where the needle must appear in the error message.
GUIDE_COMMANDS = [
    (
        f"{DOCS}/v0.8.1/serving/openai_compatible_server.html",
        "vllm serve NousResearch/Meta-Llama-3-8B-Instruct --dtype auto --api-key token-abc123",
        (OK, {"model": "NousResearch/Meta-Llama-3-8B-Instruct", "dtype": "auto", "api_key": "token-abc123"}),
    ),
    (
        "https://github.com/vllm-project/vllm/blob/main/docs/getting_started/quickstart.md",
        "vllm serve Qwen/Qwen2.5-1.5B-Instruct",
        (OK, {"model": "Qwen/Qwen2.5-1.5B-Instruct", "host": "127.0.0.1", "port": 8000}),
    ),
    (
        "https://github.com/vllm-project/vllm/blob/main/docs/getting_started/quickstart.md (the text's advice)",
        "vllm serve Qwen/Qwen2.5-1.5B-Instruct --generation-config vllm",
        (OK, {"model": "Qwen/Qwen2.5-1.5B-Instruct"}),
    ),
    (
        "https://github.com/vllm-project/vllm/blob/main/docs/getting_started/quickstart.md",
        "vllm serve Qwen/Qwen2.5-1.5B-Instruct --attention-backend FLASH_ATTN",
        (REFUSED, "--attention-backend"),
    ),
    (
        "https://github.com/vllm-project/vllm/blob/main/docs/serving/openai_compatible_server.md",
        "vllm serve <model> --chat-template ./path-to-chat-template.jinja",
        (REFUSED, "--chat-template './path-to-chat-template.jinja' looks like a file path"),
    ),
    (
        f"{DOCS}/v0.8.4/features/tool_calling.html (the template file exists in the test's directory)",
        "vllm serve meta-llama/Llama-3.1-8B-Instruct --enable-auto-tool-choice --tool-call-parser llama3_json "
        "--chat-template examples/tool_chat_template_llama3.1_json.jinja",
        (OK, {"tool_call_parser": "llama3_json", "enable_auto_tool_choice": True, "chat_template": "{{ tools }}"}),
    ),
    (
        "https://github.com/vllm-project/vllm/blob/main/docs/features/lora.md",
        "vllm serve meta-llama/Llama-2-7b-hf --enable-lora --lora-modules sql-lora=$HOME/.cache/huggingface/hub/"
        "models--yard1--llama-2-7b-sql-lora-test/snapshots/0dfa347e8877a4d4ed19ee56c140fa518470028c/",
        (OK, {"enable_lora": True, "lora_names": ["sql-lora"]}),
    ),
    (
        "https://github.com/vllm-project/vllm/blob/main/docs/features/lora.md (new --lora-modules format)",
        "vllm serve meta-llama/Llama-2-7b-hf --enable-lora --lora-modules "
        '\'{"name": "sql-lora", "path": "/path/to/lora", "base_model_name": "meta-llama/Llama-2-7b"}\'',
        (OK, {"enable_lora": True, "lora_names": ["sql-lora"]}),
    ),
    (
        "https://github.com/vllm-project/vllm/blob/main/docs/features/lora.md",
        "vllm serve ibm-granite/granite-speech-3.3-2b --max-model-len 2048 --enable-lora "
        '--default_mm_loras \'{"audio":"ibm-granite/granite-speech-3.3-2b"}\' --max-lora-rank 64',
        (REFUSED, "--default-mm-loras"),
    ),
    (
        "https://huggingface.co/HuggingFaceTB/SmolLM3-3B/commit/486a602f60b9b61d727ee978b3747824cb659f4d",
        "vllm serve HuggingFaceTB/SmolLM3-3B --enable-auto-tool-choice --tool-call-parser=hermes",
        (OK, {"tool_call_parser": "hermes"}),
    ),
    (
        "https://huggingface.co/joshuaeric/vllm-tool-calling-guide",
        "python -m vllm.entrypoints.openai.api_server --model NousResearch/Hermes-3-Llama-3.1-70B-FP8 --dtype auto "
        "--quantization compressed-tensors --max-model-len 131072 --enable-auto-tool-choice --tool-call-parser hermes "
        "--gpu-memory-utilization 0.90 --max-num-seqs 4",
        (REFUSED, "quantization='compressed-tensors' is not supported"),
    ),
    (
        "https://github.com/intel/llm-scaler/issues/164",
        "python3 -m vllm.entrypoints.openai.api_server --model /llm/models/DeepSeek-R1-Distill-Qwen-32B "
        "--served-model-name DeepSeek-R1-Distill-Qwen-32B --dtype float16 --enforce-eager --port 8001 --host 0.0.0.0 "
        "--trust-remote-code --disable-sliding-window --gpu-memory-utilization 0.95 --no-enable-prefix-caching "
        "--max-num-batched-tokens 3072 --disable-log-requests --max-model-len 30000 --block-size 64 "
        "--tensor-parallel-size 4",
        (REFUSED, "--disable-sliding-window"),
    ),
    (
        "https://huggingface.co/datasets/forcemultiplier/LLaVA-CoT-30k-jsonl-trainkit/blame/"
        "7dcc4c523867aa744a5215260b7d7b87c1d7c77d/run_qwen2vl.sh",
        'vllm serve ./merged --gpu-memory-utilization=0.8 --port 6002 --served-model-name="VLINSTRUCT" '
        "--trust-remote-code --max-model-len 8192 --disable-log-requests",
        (
            OK,
            {
                "model": "./merged",
                "gpu_memory_utilization": 0.8,
                "port": 6002,
                "served_model_name": ["VLINSTRUCT"],
                "trust_remote_code": True,
                "max_model_len": 8192,
            },
        ),
    ),
    (
        "https://huggingface.co/spaces/PharynxAI/LLM_FinetuneR/commit/e44e2bf152dd60231595276895c156e583da053c",
        "vllm serve hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4 --gpu_memory_utilization=0.99 "
        "--max_model_len=8192 --enable-chunked-prefill=False --num_scheduler_steps=2",
        (REFUSED, "--num-scheduler-steps"),
    ),
    (
        "same as above, without the V0-only --num_scheduler_steps",
        "vllm serve hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4 --gpu_memory_utilization=0.99 "
        "--max_model_len=8192 --enable-chunked-prefill=False",
        (OK, {"gpu_memory_utilization": 0.99, "max_model_len": 8192, "enable_chunked_prefill": False}),
    ),
    (
        f"{DOCS}/v0.6.3.post1/models/spec_decode.html",
        "python -m vllm.entrypoints.openai.api_server --host 0.0.0.0 --port 8000 --model facebook/opt-6.7b "
        "--seed 42 -tp 1 --speculative_model facebook/opt-125m --use-v2-block-manager --num_speculative_tokens 5 "
        "--gpu_memory_utilization 0.8",
        (REFUSED, "--speculative-model"),
    ),
    (
        "https://docs.vllm.ai/projects/speculators/en/stable/user_guide/tutorials/serve_vllm/",
        "vllm serve Qwen/Qwen3-8B -tp 1 --speculative-config "
        '\'{"model": "RedHatAI/Qwen3-8B-speculator.eagle3", "num_speculative_tokens": 3, "method": "eagle3"}\'',
        (REFUSED, "speculative_config method 'eagle3' is not implemented"),
    ),
    (
        f"{DOCS}/latest/features/speculative_decoding/n_gram/ (its LLM(...) arguments as serve flags)",
        'vllm serve Qwen/Qwen3-8B --speculative-config \'{"method": "ngram", "num_speculative_tokens": 5, '
        '"prompt_lookup_max": 4}\'',
        (OK, {"speculative_config": '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}'}),
    ),
    (
        "https://github.com/vllm-project/vllm/blob/v0.9.0/docs/getting_started/installation/cpu.md",
        "VLLM_CPU_KVCACHE_SPACE=40 VLLM_CPU_OMP_THREADS_BIND=0-31|32-63 vllm serve meta-llama/Llama-2-7b-chat-hf "
        "-tp=2 --distributed-executor-backend mp",
        (REFUSED, "VLLM_CPU_OMP_THREADS_BIND"),
    ),
    (
        "https://github.com/vllm-project/vllm/blob/v0.9.0/docs/getting_started/installation/cpu.md (docker -e, "
        "without the core binding)",
        "VLLM_CPU_KVCACHE_SPACE=40 vllm serve --model=meta-llama/Llama-3.2-1B-Instruct --dtype=bfloat16",
        (OK, {"model": "meta-llama/Llama-3.2-1B-Instruct", "dtype": "bfloat16", "kv_cache_memory_gb": 40.0}),
    ),
    (
        f"{CODE} 51999410226 (a README: 'Host vLLM on CPU')",
        "vllm serve Qwen/Qwen2.5-0.5B-Instruct --dtype float16 --max-model-len 8192 --max-num-seqs 1 "
        "--max-num-batched-tokens 8192 --swap-space 0 --enforce-eager --port 8005 --enable-auto-tool-choice "
        "--tool-call-parser hermes --generation-config vllm",
        (OK, {"dtype": "float16", "max_num_seqs": 1, "max_num_batched_tokens": 8192, "port": 8005}),
    ),
    (
        f"{CODE} 165926248",
        "python -m vllm.entrypoints.openai.api_server --model Qwen/Qwen3-8B --host 0.0.0.0 --port 8012 "
        "--max-model-len 32768 --dtype bfloat16 --gpu-memory-utilization 0.85 --reasoning-parser qwen3",
        (REFUSED, "--reasoning-parser"),
    ),
    (
        f"{CODE} 71618833258",
        'python3 -m vllm.entrypoints.openai.api_server --model "cyankiwi/Qwen3.5-4B-AWQ-4bit" --host 0.0.0.0 '
        "--port 8032 --max-model-len 262144 --gpu-memory-utilization 0.62 --max-num-seqs 4 --cpu-offload-gb 0 "
        "--trust-remote-code",
        (OK, {"model": "cyankiwi/Qwen3.5-4B-AWQ-4bit", "max_num_seqs": 4, "gpu_memory_utilization": 0.62}),
    ),
    (
        f"{CODE} 52822215403",
        "vllm serve google/gemma-3-4b-it --enable-lora --max-lora-rank 64 --port 8050 --gpu-memory-utilization 0.30 "
        "--max-model-len 2048",
        (OK, {"enable_lora": True, "max_lora_rank": 64, "port": 8050}),
    ),
    (
        f"{CODE} 66029635168 (its flags, on its model)",
        "vllm serve Qwen/Qwen2.5-1.5B-Instruct-AWQ --quantization awq --dtype half --max-model-len 4096 "
        "--gpu-memory-utilization 0.85 --enable-auto-tool-choice --tool-call-parser hermes",
        (OK, {"quantization": "awq", "dtype": "float16", "max_model_len": 4096}),
    ),
    (
        f"{CODE} 63115967432",
        "vllm serve /data1/models/DeepSeek-V4-Flash --trust-remote-code --tensor-parallel-size 4 --host 127.0.0.1 "
        "--port 8900 --max-model-len 65536 --gpu-memory-utilization 0.90 --max-num-seqs 32 --kv-cache-dtype fp8 "
        "--enforce-eager",
        (REFUSED, "--kv-cache-dtype fp8"),
    ),
    (
        f"{CODE} 59369046101",
        "vllm serve Qwen/Qwen2.5-VL-3B-Instruct --max-model-len 4096 --kv-cache-memory-bytes 2147483648 "
        "--gpu-memory-utilization 0.5 --limit-mm-per-prompt '{\"image\": 1}' --disable-log-requests",
        (REFUSED, "--limit-mm-per-prompt"),
    ),
    (
        f"{CODE} 69421008716 (a model card's text-only deployment)",
        'vllm serve Qwen/Qwen2.5-VL-3B-Instruct --limit-mm-per-prompt \'{"image":0,"video":0}\' '
        "--kv-cache-memory-bytes 1Gi",
        (OK, {"kv_cache_memory_gb": 1.0}),
    ),
    (
        f"{CODE} 56863820406 (docker compose command)",
        "python -m vllm.entrypoints.openai.api_server --model Qwen/Qwen3-30B-A3B-Instruct-2507 --host 0.0.0.0 "
        "--port 8000 --swap-space 2 --tensor-parallel-size 8 --pipeline-parallel-size 2 --gpu-memory-utilization 0.85 "
        "--enable-auto-tool-choice --tool-call-parser xlam",
        (REFUSED, "pipeline_parallel_size=2 is not supported"),
    ),
    (
        f"{CODE} 70173743227 (VLLM_ADDITIONAL_ARGS)",
        "vllm serve meta-llama/Llama-3.1-8B-Instruct --max-model-len=16000 --enable-auto-tool-choice "
        "--tool-call-parser=llama3_json",
        (OK, {"max_model_len": 16000, "tool_call_parser": "llama3_json"}),
    ),
    (
        f"{CODE} 62701703737",
        "vllm serve Qwen/Qwen3-8B --reasoning-parser qwen3 --enable-auto-tool-choice --tool-call-parser qwen3_coder "
        "--generation-config vllm",
        (REFUSED, "--reasoning-parser"),
    ),
    (
        "https://github.com/vllm-project/vllm/blob/main/docs/getting_started/quickstart.md (VLLM_API_KEY)",
        "VLLM_API_KEY=from-env vllm serve Qwen/Qwen2.5-1.5B-Instruct --max-num-seqs 64 --seed 7 --revision main",
        (OK, {"api_key": "from-env", "max_num_seqs": 64, "seed": 7, "revision": "main"}),
    ),
]


def parse_command(line: str, cwd: str | None = None):
    """(engine_args, server options, VllmEnvironment) for a guide's command line, as kvloom would run it."""
    words = shlex.split(line)
    environ = {}
    while "=" in words[0] and not words[0].startswith("-"):
        key, _, value = words.pop(0).partition("=")
        environ[key] = value
    if words[:2] == ["vllm", "serve"]:
        args = build_parser().parse_args(["serve", *normalize_flag_names(words[2:])])
    else:
        assert words[1:3] == ["-m", "vllm.entrypoints.openai.api_server"], line
        args = make_arg_parser().parse_args(normalize_flag_names(words[3:]))
    return serve_config(args, environ)


def _fields(engine_args, server) -> dict:
    out = {**vars(engine_args), **server}
    out["lora_names"] = [lora.lora_name for lora in server["lora_modules"]]
    return out


@pytest.mark.parametrize("source,line,expected", GUIDE_COMMANDS, ids=[f"cmd{i}" for i in range(len(GUIDE_COMMANDS))])
def test_guide_command_line(source, line, expected, tmp_path, monkeypatch, capsys):
    template = tmp_path / "examples" / "tool_chat_template_llama3.1_json.jinja"
    template.parent.mkdir()
    template.write_text("{{ tools }}")
    monkeypatch.chdir(tmp_path)
    outcome, want = expected
    if outcome == OK:
        engine_args, server, _ = parse_command(line)
        got = _fields(engine_args, server)
        assert {k: got[k] for k in want} == want, source
        return
    with pytest.raises((SystemExit, ValueError)) as info:
        parse_command(line)
    message = capsys.readouterr().err if info.type is SystemExit else str(info.value)
    if info.type is SystemExit:
        assert info.value.code == 2
    assert want in message, f"{source}: {message}"


def test_at_least_28_guide_lines_with_both_outcomes():
    outcomes = [expected[0] for _, _, expected in GUIDE_COMMANDS]
    assert len(GUIDE_COMMANDS) >= 28 and outcomes.count(OK) >= 14 and outcomes.count(REFUSED) >= 10


def _serve_args(*flags: str):
    return build_parser().parse_args(["serve", "m", *normalize_flag_names(list(flags))])


def test_speculative_config_and_long_prefill_reach_engine_args():
    engine_args, _, _ = serve_config(
        _serve_args(
            "--speculative-config",
            '{"method": "ngram", "num_speculative_tokens": 4}',
            "--long-prefill-token-threshold",
            "64",
        ),
        {},
    )
    assert engine_args.speculative_config == '{"method": "ngram", "num_speculative_tokens": 4}'
    assert engine_args.long_prefill_token_threshold == 64
    with pytest.raises(ValueError, match="method must be 'ngram'"):
        serve_config(_serve_args("--speculative-config", '{"method": "lookahead", "num_speculative_tokens": 4}'), {})


def test_dtype_spellings_map_to_the_engine_names():
    for flag, engine in [("half", "float16"), ("float", "float32"), ("bfloat16", "bfloat16"), ("auto", "auto")]:
        assert serve_config(_serve_args("--dtype", flag), {})[0].dtype == engine
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--dtype", "float64"])


def test_model_positional_and_option_must_agree():
    assert serve_config(_serve_args("--model", "m"), {})[0].model == "m"
    with pytest.raises(ValueError, match="the model is given twice"):
        serve_config(_serve_args("--model", "other"), {})


def test_flags_win_over_kvloom_env_over_vllm_env():
    env = {"VLLM_API_KEY": "v", "KVLOOM_API_KEY": "k", "VLLM_CPU_KVCACHE_SPACE": "3"}
    engine_args, server, _ = serve_config(_serve_args(), env)
    assert server["api_key"] == "k" and engine_args.kv_cache_memory_gb == 3.0
    engine_args, server, _ = serve_config(_serve_args("--api-key", "f", "--kv-cache-memory-gb", "1.5"), env)
    assert server["api_key"] == "f" and engine_args.kv_cache_memory_gb == 1.5
    _, server, vllm_env = serve_config(_serve_args(), {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_PORT": "1"})
    assert server["allow_runtime_lora_updating"] and vllm_env.not_read == ["VLLM_PORT"]


@pytest.mark.parametrize(
    "environ,needle",
    [
        ({"VLLM_CPU_KVCACHE_SPACE": "lots"}, "VLLM_CPU_KVCACHE_SPACE"),
        ({"VLLM_LOGGING_LEVEL": "LOUD"}, "VLLM_LOGGING_LEVEL"),
        ({"VLLM_USE_MODELSCOPE": "True"}, "VLLM_USE_MODELSCOPE"),
        ({"VLLM_CPU_NUM_OF_RESERVED_CPU": "2"}, "VLLM_CPU_NUM_OF_RESERVED_CPU"),
    ],
)
def test_vllm_env_values_kvloom_cannot_honour_are_refused(environ, needle):
    with pytest.raises(ValueError, match=needle):
        serve_config(_serve_args(), environ)


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype fp8_e4m3"),
        (["--load-format", "dummy"], "--load-format dummy"),
        (["--tokenizer-mode", "mistral"], "--tokenizer-mode mistral"),
        (["--skip-tokenizer-init"], "--skip-tokenizer-init"),
        (["--cpu-offload-gb", "4"], "--cpu-offload-gb 4"),
        (["--enable-lora-bias"], "--enable-lora-bias"),
        (["--response-role", "model"], "--response-role model"),
        (["--max-logprobs", "5"], "--max-logprobs 5"),
        (["--generation-config", "auto"], "--generation-config auto"),
        (["--return-tokens-as-token-ids"], "--return-tokens-as-token-ids"),
        (["--enable-expert-parallel"], "--enable-expert-parallel"),
    ],
)
def test_behaviour_changing_values_are_refused_naming_the_flag(flags, needle, capsys):
    with pytest.raises(SystemExit) as info:
        _serve_args(*flags)
    assert info.value.code == 2 and needle in capsys.readouterr().err


def test_engine_args_refuse_behaviour_changing_vllm_values():
    from kvloom.engine.arg_utils import EngineArgs

    assert EngineArgs.from_kwargs(kv_cache_dtype="auto", load_format="safetensors", cpu_offload_gb=0).dtype == "auto"
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' is not supported"):
        EngineArgs.from_kwargs(kv_cache_dtype="fp8")
    assert EngineArgs.from_kwargs(dtype="half").dtype == "float16"


def test_help_lists_vllm_flags_on_both_entry_points():
    serve_help = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    module_help = make_arg_parser().format_help()
    for flag in ("--model", "--gpu-memory-utilization", "--chat-template", "--enable-chunked-prefill", "--root-path"):
        assert flag in serve_help and flag in module_help
    assert "vLLM flags kvloom refuses" in serve_help


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(url: str, key: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_module_entry_point_serves_with_vllm_flags_env_and_metric_names(tiny_llama, tmp_path):
    """One real start: `python -m kvloom.entrypoints.openai.api_server` with vLLM flags and VLLM_API_KEY."""
    port, key = _free_port(), "sk-vllm-env"
    drop = ("KVLOOM_API_KEY", "KVLOOM_CONFIGURE_LOGGING", "KVLOOM_LOGGING_LEVEL")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(VLLM_API_KEY=key, VLLM_CPU_KVCACHE_SPACE="0.05", VLLM_LOGGING_LEVEL="WARNING", VLLM_PORT="9")
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    cmd = [
        sys.executable, "-m", "kvloom.entrypoints.openai.api_server", "--model", tiny_llama,
        "--served-model-name", "tiny", "--port", str(port), "--dtype", "float", "--gpu-memory-utilization", "0.5",
        "--trust-remote-code", "--enable-chunked-prefill", "--max_num_seqs", "8", "--disable-log-requests",
        "--chat-template", template, "--distributed-executor-backend", "uni", "--root-path", "/proxy",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not become healthy"
            time.sleep(0.2)
        assert httpx.get(f"{url}/v1/models").status_code == 401  # VLLM_API_KEY guards the API
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key)
        before = _metrics(url, key)
        labels = (("engine", "0"), ("model_name", "tiny"))
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
        done = client.completions.create(model="tiny", prompt="Hello there", max_tokens=5, temperature=0)
        assert chat.usage.completion_tokens == 4 and done.usage.completion_tokens == 5
        # --chat-template replaced the model's: the prompt is exactly the template's rendering.
        auth = {"Authorization": f"Bearer {key}"}
        messages = [{"role": "user", "content": "hi"}]
        by_template = httpx.post(f"{url}/tokenize", json={"model": "tiny", "messages": messages}, headers=auth).json()
        text = {"model": "tiny", "prompt": "<user>hi\n<assistant>", "add_special_tokens": False}
        assert by_template["tokens"] == httpx.post(f"{url}/tokenize", json=text, headers=auth).json()["tokens"]
        assert by_template["count"] == chat.usage.prompt_tokens
        after = _metrics(url, key)
        generated = after[("vllm:generation_tokens_total", labels)] - before[("vllm:generation_tokens_total", labels)]
        assert generated == 9
        assert after[("vllm:prompt_tokens_total", labels)] - before[("vllm:prompt_tokens_total", labels)] == (
            chat.usage.prompt_tokens + done.usage.prompt_tokens
        )
        success = ("vllm:request_success_total", (*labels[:1], ("finished_reason", "length"), *labels[1:]))
        assert after[success] - before.get(success, 0.0) == 2
        assert after[("vllm:time_to_first_token_seconds_count", labels)] == 2
        assert after[("vllm:e2e_request_latency_seconds_count", labels)] == 2
        assert after[("vllm:time_per_output_token_seconds_count", labels)] == 2
        assert after[("vllm:num_requests_running", labels)] == 0
        assert after[("vllm:kv_cache_usage_perc", labels)] == after[("vllm:gpu_cache_usage_perc", labels)]
        assert after[("vllm:prefix_cache_queries_total", labels)] >= after[("vllm:prefix_cache_hits_total", labels)]
        names = {name for name, _ in after}
        for name in ("num_requests_waiting", "num_preemptions_total", "spec_decode_num_draft_tokens_total"):
            assert f"vllm:{name}" in names
        cache_info = [k for k in after if k[0] == "vllm:cache_config_info"]
        assert len(cache_info) == 1 and ("block_size", "16") in cache_info[0][1]
        # kvloom's own names stay beside vLLM's, with the same figures.
        assert (
            after[("kvloom:generation_tokens_total", (("model_name", "tiny"),))]
            == after[("vllm:generation_tokens_total", labels)]
        )
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    # VLLM_LOGGING_LEVEL=WARNING: no INFO lines, but the warning about the vLLM variable kvloom does not read.
    assert "INFO" not in out and "VLLM_PORT" in out, out


def test_lora_requests_info_names_the_running_adapter(tiny_llama, tmp_path):
    """vllm:lora_requests_info on a real LoRA engine: max_lora, and the adapter while its request decodes."""
    from kvloom import AsyncLLM, LoRARequest, SamplingParams
    from kvloom.integrations.openai.metrics import ServerMetrics

    from kvloom_testing import build_peft_adapter

    adapter = build_peft_adapter(tiny_llama, str(tmp_path / "sql"), r=4, targets=("q_proj",), seed=3)
    engine = AsyncLLM(model=tiny_llama, enable_lora=True, max_loras=2, num_gpu_blocks_override=64, max_model_len=256)
    try:
        lora = LoRARequest("sql", 1, adapter)
        engine.add_lora(lora)
        metrics = ServerMetrics(engine, "tiny")

        def lora_info() -> dict:
            text = metrics.render()[0].decode()
            (sample,) = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name.endswith("info")
                         and "max_lora" in s.labels]  # fmt: skip
            return sample.labels

        assert lora_info() == {"max_lora": "2", "waiting_lora_adapters": "", "running_lora_adapters": ""}
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        stream = engine.stream("Hello", params, request_id="lora-info", lora_request=lora)
        next(stream)  # the request is decoding now
        assert lora_info()["running_lora_adapters"] == "sql"
        engine.abort("lora-info")
    finally:
        engine.shutdown()


def test_several_api_keys_each_open_the_api():
    """vLLM's `--api-key K1 K2` (key rotation): the server accepts any of them."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from kvloom.integrations.openai.middleware import GuardMiddleware

    _, server, _ = serve_config(_serve_args("--api-key", "k1", "k2"), {})
    assert server["api_key"] == ["k1", "k2"]
    app = Starlette(routes=[Route("/v1/models", lambda request: PlainTextResponse("ok"))])
    app.add_middleware(GuardMiddleware, api_key=server["api_key"], max_body_bytes=1024)
    http = TestClient(app)
    for key, status in (("k1", 200), ("k2", 200), ("k3", 401)):
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == status
    assert http.get("/v1/models").status_code == 401
