"""Tensor parallelism on CPU: 2 worker processes over gloo give exactly the tokens of one process.

The reference is TP=1 (itself equal to transformers, tests/engine/test_parity.py) and, with LoRA,
transformers + PEFT. Each TP engine costs a few seconds of worker start-up, so each test builds one
and checks several things on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import torch

import kvloom
from kvloom import LLM, AsyncLLM, LoRARequest, SamplingParams
from kvloom.async_llm import EngineDeadError

from kvloom_testing import assert_all_blocks_free, build_peft_adapter, build_tiny_model, peft_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PREFIX = [11, 22, 33, 44, 55, 66, 77, 88, 99, 110, 121, 132, 143, 154, 165, 176, 187]
# Shared prefixes (prefix caching), long prompts (chunked prefill at a 16-token budget) and more
# KV than the cache holds (preemption).
PROMPTS = [PREFIX + [200 + i] * (3 + 5 * i) for i in range(6)] + [[5, 6, 7], PREFIX[:9]]
ENGINE = dict(num_gpu_blocks_override=12, max_num_batched_tokens=16, seed=0)


@pytest.fixture(scope="module")
def tied_odd_vocab_qwen2(tmp_path_factory) -> str:
    """Qwen2 (q/k/v biases) with tied embeddings and a vocabulary that does not divide by 2."""
    return build_tiny_model(
        str(tmp_path_factory.mktemp("qwen2_tied")), "qwen2", seed=4, vocab_size=515, tie_word_embeddings=True
    )


@pytest.fixture(scope="module")
def one_kv_head_llama(tmp_path_factory) -> str:
    """One KV head for 2 ranks: each rank holds a replica of it."""
    return build_tiny_model(str(tmp_path_factory.mktemp("llama_kv1")), seed=5, num_key_value_heads=1)


def _tokens(llm: LLM, prompts=PROMPTS, params=GREEDY, **kwargs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False, **kwargs)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers(llm_or_engine) -> list:
    engine = getattr(llm_or_engine, "llm_engine", None) or llm_or_engine.engine
    return list(engine.executor.procs)


@pytest.mark.parametrize("model", ["tiny_llama", "tied_odd_vocab_qwen2", "one_kv_head_llama"])
def test_tp2_greedy_equals_tp1(model, request):
    path = request.getfixturevalue(model)
    one = LLM(path, **ENGINE)
    expected = _tokens(one)
    scored = SamplingParams(temperature=0.0, max_tokens=4, logprobs=2, prompt_logprobs=2)
    expected_scores = one.generate(PROMPTS[:3], scored, use_tqdm=False)
    one.shutdown()
    two = LLM(path, tensor_parallel_size=2, **ENGINE)
    procs = _workers(two)
    try:
        assert len(procs) == 2 and all(p.is_alive() for p in procs)
        assert _tokens(two) == expected
        # Prompt log-probabilities over chunked prefills: every rank gathers the same logits.
        for got, want in zip(two.generate(PROMPTS[:3], scored, use_tqdm=False), expected_scores):
            assert len(got.prompt_logprobs) == len(want.prompt_logprobs) == len(got.prompt_token_ids)
            for g, w in zip(
                got.prompt_logprobs[1:] + got.outputs[0].logprobs, want.prompt_logprobs[1:] + want.outputs[0].logprobs
            ):
                assert g.keys() == w.keys()
                assert all(abs(g[t].logprob - w[t].logprob) < 1e-4 for t in g)
        metrics = two.get_metrics()
        assert metrics["num_preemptions"] > 0, "the workload was meant to preempt"
        assert metrics["prefix_cache_hits"] > 0, "the workload was meant to hit the prefix cache"
        # Seeded sampling draws on rank 0 only, so it matches too.
        sampled = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=8, seed=7)
        assert _tokens(two, PROMPTS[:3], sampled) == _tokens(LLM(path, **ENGINE), PROMPTS[:3], sampled)
        assert_all_blocks_free(two.llm_engine)
        executor = two.llm_engine.executor
        assert executor.num_steps > 0 and executor.overhead_seconds / executor.num_steps < 0.05
    finally:
        two.shutdown()
    assert not any(p.is_alive() for p in procs)


def test_tp2_bfloat16_mode_equals_tp1(tied_odd_vocab_qwen2):
    # The CPU bfloat16 mode on each rank (bfloat16 panels of its shard, bfloat16 KV cache of its heads):
    # the same tokens as one process in the same mode. (Skipped without the AVX2 build, where bfloat16
    # is the whole model in bfloat16 on torch's ops.)
    from kvloom.kernels.cpu_ops import load_cpu_ops

    ops = load_cpu_ops()
    if ops is None or not ops.packed_linear_available():
        pytest.skip("the CPU bfloat16 mode needs the AVX2 build")
    one = LLM(tied_odd_vocab_qwen2, dtype="bfloat16", **ENGINE)
    assert one.llm_engine.config_info()["activation_dtype"] == "float32"
    assert one.llm_engine.executor.worker.runner.kv_caches[0][0].dtype == torch.bfloat16
    expected = _tokens(one)
    one_block_bytes = one.llm_engine.executor.kv_bytes_per_block()
    one.shutdown()
    two = LLM(tied_odd_vocab_qwen2, dtype="bfloat16", tensor_parallel_size=2, **ENGINE)
    try:
        # Each rank holds half the KV heads in bfloat16 (a float32 rank would report one's bytes).
        assert two.llm_engine.executor.kv_bytes_per_block() * 2 == one_block_bytes
        assert _tokens(two) == expected
        assert_all_blocks_free(two.llm_engine)
    finally:
        two.shutdown()


def test_tp2_lora_equals_peft(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_adapters")
    all_dir = build_peft_adapter(tiny_llama, str(root / "all"), r=8, alpha=16, seed=1)
    mlp_dir = build_peft_adapter(
        tiny_llama, str(root / "mlp"), r=16, alpha=8, targets=("o_proj", "gate_proj", "up_proj", "down_proj"), seed=3
    )
    reqs = {"all": LoRARequest("all", 1, all_dir), "mlp": LoRARequest("mlp", 2, mlp_dir)}
    dirs = {"all": all_dir, "mlp": mlp_dir, None: None}
    names = [None, "all", "mlp", "all", "mlp", None]
    prompts = [[7 + i, 40 + 3 * i, 90, 120 + i, 300 - i] * (1 + i % 3) for i in range(len(names))]
    llm = LLM(tiny_llama, tensor_parallel_size=2, enable_lora=True, max_loras=2, max_lora_rank=16, seed=0)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        got = _tokens(llm, prompts, params, lora_request=[reqs.get(n) for n in names])
        want = [peft_greedy(tiny_llama, dirs[n], p, 10) for n, p in zip(names, prompts)]
        assert got == want
        assert got[1] != _tokens(llm, [prompts[1]], params)[0], "the adapter must change the output"
        assert llm.llm_engine.lora_manager.num_pinned == 0
        assert_all_blocks_free(llm.llm_engine)
    finally:
        llm.shutdown()


def test_tp2_async_engine_server_and_chat_model(tiny_llama):
    from kvloom.integrations.langchain import ChatVLLM

    one = LLM(tiny_llama, max_model_len=256)
    prompt = [{"role": "user", "content": "Hello world! What is the capital of France?"}]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    expected = one.chat(prompt, params, use_tqdm=False)[0].outputs[0].text
    one.shutdown()

    # The adapter's own tensor_parallel_size field builds the shared TP engine the others then use.
    chat = ChatVLLM(
        model=tiny_llama, tensor_parallel_size=2, max_new_tokens=12, temperature=0.0, vllm_kwargs={"max_model_len": 256}
    )
    engine = chat.engine_client
    try:
        assert engine.engine.executor.tp_size == 2
        assert chat.invoke(prompt[0]["content"]).content == expected
        ids = engine.apply_chat_template(prompt)

        async def stream() -> str:
            text = ""
            async for out in engine.generate(ids, params.clone(output_kind=kvloom.RequestOutputKind.DELTA)):
                text += out.outputs[0].text
            return text

        assert asyncio.run(stream()) == expected
        with kvloom.serve(engine, served_model_name="tiny") as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="unused")
            reply = client.chat.completions.create(model="tiny", messages=prompt, max_tokens=12, temperature=0)
            assert reply.choices[0].message.content == expected
    finally:
        kvloom.shutdown_engines()


_TORCHRUN_SCRIPT = """
import json, sys
from kvloom import LLM, SamplingParams
import torch.distributed as dist

