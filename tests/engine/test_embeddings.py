"""Embedding ("pooling") models: BERT against sentence-transformers, decoder pooling against transformers,
batching, Matryoshka dimensions, truncation and the errors, all through the shared engine."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from kvloom import LLM, AsyncLLM, EmbeddingRequestOutput, PoolingParams, SamplingParams

from kvloom_testing import assert_all_blocks_free, build_tiny_bert_st, record_steps

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "paris",
    "what is the capital of france",
    "continuous batching lets new requests join while others decode " * 3,
    "hello world",
]


@pytest.fixture(scope="module")
def st_mean(tiny_bert_st) -> str:
    return tiny_bert_st


@pytest.fixture(scope="module")
def bert(st_mean):
    llm = LLM(st_mean, runner="pooling")
    yield llm
    llm.shutdown()


def st_encode(path: str, texts: list[str]) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu").encode(texts, convert_to_tensor=True)


def assert_close(outs: list[EmbeddingRequestOutput], ref: torch.Tensor) -> None:
    got = torch.tensor([o.outputs.embedding for o in outs])
    assert got.shape == ref.shape
    assert (F.cosine_similarity(got, ref, dim=-1) > 1 - 1e-5).all()  # the bar
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_bert_mean_matches_sentence_transformers(bert, st_mean):
    outs = bert.embed(TEXTS, use_tqdm=False)
    assert_close(outs, st_encode(st_mean, TEXTS))
    assert all(abs(sum(x * x for x in o.outputs.embedding) - 1) < 1e-5 for o in outs)  # the Normalize module
    assert outs[1].prompt_token_ids[0] == bert.get_tokenizer().cls_token_id and outs[0].finished
    assert_all_blocks_free(bert.llm_engine)


def test_bert_cls_without_normalize_matches_sentence_transformers(tmp_path):
    path = build_tiny_bert_st(str(tmp_path), "cls", normalize=False, seed=1)
    llm = LLM(path, task="embed")  # vLLM's older spelling of runner="pooling"
    try:
        outs = llm.embed(TEXTS, use_tqdm=False)
        assert_close(outs, st_encode(path, TEXTS))
        assert abs(sum(x * x for x in outs[0].outputs.embedding) - 1) > 1e-3  # no Normalize module: raw CLS
        # encode() is vLLM's generic form: the same vector, as a tensor.
        enc = llm.encode(TEXTS[:1], use_tqdm=False)[0]
        torch.testing.assert_close(enc.outputs.data, torch.tensor(outs[0].outputs.embedding), atol=1e-5, rtol=1e-5)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("pooling", ["LAST", "MEAN"])
def test_decoder_pooling_matches_transformers(tiny_llama, pooling):
    from transformers import AutoModel

    cfg = None if pooling == "LAST" else {"pooling_type": "MEAN"}  # LAST + normalize is the decoder default
    llm = LLM(tiny_llama, runner="pooling", pooler_config=cfg, num_gpu_blocks_override=64)
    try:
        outs = llm.embed(TEXTS, use_tqdm=False)
        hf = AutoModel.from_pretrained(tiny_llama, dtype=torch.float32).eval()
        for out in outs:
            with torch.no_grad():
                hidden = hf(torch.tensor([out.prompt_token_ids])).last_hidden_state[0]
            ref = F.normalize(hidden[-1] if pooling == "LAST" else hidden.mean(0), dim=-1)
            got = torch.tensor(out.outputs.embedding)
            assert F.cosine_similarity(got, ref, dim=0) > 1 - 1e-5
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="runner='pooling'"):
            llm.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False)
        assert_all_blocks_free(llm.llm_engine)
    finally:
        llm.shutdown()


def test_concurrent_requests_are_batched_and_equal_one_at_a_time(st_mean, bert):
    texts = [" ".join(TEXTS[i % 5 : i % 5 + 1 + i % 3]) for i in range(24)]
    singles = [bert.embed(t, use_tqdm=False)[0].outputs.embedding for t in texts]
    engine = AsyncLLM(model=st_mean, runner="pooling")

    async def embed_all():
        async def one(i: int, text: str):
            return [out async for out in engine.encode(text, PoolingParams(), f"e{i}")][-1]

        return await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))

    try:
        with record_steps(engine.engine) as steps:
            outs = asyncio.run(embed_all())
        assert max(len(s) for s in steps) > 1  # requests of different lengths shared steps
        for out, single in zip(outs, singles):
            torch.testing.assert_close(out.outputs.data, torch.tensor(single), atol=1e-5, rtol=1e-5)
        assert_all_blocks_free(engine.engine)
    finally:
        engine.shutdown()


def test_matryoshka_dimensions(tmp_path, st_mean, bert):
    with pytest.raises(ValueError, match="does not support matryoshka representation"):
        bert.embed("hello", pooling_params=PoolingParams(dimensions=8), use_tqdm=False)
    path = tmp_path / "mrl"
    shutil.copytree(st_mean, path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"matryoshka_dimensions": [8, 16]}))
    llm = LLM(str(path), runner="pooling")
    try:
        short = llm.embed(TEXTS, pooling_params=PoolingParams(dimensions=8), use_tqdm=False)
        ref = F.normalize(st_encode(st_mean, TEXTS)[:, :8], dim=-1)  # truncate, then re-normalize
        assert_close(short, ref)
        with pytest.raises(ValueError, match=r"only supports \[8, 16\] matryoshka dimensions"):
            llm.embed("hello", pooling_params=PoolingParams(dimensions=12), use_tqdm=False)
        assert_all_blocks_free(llm.llm_engine)
    finally:
        llm.shutdown()


def test_too_long_input_and_truncation(bert):
    tok = bert.get_tokenizer()
    long_text = "the quick brown fox " * 40
    with pytest.raises(ValueError, match="max_model_len = 128; .*truncate_prompt_tokens"):
        bert.embed(long_text, use_tqdm=False)
    out = bert.embed(long_text, truncate_prompt_tokens=16, use_tqdm=False)[0]
    ids = out.prompt_token_ids
    assert len(ids) == 16 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id  # the tokenizer's cut
    by_ids = bert.embed({"prompt_token_ids": ids}, use_tqdm=False)[0]
    assert by_ids.outputs.embedding == pytest.approx(out.outputs.embedding, abs=1e-6)
    # Token-id prompts keep their last tokens; -1 means max_model_len.
    cut = bert.embed([ids * 3], truncate_prompt_tokens=10, use_tqdm=False)[0]
    assert cut.prompt_token_ids == (ids * 3)[-10:]
    assert len(bert.embed(long_text, truncate_prompt_tokens=-1, use_tqdm=False)[0].prompt_token_ids) == 128
    with pytest.raises(ValueError, match="greater than max_model_len"):
        bert.embed("hello", truncate_prompt_tokens=500, use_tqdm=False)
    assert_all_blocks_free(bert.llm_engine)


def test_refusals(tiny_llama, st_mean, bert):
    with pytest.raises(ValueError, match="runner='pooling'"):
        bert.generate("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="cannot generate; use runner='pooling'"):
        LLM(st_mean, runner="generate")
    with pytest.raises(ValueError, match="task='classify' is not supported"):
        LLM(st_mean, task="classify")
    with pytest.raises(ValueError, match="pooler_config key.*softmax"):
        LLM(st_mean, pooler_config={"softmax": True})
    with pytest.raises(ValueError, match="contradict"):
        LLM(tiny_llama, runner="generate", task="embed")
    with pytest.raises(ValueError, match="pooling task 'classify'"):
        PoolingParams(task="classify")
    with pytest.raises(ValueError, match="LoRA"):
        bert.embed("hello", lora_request="sql", use_tqdm=False)
    with pytest.raises(ValueError, match="enable_lora cannot be used with runner='pooling'"):
        LLM(st_mean, enable_lora=True)
    generator = LLM(tiny_llama, num_gpu_blocks_override=16)
    try:
        with pytest.raises(ValueError, match="runner='pooling'"):
            generator.embed("hello", use_tqdm=False)
        with pytest.raises(ValueError, match="pooler_config applies to embedding models"):
            LLM(tiny_llama, pooler_config={"pooling_type": "MEAN"})
        assert generator.llm_engine.runner_type == "generate"
        assert_all_blocks_free(generator.llm_engine)
    finally:
        generator.shutdown()
    assert_all_blocks_free(bert.llm_engine)


def test_tensor_parallel_bert_equals_one_rank(st_mean, bert):
    """Two worker processes (column/row-parallel layers, results pickled back) give the same vectors."""
    tp = LLM(st_mean, tensor_parallel_size=2)
    try:
        got = tp.embed(TEXTS, use_tqdm=False)
        ref = bert.embed(TEXTS, use_tqdm=False)
        torch.testing.assert_close(
            torch.tensor([o.outputs.embedding for o in got]), torch.tensor([o.outputs.embedding for o in ref])
        )
        assert_all_blocks_free(tp.llm_engine)
    finally:
        tp.shutdown()
