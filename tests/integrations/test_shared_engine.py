"""One engine per configuration: LangChain, LlamaIndex and the in-process server share it and batch together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

import openai  # noqa: E402

import kvloom  # noqa: E402
import kvloom.integrations.openai.server  # noqa: E402, F401 (imported before measuring memory)
from kvloom import LoRARequest  # noqa: E402
from kvloom.bench.lora import make_random_adapter  # noqa: E402
from kvloom.integrations.langchain import VLLM, ChatVLLM  # noqa: E402
from kvloom.integrations.llama_index import Vllm  # noqa: E402

from kvloom_testing import assert_all_blocks_free, build_tiny_model, record_steps, wait_idle  # noqa: E402

ENGINE_ARGS = {
    "num_gpu_blocks_override": 64,
    "max_model_len": 256,
    "enable_lora": True,
    "max_loras": 2,
    "max_lora_rank": 8,
}
N = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A random model big enough (about 80 MB of float32 weights) that a second copy would show in RSS."""
    path = str(tmp_path_factory.mktemp("shared-model"))
    return build_tiny_model(
        path, hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4
    )


@pytest.fixture(scope="module")
def shared(model_dir, tmp_path_factory):
    """The four front ends, created one after the other with the same model and engine arguments."""
    langchain_llm = VLLM(model=model_dir, temperature=0, max_new_tokens=N, ignore_eos=True, vllm_kwargs=ENGINE_ARGS)
    assert langchain_llm.invoke("warm up", max_tokens=2)  # loads the engine and runs it once
    chat = ChatVLLM(model=model_dir, temperature=0, max_new_tokens=N, ignore_eos=True, vllm_kwargs=ENGINE_ARGS)
    index_llm = Vllm(model=model_dir, temperature=0, max_new_tokens=N, ignore_eos=True, vllm_kwargs=ENGINE_ARGS)
    server = kvloom.serve(model_dir, served_model_name="base", **ENGINE_ARGS)
    assert chat.invoke("warm up", max_tokens=2).content is not None
    assert index_llm.complete("warm up", max_tokens=2).text is not None
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    assert client.completions.create(model="base", prompt="warm up", max_tokens=2).choices
    yield {
        "lc": langchain_llm,
        "chat": chat,
        "li": index_llm,
        "server": server,
        "client": client,
        "adapters": Path(tmp_path_factory.mktemp("shared-adapters")),
    }
    server.stop()
    langchain_llm.engine_client.shutdown()


def test_one_engine_object(shared, model_dir):
    engine = shared["lc"].engine_client
    assert shared["chat"].engine_client is engine
    assert shared["li"].engine_client is engine
    assert kvloom.get_engine(model_dir, **ENGINE_ARGS) is engine  # what serve() used
    with record_steps(engine.engine) as steps:
        shared["client"].completions.create(model="base", prompt="hello", max_tokens=3)
    assert steps and all(rid.startswith("cmpl-") for step in steps for rid in step)  # served by this engine


# Run in a fresh interpreter: in this one, memory freed by earlier tests (building the model, say)
# is reused by the engine without showing up as RSS growth.
RSS_SCRIPT = """
import gc, json, sys
import openai, psutil
import kvloom, kvloom.integrations.openai.server
from kvloom.integrations.langchain import VLLM, ChatVLLM
from kvloom.integrations.llama_index import Vllm

model_dir, args = sys.argv[1], json.loads(sys.argv[2])
process = psutil.Process()

def rss():
    gc.collect()
    return process.memory_info().rss

# The openai client builds its resources and response models on first use (~15 MB with openai 2.x):
# pay that before the baseline, so that only engine memory is measured.
warm = openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key="x", max_retries=0)
try:
    warm.completions.create(model="m", prompt="hi", max_tokens=2)
except openai.APIConnectionError:
    pass
fields = dict(model=model_dir, max_new_tokens=2, vllm_kwargs=args)
sizes = [rss()]
lc = VLLM(**fields)
lc.invoke("warm up")
sizes.append(rss())
chat, li = ChatVLLM(**fields), Vllm(**fields)
chat.invoke("warm up")
li.complete("warm up")
server = kvloom.serve(model_dir, **args)
openai.OpenAI(base_url=server.base_url, api_key="x").completions.create(model=model_dir, prompt="hi", max_tokens=2)
sizes.append(rss())
engine = lc.engine_client
same = chat.engine_client is engine and li.engine_client is engine and kvloom.get_engine(model_dir, **args) is engine
# The control: an engine with other arguments is a second copy, and the measurement must see it.
kvloom.get_engine(model_dir, **{**args, "seed": 1}).get_tokenizer()
sizes.append(rss())
model_bytes = sum(p.numel() * p.element_size() for p in engine.engine.executor.worker.runner.model.parameters())
server.stop()
print(json.dumps({"rss": sizes, "model_bytes": model_bytes, "same": same}))
"""


