"""LangChain's VLLMEmbeddings and LlamaIndex's VllmEmbedding on the shared embedding engine, and langchain-tests."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from langchain_tests.integration_tests import EmbeddingsIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import EmbeddingsUnitTests  # noqa: E402

import kvloom  # noqa: E402
from kvloom import PoolingParams  # noqa: E402
from kvloom.integrations.langchain import VLLMEmbeddings  # noqa: E402
from kvloom.integrations.llama_index import VllmEmbedding  # noqa: E402

from kvloom_testing import assert_all_blocks_free  # noqa: E402

TEXTS = ["the quick brown fox", "paris is the capital of france", "hello world", "lazy dog"]


@pytest.fixture(scope="module")
def engine(tiny_bert_st):
    eng = kvloom.get_engine(tiny_bert_st, runner="pooling")
    yield eng
    eng.shutdown()


def reference(engine, text: str) -> list[float]:
    *_, out = engine.stream(text, PoolingParams())
    return out.outputs.data.tolist()


def test_langchain_embeddings_share_the_registry_engine(tiny_bert_st, engine):
    emb = VLLMEmbeddings(model=tiny_bert_st)
    docs = emb.embed_documents(TEXTS)
    assert emb.engine_client is engine  # kvloom.get_engine(model, runner="pooling"): one engine per configuration
    for text, vec in zip(TEXTS, docs):
        assert vec == pytest.approx(reference(engine, text), abs=1e-5)
    assert emb.embed_query(TEXTS[0]) == pytest.approx(docs[0], abs=1e-5)
    np.testing.assert_allclose(asyncio.run(emb.aembed_documents(TEXTS)), docs, atol=1e-5)
    assert asyncio.run(emb.aembed_query(TEXTS[1])) == pytest.approx(docs[1], abs=1e-5)
    assert_all_blocks_free(engine.engine)


def test_llama_index_embedding_shares_the_engine(tiny_bert_st, engine):
    emb = VllmEmbedding(model=tiny_bert_st, embed_batch_size=2)
    vectors = emb.get_text_embedding_batch(TEXTS)
    assert emb.engine_client is engine and emb.model_name == tiny_bert_st
    for text, vec in zip(TEXTS, vectors):
        assert vec == pytest.approx(reference(engine, text), abs=1e-5)
    assert emb.get_query_embedding(TEXTS[2]) == pytest.approx(vectors[2], abs=1e-5)
    assert asyncio.run(emb.aget_query_embedding(TEXTS[3])) == pytest.approx(vectors[3], abs=1e-5)
    np.testing.assert_allclose(asyncio.run(emb.aget_text_embedding_batch(TEXTS)), vectors, atol=1e-5)
    assert_all_blocks_free(engine.engine)


def test_embedding_classes_refuse_bad_settings(tiny_llama, engine):
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        VLLMEmbeddings(model="m", truncate_prompt_tokens=0)
    with pytest.raises(ValueError, match="vllm_kwargs sets dtype"):
        VllmEmbedding(model="m", vllm_kwargs={"dtype": "float32"})
    with pytest.raises(ValueError, match="Extra inputs"):
        VLLMEmbeddings(model="m", temperature=0.5)
    generator = kvloom.AsyncLLM(model=tiny_llama, num_gpu_blocks_override=16)
    try:
        with pytest.raises(ValueError, match="runner='pooling'"):
            VLLMEmbeddings(engine=generator).embed_query("hello")
    finally:
        generator.shutdown()
    with pytest.raises(ValueError, match="does not support matryoshka"):
        VLLMEmbeddings(engine=engine, dimensions=8).embed_query("hello")
    assert_all_blocks_free(engine.engine)


# ---- langchain-tests standard suites -----------------------------------------------------------
class TestVLLMEmbeddingsStandardUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[VLLMEmbeddings]:
        return VLLMEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"model": "kvloom-unit-test-model"}  # unit tests never embed, so no engine is made


class TestVLLMEmbeddingsStandardIntegration(EmbeddingsIntegrationTests):
    model_dir: str = ""

    @pytest.fixture(autouse=True)
    def _tiny(self, tiny_bert_st, engine):
        type(self).model_dir = tiny_bert_st

    @property
    def embeddings_class(self) -> type[VLLMEmbeddings]:
        return VLLMEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"model": self.model_dir}
