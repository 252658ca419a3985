"""Bad input fails with a clear error and leaves the engine usable, with no leaked blocks."""

from __future__ import annotations

import pytest

from kvloom import LLM, SamplingParams

from kvloom_testing import assert_all_blocks_free


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, num_gpu_blocks_override=64, max_model_len=64)


GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def still_works(llm):
    out = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert_all_blocks_free(llm.llm_engine)


@pytest.mark.parametrize(
    "prompt,error,match",
    [
        ("", ValueError, "empty"),
        ([], ValueError, "empty"),
        ([1, 2, 10_000], ValueError, "token ids"),
        (list(range(1, 65)), ValueError, "max_model_len"),
        (12, TypeError, "prompt"),
        ({"text": "x"}, ValueError, "prompt"),
    ],
)
def test_bad_prompts_raise_and_harm_nothing(llm, prompt, error, match):
    with pytest.raises(error, match=match):
        llm.generate([[5, 6], prompt], GREEDY, use_tqdm=False)
    still_works(llm)


def test_bad_sampling_values_raise_naming_the_field(llm):
    with pytest.raises(ValueError, match="top_p"):
        llm.generate([[1, 2]], SamplingParams(top_p=0.0), use_tqdm=False)
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate([[1, 2]], {"temperature": 0}, use_tqdm=False)
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.generate([[1, 2], [3]], [GREEDY], use_tqdm=False)
    still_works(llm)


def test_prompt_at_the_limit_is_cut_by_length(llm):
    out = llm.generate(
        [list(range(1, 63))], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False
    )[0]
    assert len(out.outputs[0].token_ids) == 2 and out.outputs[0].finish_reason == "length"
    still_works(llm)


def test_unknown_engine_arguments_are_refused(tiny_llama):
    with pytest.raises(TypeError, match="no_such_arg"):
        LLM(tiny_llama, no_such_arg=1)
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(tiny_llama, max_num_seqs=0)
    with pytest.raises(ValueError, match="dtype"):
        LLM(tiny_llama, dtype="float8")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(tiny_llama, max_model_len=100_000)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(str(tmp_path))