def test_resident_memory_holds_one_model_copy(model_dir):
    env = {**os.environ, "KVLOOM_CONFIGURE_LOGGING": "0"}
    run = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, model_dir, json.dumps(ENGINE_ARGS)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    before, first, rest, second_engine = report["rss"]
    model_bytes = report["model_bytes"]
    assert report["same"]
    assert first - before > 0.5 * model_bytes  # the first front end loads the one copy...
    assert rest - first < 0.25 * model_bytes  # ...the other three add none...
    assert second_engine - rest > 0.5 * model_bytes  # ...while another configuration would add one


def test_requests_from_two_adapters_share_engine_steps(shared, model_dir):
    engine = shared["lc"].engine_client
    root = shared["adapters"]
    for i, name in enumerate(("sql", "poet"), 1):
        if engine.get_lora_request(name) is None:
            path = make_random_adapter(model_dir, root / name, rank=8, seed=i)
            engine.add_lora(LoRARequest(name, i, path))
    results: dict[str, object] = {}
    start = threading.Barrier(3)

    def run(key, call):
        start.wait()
        results[key] = call()

    calls = {
        "langchain": lambda: shared["chat"].invoke("Write a poem", lora="sql"),
        "llamaindex": lambda: shared["li"].complete("Write a query", lora="poet"),
        "server": lambda: shared["client"].completions.create(model="base", prompt="Hello", max_tokens=N),
    }
    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    # The first steps run slowly, so that all three requests are in the engine before any finishes.
    slow_start = lambda i: time.sleep(0.01) if i < 50 else None
    with record_steps(engine.engine, hold=slow_start) as steps:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert results["langchain"].usage_metadata["output_tokens"] == N
    assert results["llamaindex"].additional_kwargs["completion_tokens"] == N
    assert results["server"].usage.completion_tokens == N
    sources = {"langchain-": "langchain", "llamaindex-": "llamaindex", "cmpl-": "server"}

    def kinds(step):
        return {kind for rid in step for prefix, kind in sources.items() if rid.startswith(prefix)}

    joint = [step for step in steps if kinds(step) == {"langchain", "llamaindex", "server"}]
    assert joint, "no step computed the three front ends' requests together"
    sql, poet = engine.get_lora_request("sql").lora_int_id, engine.get_lora_request("poet").lora_int_id
    assert any(set(step.values()) == {0, sql, poet} for step in joint)  # base and two adapters in one step
    wait_idle(engine.engine)
    assert_all_blocks_free(engine.engine)


def test_front_ends_built_on_an_existing_llm(tiny_llama):
    offline = kvloom.LLM(tiny_llama, num_gpu_blocks_override=32, max_model_len=128)
    try:
        llm, index_llm = VLLM(llm=offline, max_new_tokens=4), Vllm(llm=offline, max_new_tokens=4)
        assert llm.engine_client is index_llm.engine_client is offline.engine_client
        with kvloom.serve(offline) as server:
            with record_steps(offline.llm_engine) as steps:
                openai.OpenAI(base_url=server.base_url, api_key="x").completions.create(
                    model=offline.engine_client.model_name, prompt="hi", max_tokens=2
                )
                index_llm.complete("hi")
        assert {rid.split("-")[0] for step in steps for rid in step} == {"cmpl", "llamaindex"}
    finally:
        offline.engine_client.shutdown()
