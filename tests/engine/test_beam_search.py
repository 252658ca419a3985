"""LLM.beam_search against transformers' beam search (num_beams, length_penalty, early_stopping) on a tiny model."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch

from kvloom import LLM, BeamSearchOutput, BeamSearchParams, SamplingParams

from kvloom_testing import assert_all_blocks_free, record_steps, wait_idle

# The tiny model never emits its real EOS (<|im_end|>); its generation config adds a token it does emit
# after "The quick brown fox", so some beams end on EOS there (as the engine and transformers both read it).
FREQUENT = 338
EOS = {2, FREQUENT}
PROMPTS = ["The quick brown fox", "Paged attention stores"]


@pytest.fixture(scope="module")
def model_dir(tiny_llama, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("beam") / "tiny")
    shutil.copytree(tiny_llama, path)
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump({"eos_token_id": [2, FREQUENT], "bos_token_id": 0, "pad_token_id": 0}, f)
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = LLM(model_dir, num_gpu_blocks_override=256, max_model_len=256)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_beam_search(model, ids: list[int], k: int, n: int, lp: float, es, ignore_eos: bool = False):
    """transformers' best k sequences (generated ids, EOS kept) and their sequences_scores."""
    extra = {"eos_token_id": None} if ignore_eos else {}
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            num_beams=k,
            num_return_sequences=k,
            do_sample=False,
            max_new_tokens=n,
            length_penalty=lp,
            early_stopping=es,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            **extra,
        )
    result = []
    for seq, score in zip(out.sequences.tolist(), out.sequences_scores.tolist()):
        gen = seq[len(ids) :]
        ends = [j for j, t in enumerate(gen) if t in EOS and not ignore_eos]
        result.append((gen[: ends[0] + 1] if ends else gen, score))
    return result


CASES = [
    # beam_width, max_tokens, length_penalty, early_stopping, ignore_eos
    (2, 8, 1.0, False, False),
    (3, 10, 0.5, "never", False),
    (4, 10, 2.0, True, False),
    (3, 8, 0.0, False, True),
]


@pytest.mark.parametrize("k,n,lp,es,ignore_eos", CASES)
def test_matches_transformers(llm, hf_model, k, n, lp, es, ignore_eos):
    tok = llm.get_tokenizer()
    ids = [tok(p).input_ids for p in PROMPTS]
    params = BeamSearchParams(beam_width=k, max_tokens=n, length_penalty=lp, early_stopping=es, ignore_eos=ignore_eos)
    with record_steps(llm.llm_engine) as steps:
        outputs = llm.beam_search([{"prompt_token_ids": i} for i in ids], params)
    # Every prompt's beams went to the engine together: the first step has one beam per prompt, the next k each.
    assert [len(s) for s in steps[:2]] == [len(PROMPTS), len(PROMPTS) * k]
    ended_on_eos = 0
    for prompt_ids, out in zip(ids, outputs):
        ref = hf_beam_search(hf_model, prompt_ids, k, n, lp, es, ignore_eos)
        assert isinstance(out, BeamSearchOutput) and len(out.sequences) == k
        assert [s.output_tokens for s in out.sequences] == [gen for gen, _ in ref]
        assert [s.score for s in out.sequences] == pytest.approx([score for _, score in ref], abs=1e-4)
        for seq in out.sequences:
            assert seq.tokens[: len(prompt_ids)] == prompt_ids
            gen = seq.output_tokens
            assert len(seq.logprobs) == len(gen)
            assert seq.cum_logprob == pytest.approx(sum(lp_[t].logprob for lp_, t in zip(seq.logprobs, gen)))
            assert seq.score == pytest.approx(seq.cum_logprob / len(gen) ** lp)
            if seq.finish_reason == "stop":
                ended_on_eos += 1
                assert gen[-1] == seq.stop_reason and seq.stop_reason in EOS
            else:
                assert seq.finish_reason == "length" and len(gen) == n and seq.stop_reason is None
    # "The quick brown fox" ends on EOS after 2 tokens among the best, except where EOS is ignored or
    # length_penalty=2 lets the long beams outscore it.
    assert (ended_on_eos > 0) == (not ignore_eos and lp != 2.0)
    assert_all_blocks_free(llm.llm_engine)


def test_width_one_is_greedy_and_text_is_prompt_plus_output(llm):
    tok = llm.get_tokenizer()
    greedy = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0]
    (out,) = llm.beam_search([PROMPTS[1]], BeamSearchParams(beam_width=1, max_tokens=6))
    (seq,) = out.sequences
    assert seq.output_tokens == greedy.token_ids
    assert seq.text == tok.decode(seq.tokens, skip_special_tokens=True)
    assert seq.text.startswith(PROMPTS[1])


