"""Constrained decoding on tiny random models (the hardest case: the model knows no JSON).

Every output of a bounded constraint must finish and validate; unconstrained neighbours are
untouched; bad constraints fail alone; blocks are free afterwards.
"""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest

from kvloom import LLM, SamplingParams
from kvloom.engine.structured_output import GuidedDecodingParams, StructuredOutputsParams

from kvloom_testing import assert_all_blocks_free, build_peft_adapter

# Bounded: strings, arrays and numbers have limits, so a random model must finish the object.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "member", "tags", "address"],
}
SMALL_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["ok", "n"],
}
PROMPTS = [[5, 6, 7], [9, 10], [33, 4, 5, 6, 8], [100, 101, 102, 103]]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, num_gpu_blocks_override=256, seed=0)


@pytest.fixture(autouse=True)
def _blocks_free_after(request):
    yield
    if "llm" in request.fixturenames:
        assert_all_blocks_free(request.getfixturevalue("llm").llm_engine)


def compact(schema=SCHEMA):
    return StructuredOutputsParams(json=schema, disable_any_whitespace=True)


def params(constraint, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 200)
    kw.setdefault("temperature", 0)
    return SamplingParams(structured_outputs=constraint, **kw)


def texts(llm, prompts, p) -> list:
    return [c for o in llm.generate(prompts, p, use_tqdm=False) for c in o.outputs]


@pytest.mark.parametrize("temperature,seed", [(0, None), (1.0, 7), (1.3, 11)])
def test_json_schema_outputs_always_validate(llm, temperature, seed):
    for out in texts(llm, PROMPTS, params(compact(), temperature=temperature, seed=seed)):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_default_whitespace_is_bounded_and_still_validates(llm):
    # Any whitespace is allowed between JSON tokens, in runs of at most 20 characters.
    outs = texts(
        llm, PROMPTS, params(StructuredOutputsParams(json=SMALL_SCHEMA), max_tokens=400, temperature=1, seed=3)
    )
    for out in outs:
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), SMALL_SCHEMA)
        assert not re.search(r"\s{21}", out.text)


def test_regex_choice_and_grammars(llm):
    cases = [
        (StructuredOutputsParams(regex=r"[0-9]{3}-[a-c]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-c]{2}", t)),
        (StructuredOutputsParams(choice=["alpha", "beta", 'ga"mma']), lambda t: t in ("alpha", "beta", 'ga"mma')),
        (
            StructuredOutputsParams(grammar='root ::= "x=" [0-9] [0-9]? (";" | ".")'),
            lambda t: re.fullmatch(r"x=[0-9][0-9]?[;.]", t),
        ),
        (StructuredOutputsParams(grammar='start: "yes" | "no" "!"'), lambda t: t in ("yes", "no!")),  # Lark
    ]
    for constraint, ok in cases:
        for temperature in (0, 1.0):
            for out in texts(llm, PROMPTS, params(constraint, temperature=temperature, seed=5)):
                assert out.finish_reason == "stop" and ok(out.text), (constraint.kind, out.text)


def test_a_complete_grammar_that_could_go_on_does_not_stop_early(llm):
    # "(ab)+" is complete after "ab" but may go on: min_tokens holds EOS back, so the output must
    # continue past the first complete point rather than be cut there.
    outs = texts(llm, PROMPTS, params(StructuredOutputsParams(regex="(ab)+"), max_tokens=12, min_tokens=10))
    for out in outs:
        assert re.fullmatch("(ab)+", out.text) or re.fullmatch("(ab)*a", out.text)
        assert len(out.token_ids) >= 10


def test_json_object_finishes_as_an_object_or_runs_out(llm):
    for out in texts(llm, PROMPTS, params(StructuredOutputsParams(json_object=True), max_tokens=60)):
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
        else:
            assert out.text.startswith("{")


def test_unconstrained_requests_in_the_batch_are_untouched(llm):
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, free, use_tqdm=False)]
    mixed_params = [free, params(compact()), free, params(StructuredOutputsParams(choice=["a", "b"]))]
    mixed = llm.generate(PROMPTS, mixed_params, use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone[0]
    assert mixed[2].outputs[0].token_ids == alone[2]
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), SCHEMA)
    assert mixed[3].outputs[0].text in ("a", "b")


def test_n_seeds_logprobs_and_stop_strings(llm):
    outs = llm.generate([PROMPTS[0]], params(compact(), n=3, temperature=1.0, seed=42, logprobs=2), use_tqdm=False)
    again = llm.generate([PROMPTS[0]], params(compact(), n=3, temperature=1.0, seed=42, logprobs=2), use_tqdm=False)
    assert [c.text for c in outs[0].outputs] == [c.text for c in again[0].outputs]
    assert len({c.text for c in outs[0].outputs}) > 1
    for c in outs[0].outputs:
        jsonschema.validate(json.loads(c.text), SCHEMA)
        assert len(c.logprobs) == len(c.token_ids)
        assert all(lp[t].logprob > float("-inf") for t, lp in zip(c.token_ids, c.logprobs))
    full = texts(llm, [PROMPTS[1]], params(compact()))[0].text
    cut = texts(llm, [PROMPTS[1]], params(compact(), stop=['"member"']))[0]
    assert cut.text == full[: full.index('"member"')] and cut.stop_reason == '"member"'


