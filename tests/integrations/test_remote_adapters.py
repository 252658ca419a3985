"""The adapters pointed at a running `kvloom serve` (base_url + api_key) behave as on the in-process engine."""

from __future__ import annotations

import asyncio
import http.server
import threading

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

import kvloom  # noqa: E402
from kvloom.integrations.langchain import VLLM, ChatVLLM  # noqa: E402
from kvloom.integrations.llama_index import Vllm  # noqa: E402
from kvloom.integrations.remote import RemoteError  # noqa: E402

from kvloom_testing import assert_all_blocks_free, wait_idle  # noqa: E402

ENGINE_ARGS = {"num_gpu_blocks_override": 256, "max_model_len": 2048}
KEY = "sekret"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "pick",
            "parameters": {"type": "object", "properties": {"x": {"enum": ["a", "b", "c"]}}, "required": ["x"]},
        },
    }
]


@pytest.fixture(scope="module")
def engine(tiny_tools):
    eng = kvloom.get_engine(tiny_tools, **ENGINE_ARGS)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with kvloom.serve(engine, served_model_name="tiny", api_key=KEY) as handle:
        yield handle


@pytest.fixture(autouse=True)
def _blocks_free_after(engine):
    yield
    wait_idle(engine.engine)
    assert_all_blocks_free(engine.engine)


def pair(cls, tiny_tools, server, **fields):
    local = cls(model=tiny_tools, vllm_kwargs=ENGINE_ARGS, **fields)
    remote = cls(base_url=server.base_url, api_key=KEY, **fields)
    return local, remote


GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}


def test_chat_model_invoke_stream_batch_and_async_match(tiny_tools, server):
    local, remote = pair(ChatVLLM, tiny_tools, server, **GREEDY)
    assert remote.invoke("Hello").content == local.invoke("Hello").content
    assert remote.invoke("Hello").usage_metadata == local.invoke("Hello").usage_metadata
    assert "".join(c.content for c in remote.stream("Hello")) == local.invoke("Hello").content
    assert [m.content for m in remote.batch(["a", "b"])] == [m.content for m in local.batch(["a", "b"])]

    async def both():
        return (await remote.ainvoke("Hi")).content, [c.content async for c in remote.astream("Hi")]

    text, pieces = asyncio.run(both())
    assert text == "".join(pieces) == local.invoke("Hi").content
    assert remote.engine_client.model_name == "tiny"


def test_tools_and_structured_output_go_through_the_server(tiny_tools, server):
    local, remote = pair(ChatVLLM, tiny_tools, server, temperature=0, max_new_tokens=200)
    calls = [m.bind_tools(TOOLS, tool_choice="any").invoke("Pick one").tool_calls for m in (local, remote)]
    assert [(c["name"], c["args"]) for c in calls[0]] == [(c["name"], c["args"]) for c in calls[1]]
    streamed = list(remote.bind_tools(TOOLS, tool_choice="pick").stream("Pick one"))
    full = streamed[0]
    for chunk in streamed[1:]:
        full = full + chunk
    assert full.tool_calls[0]["name"] == "pick" and full.tool_calls[0]["args"]["x"] in "abc"
    schema = {"title": "Answer", "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    assert isinstance(remote.with_structured_output(schema).invoke("ok?")["ok"], bool)


def test_text_llm_logprobs_and_llamaindex_match(tiny_tools, server):
    local, remote = pair(VLLM, tiny_tools, server, logprobs=2, **GREEDY)
    lg, rg = local.generate(["Hi"]).generations[0][0], remote.generate(["Hi"]).generations[0][0]
    assert rg.text == lg.text
    assert [p["token"] for p in rg.generation_info["logprobs"]] == [p["token"] for p in lg.generation_info["logprobs"]]
    assert [round(p["logprob"], 4) for p in rg.generation_info["logprobs"]] == [
        round(p["logprob"], 4) for p in lg.generation_info["logprobs"]
    ]
    li_local, li_remote = pair(Vllm, tiny_tools, server, **GREEDY)
    assert li_remote.complete("Hi").text == li_local.complete("Hi").text
    assert li_remote.metadata.context_window == 2048 and li_remote.metadata.is_function_calling_model
    response = li_remote.chat_with_tools([], user_msg="x")
    assert response.message.content == li_local.chat_with_tools([], user_msg="x").message.content


def test_timeout_errors_and_local_only_fields(tiny_tools, server):
    slow = ChatVLLM(base_url=server.base_url, api_key=KEY, max_new_tokens=1500, ignore_eos=True, timeout=0.3)
    with pytest.raises(TimeoutError):
        list(slow.stream("Write forever"))
    with pytest.raises(ValueError, match="maximum context length"):
        ChatVLLM(base_url=server.base_url, api_key=KEY, max_new_tokens=5000).invoke("x")
    with pytest.raises(RemoteError, match="401"):
        ChatVLLM(base_url=server.base_url, api_key="wrong").invoke("x")
    with pytest.raises(ValueError, match="vllm_kwargs"):
        ChatVLLM(base_url=server.base_url, vllm_kwargs={"max_model_len": 64})
    with pytest.raises(ValueError, match="base_url"):
        ChatVLLM(api_key="x")


def test_transient_failures_are_retried_max_retries_times():
    hits = []

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        chat = ChatVLLM(base_url=f"http://127.0.0.1:{httpd.server_port}/v1", max_retries=2)
        with pytest.raises(RemoteError, match="503"):
            chat.invoke("x")
        assert len(hits) == 3
    finally:
        httpd.shutdown()
