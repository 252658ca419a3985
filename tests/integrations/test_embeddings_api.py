"""/v1/embeddings on a live server (127.0.0.1) through the official openai client and raw HTTP."""

from __future__ import annotations

import base64
import json
import shutil

import httpx
import numpy as np
import openai
import pytest

import kvloom
from kvloom import AsyncLLM, PoolingParams

from kvloom_testing import assert_all_blocks_free, served_openai_fixtures, wait_idle

MODEL = "tiny-embed"


@pytest.fixture(scope="module")
def mrl_model(tiny_bert_st, tmp_path_factory) -> str:
    """The tiny BERT marked as a Matryoshka model, so `dimensions` is allowed."""
    path = tmp_path_factory.mktemp("mrl") / "st"
    shutil.copytree(tiny_bert_st, path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"is_matryoshka": True}))
    return str(path)


@pytest.fixture(scope="module")
def engine(mrl_model):
    eng = AsyncLLM(model=mrl_model, runner="pooling")
    yield eng
    eng.shutdown()


server, client = served_openai_fixtures(MODEL, max_retries=0)


def reference(engine: AsyncLLM, prompt, **params) -> np.ndarray:
    *_, out = engine.stream(prompt, PoolingParams(**params))
    return out.outputs.data.numpy()


def test_float_and_base64_match_the_engine(client, engine):
    texts = ["the quick brown fox", "paris is the capital of france"]
    # The openai client asks for base64 unless told otherwise, and decodes it with numpy.
    b64 = client.embeddings.create(model=MODEL, input=texts, user="someone")
    flt = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert b64.object == "list" and b64.model == MODEL and [d.index for d in b64.data] == [0, 1]
    for text, a, b in zip(texts, b64.data, flt.data):
        ref = reference(engine, text)
        np.testing.assert_allclose(a.embedding, ref, atol=1e-6)
        np.testing.assert_allclose(b.embedding, ref, atol=1e-6)
    num_tokens = sum(len(engine.get_tokenizer().encode(t)) for t in texts)
    assert b64.usage.prompt_tokens == b64.usage.total_tokens == num_tokens
    raw = httpx.post(f"{client.base_url}embeddings", json={"input": "paris", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, reference(engine, "paris"), atol=1e-6)


def test_token_ids_and_dimensions(client, engine):
    ids = engine.get_tokenizer().encode("hello world")
    one = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    many = client.embeddings.create(model=MODEL, input=[ids, ids[:3]], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, reference(engine, ids), atol=1e-6)
    np.testing.assert_allclose(many.data[1].embedding, reference(engine, ids[:3]), atol=1e-6)
    assert many.usage.prompt_tokens == len(ids) + 3
    short = client.embeddings.create(model=MODEL, input="hello world", dimensions=8)
    assert len(short.data[0].embedding) == 8
    np.testing.assert_allclose(short.data[0].embedding, reference(engine, "hello world", dimensions=8), atol=1e-6)
    assert abs(np.linalg.norm(short.data[0].embedding) - 1) < 1e-5  # truncated, then re-normalized


@pytest.mark.parametrize(
    "body, match",
    [
        ({"input": "the quick brown fox " * 40}, "max_model_len"),
        ({"input": "hello", "dimensions": 0}, "dimensions must be between 1"),
        ({"input": "hello", "dimensions": 1000}, "dimensions must be between 1"),
        ({"input": []}, "must not be empty"),
        ({"input": ""}, "must not be empty"),
        ({"input": [[1, 2], [10**9]]}, "token ids must be in"),
        ({"input": "hello", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "hello", "instructions": "x"}, "unsupported field"),
        ({"input": "hello", "model": "nope"}, "does not exist"),
    ],
)
def test_bad_requests_are_400_and_the_server_keeps_serving(server, engine, body, match):
    r = httpx.post(f"{server.base_url}/embeddings", json=body)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert match in err["message"] and set(err) == {"message", "type", "param", "code"}
    ok = httpx.post(f"{server.base_url}/embeddings", json={"input": "still serving"})
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 32
    wait_idle(engine.engine)
    assert_all_blocks_free(engine.engine)


def test_dimensions_refused_for_a_model_without_matryoshka(tiny_bert_st):
    engine = AsyncLLM(model=tiny_bert_st, runner="pooling")
    try:
        with kvloom.serve(engine, served_model_name="plain") as handle:
            plain = openai.OpenAI(base_url=handle.base_url, api_key="unused", max_retries=0)
            with pytest.raises(openai.BadRequestError, match='Model "plain" does not support matryoshka'):
                plain.embeddings.create(model="plain", input="hello", dimensions=8)
            assert len(plain.embeddings.create(model="plain", input="hello").data[0].embedding) == 32
    finally:
        engine.shutdown()


def test_generation_routes_refused_by_an_embedding_server(client):
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        client.completions.create(model=MODEL, prompt="hi")


def test_generate_model_server_refuses_embeddings(tiny_llama):
    engine = AsyncLLM(model=tiny_llama, num_gpu_blocks_override=32, max_model_len=128)
    try:
        with kvloom.serve(engine, served_model_name="gen") as handle:
            gen = openai.OpenAI(base_url=handle.base_url, api_key="unused", max_retries=0)
            with pytest.raises(openai.BadRequestError, match="generative model .* --runner pooling"):
                gen.embeddings.create(model="gen", input="hello")
            assert gen.completions.create(model="gen", prompt="hello", max_tokens=2).choices[0].text is not None
    finally:
        engine.shutdown()


def test_serve_cli_takes_vllms_pooling_flags(tiny_bert_st):
    from kvloom.cli import build_parser, serve_config

    args = build_parser().parse_args(
        ["serve", tiny_bert_st, "--runner", "pooling", "--pooler-config", '{"pooling_type": "CLS"}']
    )
    engine_args, _, _ = serve_config(args, environ={})
    assert engine_args.runner == "pooling" and engine_args.pooler_config == '{"pooling_type": "CLS"}'
    args = build_parser().parse_args(["serve", tiny_bert_st, "--task", "embed"])
    assert serve_config(args, environ={})[0].task == "embed"
