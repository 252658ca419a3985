"""Shared fixtures: tiny random Llama-family models with a real (small) BPE tokenizer."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KVLOOM_CONFIGURE_LOGGING", "0")
# Triton kernels run on CPUs only through its interpreter, which must be chosen before import.
os.environ.setdefault("TRITON_INTERPRET", "1")

from kvloom_testing import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-qwen2")), arch="qwen2", seed=1)


@pytest.fixture(scope="session")
def tiny_tools(tmp_path_factory) -> str:
    """A tiny Llama whose tokenizer has <tool_call> and </tool_call> as whole tokens (as Qwen2.5's has)."""
    return build_tiny_model(
        str(tmp_path_factory.mktemp("tiny-tools")),
        extra_tokens=("<tool_call>", "</tool_call>"),
        max_position_embeddings=2048,
    )


@pytest.fixture(scope="session")
def tiny_bert_st(tmp_path_factory) -> str:
    """A tiny random BERT as a sentence-transformers directory (mean pooling + Normalize)."""
    from kvloom_testing import build_tiny_bert_st

    return build_tiny_bert_st(str(tmp_path_factory.mktemp("tiny-bert-st")), "mean")
