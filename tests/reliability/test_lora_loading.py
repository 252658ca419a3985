"""Runtime LoRA loading: ids given atomically, a root that paths cannot escape, no server paths in replies."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

import kvloom
from kvloom import AsyncLLM

from kvloom_testing import assert_all_blocks_free, assert_openai_error, build_peft_adapter, wait_idle


@pytest.fixture(scope="module")
def lora_engine(tiny_llama):
    eng = AsyncLLM(model=tiny_llama, num_gpu_blocks_override=64, enable_lora=True, max_loras=2, max_lora_rank=8)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def root(tiny_llama, tmp_path_factory):
    base = tmp_path_factory.mktemp("lora-root")
    for i in range(6):
        build_peft_adapter(tiny_llama, str(base / f"a{i}"), r=4, targets=("q_proj", "v_proj"), seed=i)
    outside = tmp_path_factory.mktemp("outside")
    build_peft_adapter(tiny_llama, str(outside / "secret"), r=4, targets=("q_proj",), seed=9)
    os.symlink(outside / "secret", base / "link")
    return base, outside


def test_concurrent_loads_get_distinct_ids_and_paths_stay_private(lora_engine, root):
    base, outside = root
    with kvloom.serve(
        lora_engine, served_model_name="tiny", allow_runtime_lora_updating=True, lora_root=str(base)
    ) as h:

        async def load_all():
            async with httpx.AsyncClient(base_url=h.base_url, timeout=60) as c:
                return await asyncio.gather(
                    *(c.post("/load_lora_adapter", json={"lora_name": f"n{i}", "lora_path": f"a{i}"}) for i in range(6))
                )

        assert all(r.status_code == 200 for r in asyncio.run(load_all()))
        ids = [lora_engine.get_lora_request(f"n{i}").lora_int_id for i in range(6)]
        assert len(set(ids)) == 6
        cards = httpx.get(f"{h.base_url}/models").json()["data"]
        assert all(str(base) not in str(card) for card in cards)  # no server paths in /v1/models
        for path in ("../outside/secret", str(outside / "secret"), "link", "a0/../../outside/secret"):
            r = httpx.post(f"{h.base_url}/load_lora_adapter", json={"lora_name": "evil", "lora_path": path})
            error = assert_openai_error(r, 400)
            assert "root" in error["message"] and str(outside) not in error["message"]
        missing = httpx.post(f"{h.base_url}/load_lora_adapter", json={"lora_name": "m", "lora_path": "nope"})
        assert str(base) not in assert_openai_error(missing, 400)["message"]
        reply = httpx.post(f"{h.base_url}/completions", json={"model": "n3", "prompt": "hi", "max_tokens": 2})
        assert reply.status_code == 200
    wait_idle(lora_engine.engine)
    assert_all_blocks_free(lora_engine.engine)
