"""The public offline API: LLM.generate / chat, RequestOutput shape, LLMEngine's manual loop."""

from __future__ import annotations

import pytest

from kvloom import LLM, LLMEngine, RequestOutput, RequestOutputKind, SamplingParams
from kvloom.engine.detokenizer import IncrementalDetokenizer

from kvloom_testing import assert_all_blocks_free


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, num_gpu_blocks_override=128)


def test_generate_keeps_input_order_and_fills_fields(llm):
    prompts = ["Hello world!", [7, 8, 9], {"prompt": "The quick brown fox"}]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 5, 4)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5, 4]
    assert all(isinstance(o, RequestOutput) and o.finished for o in outs)
    tok = llm.get_tokenizer()
    assert outs[0].prompt == "Hello world!" and outs[0].prompt_token_ids == tok.encode("Hello world!")
    assert outs[1].prompt is None and outs[1].prompt_token_ids == [7, 8, 9]
    c = outs[1].outputs[0]
    assert c.index == 0 and c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    assert c.cumulative_logprob is None and c.logprobs is None and c.finish_reason == "length"
    assert len({o.request_id for o in outs}) == 3
    assert_all_blocks_free(llm.llm_engine)


def test_single_prompt_and_default_params(llm):
    out = llm.generate("Paged attention", use_tqdm=False)
    assert len(out) == 1 and 1 <= len(out[0].outputs[0].token_ids) <= 16


def test_chat_applies_the_template(llm):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    expected = llm.get_tokenizer().apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == llm.get_tokenizer().encode(expected, add_special_tokens=False)
    many = llm.chat(
        [msgs, msgs + [{"role": "assistant", "content": "Paris"}, {"role": "user", "content": "ok"}]],
        SamplingParams(temperature=0, max_tokens=2),
        use_tqdm=False,
    )
    assert len(many) == 2 and len(many[1].prompt_token_ids) > len(many[0].prompt_token_ids)


def test_engine_manual_loop_streams_and_aborts(tiny_llama):
    engine = LLMEngine.from_engine_args(__import__("kvloom").EngineArgs(model=tiny_llama, num_gpu_blocks_override=64))
    delta = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    engine.add_request("a", [1, 2, 3], delta)
    engine.add_request("b", [4, 5, 6], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [1], delta)
    pieces, cumulative = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "a":
                pieces.append(out.outputs[0].token_ids)
            else:
                cumulative.append(len(out.outputs[0].token_ids))
                if len(cumulative) == 3:
                    engine.abort_request("b")
    assert [len(p) for p in pieces] == [1] * 6
    assert cumulative == [1, 2, 3]
    assert not engine.has_unfinished_requests()
    assert_all_blocks_free(engine)


def test_two_engines_live_in_one_process(tiny_llama, tiny_qwen2):
    a = LLM(tiny_llama, num_gpu_blocks_override=32)
    b = LLM(tiny_qwen2, num_gpu_blocks_override=32)
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out_a = a.generate([[3, 4, 5]], p, use_tqdm=False)[0].outputs[0].token_ids
    out_b = b.generate([[3, 4, 5]], p, use_tqdm=False)[0].outputs[0].token_ids
    assert out_a != out_b
    assert a.generate([[3, 4, 5]], p, use_tqdm=False)[0].outputs[0].token_ids == out_a
    assert a.llm_engine.kv_cache_manager is not b.llm_engine.kv_cache_manager


def test_incremental_detokenizer_matches_full_decode(llm):
    tok = llm.get_tokenizer()
    text = "Hello world! Paged attention stores keys and values. 0123456789"
    ids = tok.encode(text)
    prompt, out = ids[:4], ids[4:]
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add_tokens([t]) for t in out]
    assert "".join(pieces) == tok.decode(out)
