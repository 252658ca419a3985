"""A live server with an API key on a tiny model, shared by the reliability tests."""

from __future__ import annotations

import httpx
import pytest

import kvloom
from kvloom import AsyncLLM

from kvloom_testing import RELIABILITY_KEY as KEY
from kvloom_testing import RELIABILITY_MODEL as MODEL
from kvloom_testing import assert_all_blocks_free, wait_idle


@pytest.fixture(scope="package")
def engine(tiny_llama):
    eng = AsyncLLM(model=tiny_llama, num_gpu_blocks_override=256, max_model_len=256, max_num_seqs=32)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="package")
def server(engine):
    with kvloom.serve(engine, served_model_name=MODEL, api_key=KEY, max_request_body_bytes=256 * 1024) as handle:
        yield handle


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        yield client


@pytest.fixture(autouse=True)
def _blocks_free_after(engine):
    yield
    wait_idle(engine.engine)
    assert_all_blocks_free(engine.engine)
