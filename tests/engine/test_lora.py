"""LoRA multiplexing: per-request PEFT adapters, checked token for token against transformers + peft."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest
import torch

from kvloom import LLM, LoRARequest, SamplingParams
from kvloom.async_llm import AsyncLLM

from kvloom_testing import assert_all_blocks_free, assert_no_lora_pins, build_peft_adapter, peft_greedy

pytest.importorskip("peft")

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
_REF: dict = {}


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        # all seven projections, rank 8
        "all": build_peft_adapter(tiny_llama, str(root / "all"), r=8, alpha=16, seed=1),
        # attention only (q, v), rank 4, rsLoRA scaling
        "qv": build_peft_adapter(
            tiny_llama, str(root / "qv"), r=4, alpha=8, targets=("q_proj", "v_proj"), seed=2, use_rslora=True
        ),
        # MLP and o_proj, rank 16 (the engine's max)
        "mlp": build_peft_adapter(
            tiny_llama,
            str(root / "mlp"),
            r=16,
            alpha=8,
            targets=("o_proj", "gate_proj", "up_proj", "down_proj"),
            seed=3,
        ),
    }


@pytest.fixture(scope="module")
def lora_reqs(adapters) -> dict[str, LoRARequest]:
    return {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())}


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, enable_lora=True, max_loras=3, max_lora_rank=16, kv_cache_memory_gb=0.05)


def _prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]


PROMPTS = _prompts([5, 19, 37, 3])


def reference(base_dir, adapter_dir, prompt, n=GREEDY.max_tokens):
    key = (adapter_dir, tuple(prompt), n)
    if key not in _REF:
        _REF[key] = peft_greedy(base_dir, adapter_dir, prompt, n)
    return _REF[key]


def check_mixed(llm, base_dir, adapters, lora_reqs, names, batch):
    """One generate() call with an adapter (or None) per prompt; each output equals transformers + PEFT."""
    outs = llm.generate(batch, GREEDY, use_tqdm=False, lora_request=[lora_reqs.get(n) for n in names])
    for prompt, name, out in zip(batch, names, outs):
        assert out.outputs[0].token_ids == reference(base_dir, adapters.get(name), prompt), name


def _check_idle(engine):
    assert_all_blocks_free(engine)
    assert_no_lora_pins(engine)


def test_each_adapter_matches_peft(llm, tiny_llama, adapters, lora_reqs):
    base = [reference(tiny_llama, None, p) for p in PROMPTS]
    for name, req in lora_reqs.items():
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=req)
        got = [o.outputs[0].token_ids for o in outs]
        want = [reference(tiny_llama, adapters[name], p) for p in PROMPTS]
        assert got == want, name
        assert got != base, f"adapter {name} does not change the output; the test would prove nothing"
        assert all(o.lora_request is req for o in outs)
    _check_idle(llm.llm_engine)


def test_mixed_batch_gives_each_request_its_own_output(llm, tiny_llama, adapters, lora_reqs):
    names = [None, "all", "qv", "mlp"] * 3
    batch = _prompts([4 + 3 * i for i in range(len(names))], seed=5)
    check_mixed(llm, tiny_llama, adapters, lora_reqs, names, batch)
    _check_idle(llm.llm_engine)


def test_mixed_batch_with_chunked_prefill_and_decodes(tiny_llama, adapters, lora_reqs):
    """A small token budget splits prompts into chunks that share steps with other adapters' decodes."""
    llm = LLM(tiny_llama, enable_lora=True, max_loras=3, max_num_batched_tokens=24, kv_cache_memory_gb=0.05)
    names = ["mlp", None, "all", "qv", "all", None]
    batch = _prompts([30, 9, 41, 17, 2, 26], seed=7)
    check_mixed(llm, tiny_llama, adapters, lora_reqs, names, batch)
    _check_idle(llm.llm_engine)


def test_slot_pressure_completes_every_request(tiny_llama, adapters, lora_reqs):
    """Three adapters through one slot: requests wait their turn; base requests are never held back."""
    llm = LLM(tiny_llama, enable_lora=True, max_loras=1, max_lora_rank=16, kv_cache_memory_gb=0.05)
    engine = llm.llm_engine
    seen: list[set[int]] = []
    assign = engine.core.lora_slots.assign
    engine.core.lora_slots.assign = lambda ids: (seen.append(set(ids)), assign(ids))[1]
    names = ["all", "qv", None, "mlp", "qv", None, "all", "mlp"]
    batch = _prompts([6 + i for i in range(len(names))], seed=9)
    check_mixed(llm, tiny_llama, adapters, lora_reqs, names, batch)
    assert all(len(ids) <= 1 for ids in seen)
    assert {i for ids in seen for i in ids} == {1, 2, 3}
    _check_idle(engine)


def test_waiting_adapter_does_not_block_base_or_running_adapter(tiny_llama, lora_reqs):
    llm = LLM(tiny_llama, enable_lora=True, max_loras=1, kv_cache_memory_gb=0.05)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine.add_request("a1", [5, 6, 7], params, lora_request=lora_reqs["all"])
    engine.add_request("b1", [5, 6, 8], params, lora_request=lora_reqs["qv"])
    engine.add_request("base", [5, 6, 9], params)
    engine.add_request("a2", [5, 6, 10], params, lora_request=lora_reqs["all"])
    engine.step()
    running = {r.request_id for r in engine.scheduler.running}
    assert running == {"a1", "base", "a2"}
    assert [r.request_id for r in engine.scheduler.waiting] == ["b1"]
    while engine.has_unfinished_requests():
        engine.step()
    _check_idle(engine)