def test_chunked_prefill_prefix_cache_and_preemption_keep_outputs(tiny_llama):
    prompts = [list(range(5 + i, 25 + i)) for i in range(4)]
    reference = LLM(tiny_llama, num_gpu_blocks_override=256)
    expected = [c.text for c in texts(reference, prompts, params(compact()))]
    again = reference.generate(prompts[:1], params(compact()), use_tqdm=False)[0]
    assert again.outputs[0].text == expected[0] and again.num_cached_tokens > 0
    # 11 usable blocks of 16 slots cannot hold four 20-token prompts with ~100-token outputs: preemption.
    small = LLM(tiny_llama, num_gpu_blocks_override=12, max_num_batched_tokens=24, max_model_len=160)
    got = [c.text for c in texts(small, prompts, params(compact(), max_tokens=140))]
    assert got == expected
    assert small.get_metrics()["num_preemptions"] > 0
    for engine in (reference.llm_engine, small.llm_engine):
        assert_all_blocks_free(engine)


def test_with_a_lora_adapter(tiny_llama, tmp_path):
    adapter = build_peft_adapter(tiny_llama, str(tmp_path / "a"), r=8, seed=3)
    llm = LLM(tiny_llama, num_gpu_blocks_override=128, enable_lora=True, max_lora_rank=8)
    from kvloom import LoRARequest

    lora = LoRARequest("a", 1, adapter)
    outs = llm.generate(PROMPTS, params(compact()), lora_request=[lora, None, lora, None], use_tqdm=False)
    for o in outs:
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)
    assert outs[0].outputs[0].text != texts(llm, PROMPTS[:1], params(compact()))[0].text
    assert_all_blocks_free(llm.llm_engine)
    assert llm.llm_engine.lora_manager.num_pinned == 0


@pytest.mark.parametrize(
    "constraint,match",
    [
        ({"json": {"type": "nonsense"}}, "Unsupported type"),
        ({"json": '{"type": '}, "not valid JSON"),
        ({"regex": "(ab"}, "parenthesis"),
        ({"regex": "a(?=b)"}, "Lookahead"),
        ({"grammar": "root ::= undefined_rule"}, "not defined"),
        ({"structural_tag": {"type": "structural_tag", "format": {"type": "nope"}}}, "structural_tag"),
        ({"choice": []}, "non-empty list"),
        ({"json": SCHEMA, "regex": "a"}, "exactly one"),
        ({"json": SCHEMA, "whitespace_pattern": " *"}, "whitespace_pattern"),
    ],
)
def test_bad_constraints_fail_alone_with_a_clear_error(llm, constraint, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(PROMPTS, params(constraint), use_tqdm=False)
    assert len(texts(llm, PROMPTS[:2], params(compact()))) == 2


def test_legacy_names_and_dict_forms(llm):
    by_old_name = SamplingParams(temperature=0, max_tokens=50, guided_decoding=GuidedDecodingParams(choice=["x", "y"]))
    assert by_old_name.structured_outputs.choice == ["x", "y"] and by_old_name.guided_decoding is None
    by_dict = SamplingParams(temperature=0, max_tokens=50, structured_outputs={"regex": "z{2}"})
    assert texts(llm, PROMPTS[:1], by_old_name)[0].text in ("x", "y")
    assert texts(llm, PROMPTS[:1], by_dict)[0].text == "zz"
    with pytest.raises(ValueError, match="not available"):
        GuidedDecodingParams(choice=["x"], backend="outlines")
    with pytest.raises(ValueError, match="not both"):
        SamplingParams(structured_outputs={"regex": "a"}, guided_decoding={"regex": "b"})


def test_grammars_compile_once_and_off_the_step_loop(tiny_llama):
    llm = LLM(tiny_llama, num_gpu_blocks_override=128)
    engine = llm.llm_engine
    manager = engine.structured_output
    release = threading.Event()
    real_compile = manager.backend.compile

    def slow_compile(grammar):
        release.wait(timeout=30)
        return real_compile(grammar)

    manager.backend.compile = slow_compile
    engine.add_request("free", PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.add_request("held", PROMPTS[1], params(compact()))
    finished = {}
    while "free" not in finished:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert "held" not in finished  # the unconstrained request ran to the end while the grammar compiled
    assert not engine.scheduler.requests["held"].structured_output.is_ready()
    release.set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    jsonschema.validate(json.loads(finished["held"].outputs[0].text), SCHEMA)
    manager.backend.compile = real_compile
    compiles = manager.stats.num_compiles
    texts(llm, PROMPTS, params(compact()))  # the same schema again: served from the cache
    assert manager.stats.num_compiles == compiles
    assert_all_blocks_free(engine)
