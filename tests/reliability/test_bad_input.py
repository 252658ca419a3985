"""Every bad input found by hand or by fuzzing gets a 4xx in OpenAI's shape, and the server serves on."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from kvloom_testing import RELIABILITY_MODEL as MODEL
from kvloom_testing import assert_openai_error, normal_request_works

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return {"model": MODEL, "messages": USER, "max_tokens": 3, **fields}


def completion(**fields):
    return {"model": MODEL, "prompt": "hi", "max_tokens": 3, **fields}


BAD = [
    # values that used to pass validation and then raise inside the engine step
    (COMPLETIONS, completion(seed=2**64), "seed"),
    (COMPLETIONS, completion(seed=-(2**64)), "seed"),
    (COMPLETIONS, completion(n=2, seed=2**64 - 1), "seed"),
    (COMPLETIONS, completion(stop_token_ids=[10_000], min_tokens=2), "stop_token_ids"),
    (COMPLETIONS, completion(logit_bias={"10000": 5}), "logit_bias"),
    (COMPLETIONS, completion(logit_bias={"abc": 5}), "logit_bias"),
    (COMPLETIONS, completion(logit_bias={"5": 1000}), "logit_bias"),
    # unbounded sizes
    (COMPLETIONS, completion(n=1_000_000), "max_num_seqs"),
    (COMPLETIONS, completion(n=1, best_of=1_000_000), "max_num_seqs"),
    # content parts and messages
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": 123}]}]), "text"),
    (CHAT, chat(messages=[{"role": "user", "content": [None]}]), "content"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), "image"),
    (CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), "role"),
    # token ids outside the vocabulary are checked before anything decodes them
    (COMPLETIONS, completion(prompt=[-5]), "token ids"),
    (COMPLETIONS, completion(prompt=[2**70]), "token ids"),
    (COMPLETIONS, completion(prompt=[[1, 2], [-1]]), "token ids"),
    # text that cannot be tokenized (a lone surrogate)
    (COMPLETIONS, completion(prompt="\ud800abc"), "tokenized"),
    (CHAT, chat(messages=[{"role": "user", "content": "\ud800abc"}]), "surrogate"),
    # chat templates from the client
    (CHAT, chat(chat_template_kwargs={"tokenize": True}), "tokenize"),
    (CHAT, chat(chat_template="{% for m in messages %}{{ m.content }"), "template"),
    (CHAT, chat(chat_template="{{ raise_exception('no thanks') }}"), "no thanks"),
    # fields the server does not implement are named, never ignored
    (CHAT, chat(echo=True), "echo"),
    (CHAT, chat(use_beam_search=True, stop=["x"]), "use_beam_search"),
    (COMPLETIONS, completion(length_penalty=0.5), "length_penalty"),
    (COMPLETIONS, completion(priority=3), "priority"),
    (COMPLETIONS, completion(suffix="!"), "suffix"),
    (CHAT, chat(functions=[{"name": "f"}]), "functions"),
]


@pytest.mark.parametrize("path,body,fragment", BAD, ids=[f"{p.rsplit('/', 1)[1]}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_input_is_a_400_and_harms_nothing(http, path, body, fragment):
    # Sent as ASCII JSON: httpx's json= cannot encode the lone surrogates of two cases.
    raw = json.dumps(body)
    error = assert_openai_error(http.post(path, content=raw, headers={"content-type": "application/json"}), 400)
    assert fragment.lower() in error["message"].lower()
    normal_request_works(http)


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN"])
@pytest.mark.parametrize("name", ["repetition_penalty", "temperature", "top_p", "presence_penalty"])
def test_non_finite_numbers_are_refused(http, name, value):
    raw = json.dumps(completion())[:-1] + f', "{name}": {value}}}'
    error = assert_openai_error(http.post(COMPLETIONS, content=raw, headers={"content-type": "application/json"}), 400)
    assert name in error["message"]


def test_huge_n_fails_fast(http):
    t0 = time.monotonic()
    assert_openai_error(http.post(COMPLETIONS, json=completion(n=10_000_000)), 400)
    assert time.monotonic() - t0 < 2


def test_tokenize_takes_any_message_content(http):
    for content in (None, [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], ""):
        r = http.post("/tokenize", json={"model": MODEL, "messages": [{"role": "assistant", "content": content}]})
        assert r.status_code == 200, r.text
    r = http.post("/tokenize", json={"model": MODEL, "messages": [{"role": "user"}]})
    assert r.status_code == 200 and r.json()["count"] > 0
    assert_openai_error(http.post("/detokenize", json={"model": MODEL, "tokens": [2**70]}), 400)


def test_body_limit_is_a_413_and_the_server_stays_responsive(http, server):
    big = "x" * (300 * 1024)  # the server under test takes 256 KiB
    error = assert_openai_error(http.post(COMPLETIONS, json=completion(prompt=big)), 413)
    assert "limit" in error["message"]

    def chunked():  # no Content-Length: the limit counts the bytes as they arrive
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(40):
            yield b"y" * 8192
        yield b'"}'

    assert_openai_error(http.post(COMPLETIONS, content=chunked()), 413)
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    normal_request_works(http)


def test_api_key_guards_everything_but_health_and_version(server):
    for method, path in (("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/metrics"), ("GET", "/v1/models")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "reliability-key"}):
            r = httpx.request(method, f"{server.url}{path}", headers=headers, json={"prompt": "x", "tokens": [1]})
            assert_openai_error(r, 401)
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").status_code == 200


def test_openapi_lists_the_errors_and_the_event_stream(http):
    doc = http.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"400", "401", "404", "413", "500"} <= set(responses)
        assert "text/event-stream" in responses["200"]["content"]
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    assert {"400", "401"} <= set(doc["paths"]["/tokenize"]["post"]["responses"])