def test_prefix_cache_never_shares_blocks_across_adapters(llm, tiny_llama, adapters, lora_reqs):
    engine = llm.llm_engine
    engine.reset_prefix_cache()
    prompt = _prompts([40], seed=11)[0]
    base = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    tuned = llm.generate([prompt], GREEDY, use_tqdm=False, lora_request=lora_reqs["all"])[0]
    again = llm.generate([prompt], GREEDY, use_tqdm=False, lora_request=lora_reqs["all"])[0]
    assert base.num_cached_tokens == 0
    assert tuned.num_cached_tokens == 0  # same tokens, other adapter: no hit
    assert again.num_cached_tokens == 32  # two full blocks of its own adapter
    assert tuned.outputs[0].token_ids == again.outputs[0].token_ids == reference(tiny_llama, adapters["all"], prompt)
    _check_idle(engine)


def test_registry_by_name_and_removal(llm, tiny_llama, adapters, lora_reqs):
    assert llm.add_lora(lora_reqs["qv"])
    assert 2 in llm.list_loras()
    out = llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False, lora_request="qv")[0]
    assert out.outputs[0].token_ids == reference(tiny_llama, adapters["qv"], PROMPTS[0])
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False, lora_request="nope")
    with pytest.raises(ValueError, match="already names adapter"):
        llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False, lora_request=LoRARequest("other", 2, adapters["all"]))
    assert llm.remove_lora(2)
    assert llm.llm_engine.get_lora_request("qv") is None
    assert not llm.remove_lora(99)
    _check_idle(llm.llm_engine)


# ---- bad adapters ------------------------------------------------------------------------------
def _copy_adapter(src: str, dst: Path, **config_changes) -> str:
    dst.mkdir()
    for f in Path(src).iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if config_changes:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config_changes)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.fixture(scope="module")
def bad_adapters(adapters, tiny_llama, tmp_path_factory) -> dict[str, tuple[str, str]]:
    root = tmp_path_factory.mktemp("bad")
    broken = _copy_adapter(adapters["qv"], root / "broken")
    (Path(broken) / "adapter_config.json").write_text("{not json")
    big = build_peft_adapter(tiny_llama, str(root / "big"), r=32, alpha=32, targets=("q_proj",), seed=4)
    unknown = _copy_adapter(adapters["qv"], root / "unknown", target_modules=["q_proj", "lm_head_x"])
    wrong = _copy_adapter(adapters["qv"], root / "wrong")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(Path(wrong) / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0] * 2, tensors[key].shape[1])
    save_file(tensors, str(Path(wrong) / "adapter_model.safetensors"))
    return {
        "missing": (str(root / "does-not-exist"), "is not a directory"),
        "broken": (broken, "cannot read adapter_config.json"),
        "big": (big, "rank 32 exceeds max_lora_rank=16"),
        "unknown": (unknown, "unknown target module"),
        "wrong": (wrong, "was it trained for another model"),
    }


def test_bad_adapters_fail_only_their_own_request(tiny_llama, adapters, lora_reqs, bad_adapters):
    client = AsyncLLM(model=tiny_llama, enable_lora=True, max_loras=2, max_lora_rank=16, kv_cache_memory_gb=0.05)
    try:

        async def one(prompt, lora):
            last = None
            async for out in client.generate(prompt, GREEDY, lora_request=lora):
                last = out
            return last.outputs[0].token_ids

        async def main():
            jobs, expect = [], []
            for i, (name, (path, _)) in enumerate(bad_adapters.items()):
                jobs.append(one(PROMPTS[i % 4], LoRARequest(name, 10 + i, path)))
                expect.append(name)
                good = "all" if i % 2 else "mlp"
                jobs.append(one(PROMPTS[i % 4], lora_reqs[good]))
                expect.append((good, PROMPTS[i % 4]))
            return expect, await asyncio.gather(*jobs, return_exceptions=True)

        expect, results = asyncio.run(main())
        for what, result in zip(expect, results):
            if isinstance(what, str):
                assert isinstance(result, ValueError), (what, result)
                assert bad_adapters[what][1] in str(result), str(result)
            else:
                name, prompt = what
                assert result == reference(tiny_llama, adapters[name], prompt)
        engine = client.engine
        assert not (engine.list_loras() & {10, 11, 12, 13, 14})
        _check_idle(engine)
    finally:
        client.shutdown()


def test_lora_needs_enable_lora(tiny_llama, lora_reqs):
    llm = LLM(tiny_llama, kv_cache_memory_gb=0.05)
    with pytest.raises(ValueError, match="enable_lora=True"):
        llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False, lora_request=lora_reqs["all"])
    assert llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0].finished
    assert_all_blocks_free(llm.llm_engine)


def test_pickled_bin_weights_only(tmp_path, tiny_llama, adapters):
    from safetensors.torch import load_file

    ok = _copy_adapter(adapters["qv"], tmp_path / "bin")
    tensors = load_file(str(Path(ok) / "adapter_model.safetensors"))
    (Path(ok) / "adapter_model.safetensors").unlink()
    torch.save(tensors, str(Path(ok) / "adapter_model.bin"))
    evil = _copy_adapter(ok, tmp_path / "evil")
    torch.save({"x": _Evil()}, str(Path(evil) / "adapter_model.bin"))

    llm = LLM(tiny_llama, enable_lora=True, max_lora_rank=8, kv_cache_memory_gb=0.05)
    out = llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False, lora_request=LoRARequest("bin", 1, ok))[0]
    assert out.outputs[0].token_ids == reference(tiny_llama, adapters["qv"], PROMPTS[1])
    with pytest.raises(ValueError, match="weights_only=True"):
        llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False, lora_request=LoRARequest("evil", 2, evil))
    _check_idle(llm.llm_engine)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))
