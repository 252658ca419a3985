"""Float32 CPU weights packed once at load into the C++ GEMM's panels (the row-major copies dropped)."""

from __future__ import annotations

import pytest
import torch

import kvloom.engine.model_runner as model_runner
from kvloom import LLM, SamplingParams
from kvloom.engine.layers.linear import _Linear
from kvloom.kernels.cpu_ops import load_cpu_ops

from kvloom_testing import build_tiny_model

ops = load_cpu_ops()
pytestmark = pytest.mark.skipif(ops is None or not ops.packed_linear_available(), reason="needs the AVX2 build")


def _model(llm: LLM):
    return llm.llm_engine.executor.worker.runner.model


def _run(llm: LLM, prompts):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    logprobs = [p[t].logprob for prompt, o in zip(prompts, outs) for t, p in zip(prompt[1:], o.prompt_logprobs[1:])]
    return [list(o.outputs[0].token_ids) for o in outs], torch.tensor(logprobs)


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("qwen2", True)])
def test_packed_model_matches_the_row_major_one(tmp_path, monkeypatch, arch, tied):
    # A vocabulary that is not a multiple of 16: the last panel of the head (and of the tied
    # embedding that lookups read from) is partial. Qwen2's q/k/v biases go through the packed path.
    model_dir = build_tiny_model(str(tmp_path), arch, seed=5, vocab_size=389, tie_word_embeddings=tied)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 389, (n,), generator=g).tolist() for n in (3, 17, 60)]

    packed_llm = LLM(model_dir, num_gpu_blocks_override=64)
    model = _model(packed_llm)
    linears = [m for m in model.modules() if isinstance(m, _Linear)]
    assert linears and all(m.weight_packed is not None and not hasattr(m, "weight") for m in linears)
    head = model.logits_head()
    assert head is (model.embed_tokens if tied else model.lm_head)
    assert head.weight_packed is not None and head.weight_packed.shape == (-(-389 // 16), 64, 16)
    if not tied:  # an untied embedding keeps its rows
        assert model.embed_tokens.weight_packed is None and model.embed_tokens.weight.shape == (389, 64)
    got_tokens, got_logprobs = _run(packed_llm, prompts)
    del packed_llm

    monkeypatch.setattr(model_runner, "pack_linear_weights", lambda model, dtype: (0, 0))
    plain_llm = LLM(model_dir, num_gpu_blocks_override=64)
    assert all(m.weight_packed is None for m in _model(plain_llm).modules() if isinstance(m, _Linear))
    want_tokens, want_logprobs = _run(plain_llm, prompts)
    assert got_tokens == want_tokens
    torch.testing.assert_close(got_logprobs, want_logprobs, rtol=1e-4, atol=1e-4)