def test_include_stop_str_in_output_keeps_the_eos_text(llm):
    tok = llm.get_tokenizer()
    params = dict(beam_width=2, max_tokens=8)
    plain = llm.beam_search([PROMPTS[0]], BeamSearchParams(**params))[0].sequences[0]
    kept = llm.beam_search([PROMPTS[0]], BeamSearchParams(**params, include_stop_str_in_output=True))[0].sequences[0]
    assert plain.finish_reason == "stop" and plain.tokens == kept.tokens
    assert kept.text == plain.text + tok.decode([plain.stop_reason])


def test_bad_params_are_refused_by_name(llm):
    for kwargs, name in [
        (dict(beam_width=0, max_tokens=4), "beam_width"),
        (dict(beam_width=2, max_tokens=0), "max_tokens"),
        (dict(beam_width=2, max_tokens=4, temperature=0.7), "temperature"),
        (dict(beam_width=2, max_tokens=4, early_stopping="sometimes"), "early_stopping"),
        (dict(beam_width=2, max_tokens=4, length_penalty=float("nan")), "length_penalty"),
    ]:
        with pytest.raises(ValueError, match=name):
            BeamSearchParams(**kwargs)
    # 2 * 11 candidates per beam and step exceed the 20 log-probabilities a request may return.
    with pytest.raises(ValueError, match="beam_width <= 10"):
        llm.beam_search(["Hello"], BeamSearchParams(beam_width=11, max_tokens=4))
    with pytest.raises(ValueError, match="max_model_len"):
        llm.beam_search([{"prompt_token_ids": [5] * 300}], BeamSearchParams(beam_width=2, max_tokens=4))
    with pytest.raises(ValueError, match="concurrency_limit"):
        llm.beam_search(["Hello"], BeamSearchParams(beam_width=2, max_tokens=4), concurrency_limit=0)
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llm.beam_search(["Hello"], SamplingParams())
    assert_all_blocks_free(llm.llm_engine)


def test_legacy_sampling_params_fields(llm):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(use_beam_search=True)  # the default temperature 1.0 would sample
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(use_beam_search=True, temperature=0, stop=["."])
    with pytest.raises(ValueError, match="length_penalty"):
        SamplingParams(length_penalty=0.5)  # beam search only: never silently ignored
    legacy = SamplingParams(use_beam_search=True, temperature=0, n=2, best_of=3, max_tokens=5, length_penalty=0.5)
    assert legacy.to_beam_search_params() == BeamSearchParams(beam_width=3, max_tokens=5, length_penalty=0.5)
    with pytest.raises(ValueError, match="LLM.beam_search"):
        llm.generate(["Hello"], legacy, use_tqdm=False)  # the engine runs no beam search itself: never greedy


def test_async_beam_search_equals_llm(llm):
    """AsyncLLM.beam_search (what the server runs) gives LLM.beam_search's beams; LLM then runs through it."""
    params = BeamSearchParams(beam_width=3, max_tokens=8, length_penalty=0.5)
    expected = llm.beam_search(PROMPTS[:2], params)
    client = llm.engine_client

    async def search(prompt):
        return [out async for out in client.beam_search(prompt, None, params, n=2)]

    async def run():
        return [await search(p) for p in PROMPTS[:2]]

    for (result,), want in zip(asyncio.run(run()), expected):
        assert result.finished and len(result.outputs) == 2
        assert [c.token_ids for c in result.outputs] == [s.output_tokens for s in want.sequences[:2]]
        cum = [s.cum_logprob for s in want.sequences[:2]]
        assert [c.cumulative_logprob for c in result.outputs] == pytest.approx(cum)
        assert want.sequences[0].text.endswith(result.outputs[0].text)

    # A search cancelled midway (a client that went away, a timeout) aborts its requests: no block stays held.
    async def cancelled():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(_long(client), 0.3)

    asyncio.run(cancelled())
    wait_idle(llm.llm_engine)
    assert_all_blocks_free(llm.llm_engine)

    # LLM.beam_search through the engine client (LLM.generate's path once a client exists) agrees too.
    def tokens(outputs):
        return [[s.tokens for s in o.sequences] for o in outputs]

    assert tokens(llm.beam_search(PROMPTS[:2], params)) == tokens(expected)
    assert tokens(llm.beam_search(PROMPTS[:2], params, concurrency_limit=1)) == tokens(expected)
    assert_all_blocks_free(llm.llm_engine)


async def _long(client):
    return [out async for out in client.beam_search(PROMPTS[1], "long", BeamSearchParams(beam_width=4, max_tokens=200))]