llm = LLM(sys.argv[1], tensor_parallel_size=2, distributed_executor_backend="external_launcher",
          num_gpu_blocks_override=12, max_num_batched_tokens=16, seed=0)
prompts = json.loads(sys.argv[2])
outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
tokens = [list(o.outputs[0].token_ids) for o in outs]
with open(f"{sys.argv[3]}.{dist.get_rank()}", "w") as f:
    json.dump(tokens, f)
"""


def test_torchrun_external_launcher(tiny_llama, tmp_path):
    one = LLM(tiny_llama, **ENGINE)
    expected = _tokens(one)
    one.shutdown()
    script = tmp_path / "tp_script.py"
    script.write_text(_TORCHRUN_SCRIPT)
    out = tmp_path / "tokens"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "KVLOOM_CONFIGURE_LOGGING": "0"}
    failures = []
    # Two tries: the launcher's rendezvous port is picked free but can be taken before it binds.
    for _ in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
        cmd += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
        proc = subprocess.run(
            [*cmd, str(script), tiny_llama, json.dumps(PROMPTS), str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        if proc.returncode == 0:
            break
        failures.append(proc.stdout[-2000:] + proc.stderr[-4000:])
    assert proc.returncode == 0, "\n----\n".join(failures)
    for rank in (0, 1):
        assert json.loads(Path(f"{out}.{rank}").read_text()) == expected


def test_killed_worker_fails_requests_quickly_and_leaves_no_process(tiny_llama):
    engine = AsyncLLM(model=tiny_llama, tensor_parallel_size=2, max_model_len=512)
    procs = _workers(engine)
    rendezvous = engine.engine.executor._rendezvous
    params = SamplingParams(temperature=0.0, max_tokens=480, ignore_eos=True)
    stream = engine.stream([5, 6, 7], params)
    next(stream)
    os.kill(procs[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(EngineDeadError, match="rank 1"):
        for _ in stream:
            pass
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 10
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(p.is_alive() for p in procs), "no worker process may outlive the engine"
    assert not Path(rendezvous).exists()
    with pytest.raises(EngineDeadError):
        next(engine.stream([5, 6, 7], params))
    engine.shutdown()


def test_bad_parallel_settings_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        LLM(tiny_llama, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="data_parallel_size"):
        LLM(tiny_llama, data_parallel_size=2)
    with pytest.raises(ValueError, match="data_parallel_size_local"):
        LLM(tiny_llama, data_parallel_size_local=2)
    with pytest.raises(ValueError, match="worker_use_ray"):
        LLM(tiny_llama, worker_use_ray=True)
    with pytest.raises(ValueError, match="enable_expert_parallel"):
        LLM(tiny_llama, enable_expert_parallel=True)
    # Their single-process values are vLLM's defaults and run as usual.
    llm = LLM(tiny_llama, pipeline_parallel_size=1, data_parallel_size_local=1, worker_use_ray=False)
    assert llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    llm.shutdown()
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        LLM(tiny_llama, tensor_parallel_size=2, distributed_executor_backend="ray")
    with pytest.raises(ValueError, match="external_launcher"):
        LLM(tiny_llama, tensor_parallel_size=2, distributed_executor_backend="external_launcher")
    # 4 attention heads do not split over 3 ranks: the workers say so, and are stopped.
    with pytest.raises(ValueError, match="num_attention_heads"):
        LLM(tiny_llama, tensor_parallel_size=3)
