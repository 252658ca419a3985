"""Helpers shared by the tests: tiny random Llama-family models and engine invariants."""

from __future__ import annotations

import contextlib

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "Continuous batching lets new requests join while others decode.",
    "Hello world! What is the capital of France? Paris is the capital.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
] * 20


def build_tokenizer(path: str, vocab_size: int = 384, extra_tokens: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer trained on a small corpus, saved as HF files.

    extra_tokens are added as whole (non-special) tokens, as Qwen2.5 has <tool_call>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    if extra_tokens:
        fast.add_tokens(list(extra_tokens))
    fast.save_pretrained(path)
    return fast


def build_tiny_model(
    path: str, arch: str = "llama", seed: int = 0, extra_tokens: tuple[str, ...] = (), **overrides
) -> str:
    """A small random model whose logits are peaked enough for stable greedy comparisons."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer(path, extra_tokens=extra_tokens)
    common = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.15,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    torch.manual_seed(seed)
    if arch == "qwen2":
        cfg = Qwen2Config(**common)
        model = Qwen2ForCausalLM(cfg)
        with torch.no_grad():
            for layer in model.model.layers:  # non-zero biases so the bias path matters
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.3)
    else:
        cfg = LlamaConfig(**common)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    return path


def assert_all_blocks_free(engine) -> None:
    """No request holds a block once a workload is done (cached blocks count as free)."""
    kv = engine.kv_cache_manager
    assert not engine.has_unfinished_requests()
    assert not kv.req_blocks, f"blocks still held by {list(kv.req_blocks)}"
    assert kv.num_free_blocks == kv.pool.num_usable_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks[1:])


def build_peft_adapter(
    base_dir: str,
    out_dir: str,
    r: int = 8,
    alpha: int = 16,
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    seed: int = 0,
    use_rslora: bool = False,
    scale: float = 1.0,
) -> str:
    """A real PEFT LoRA adapter over base_dir with random, non-zero A and B, saved with save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora, init_lora_weights=False
    )
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale / p.shape[-1] ** 0.5)
    model.save_pretrained(out_dir)
    return out_dir


def peft_greedy(base_dir: str, adapter_dir: str | None, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation of prompt by transformers (+ the PEFT adapter), float32, EOS ignored."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def assert_no_lora_pins(engine) -> None:
    """No finished request still pins an adapter."""
    if engine.lora_manager is not None:
        assert engine.lora_manager.num_pinned == 0, engine.lora_manager._pins


@contextlib.contextmanager
def record_steps(engine, hold=None):
    """Record each engine step as {request id: LoRA id} of the requests it computes.

    hold(step_index), if given, runs on the engine thread before each step (a test can pause the
    engine there). The LLMEngine's scheduler is wrapped for the duration of the block.
    """
    steps: list[dict[str, int]] = []
    lora_ids: dict[str, int] = {}
    schedule = engine.scheduler.schedule

    def recording_schedule():
        if hold is not None:
            hold(len(steps))
        out = schedule()
        for new in out.new_requests:
            lora_ids[new.req_id] = new.lora_id
        if out.seqs:
            steps.append({s.req_id: lora_ids.get(s.req_id, 0) for s in out.seqs})
        return out

    engine.scheduler.schedule = recording_schedule
    try:
        yield steps
    finally:
        del engine.scheduler.schedule


def wait_idle(engine, timeout: float = 10.0) -> None:
    """Wait until the engine behind an AsyncLLM has no request left (aborts are applied by its loop)."""
    import time

    deadline = time.monotonic() + timeout
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.has_unfinished_requests(), "the engine still has requests"


def greedy(engine, prompt, lora=None, n: int = 12):
    """The final RequestOutput of a greedy, EOS-ignoring request made on an AsyncLLM directly."""
    from kvloom import SamplingParams

    *_, final = engine.stream(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), lora_request=lora)
    return final


def add_test_adapters(engine, base_dir: str, root, seed: int) -> dict[str, str]:
    """Build two PEFT adapters over base_dir ("sql": rank 8 on every projection, "poet": rank 4 on
    q/v) under root, register them on the engine as ids 1 and 2, and return their paths."""
    from kvloom import LoRARequest

    paths = {
        "sql": build_peft_adapter(base_dir, f"{root}/sql", r=8, seed=seed),
        "poet": build_peft_adapter(base_dir, f"{root}/poet", r=4, targets=("q_proj", "v_proj"), seed=seed + 1),
    }
    for lora_id, (name, path) in enumerate(paths.items(), 1):
        engine.add_lora(LoRARequest(name, lora_id, path))
    return paths


# ---- the reliability suite's live server ---------------------------------------------------------
RELIABILITY_KEY = "reliability-key"
RELIABILITY_MODEL = "tiny"


def assert_openai_error(r, status: int) -> dict:
    """r is an error response in OpenAI's shape with this status; returns its `error` object."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["code"] == status
    return error


def normal_request_works(http) -> None:
    """A plain completion through an httpx client of the reliability server still succeeds."""
    body = {"model": RELIABILITY_MODEL, "prompt": "Hello", "max_tokens": 3, "ignore_eos": True}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


_BERT_WORDS = (
    "the quick brown fox jumps over lazy dog paged attention stores keys and values in blocks "
    "continuous batching lets new requests join while others decode hello world what is capital of france paris"
).split()


def build_tiny_bert_st(path: str, pooling: str = "mean", normalize: bool = True, seed: int = 0, **overrides) -> str:
    """A tiny random BERT saved as a sentence-transformers directory (Transformer + Pooling [+ Normalize])."""
    import os

    import torch
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    os.makedirs(path, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters), *_BERT_WORDS]
    vocab_file = os.path.join(path, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(dict.fromkeys(vocab)))
    cfg = dict(
        vocab_size=len(dict.fromkeys(vocab)),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=0.2,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    bert_dir = os.path.join(path, "bert")
    BertModel(BertConfig(**cfg)).save_pretrained(bert_dir)
    BertTokenizerFast(vocab_file).save_pretrained(bert_dir)
    modules = [Transformer(bert_dir), Pooling(cfg["hidden_size"], pooling)]
    if normalize:
        modules.append(Normalize())
    out = os.path.join(path, "st")
    SentenceTransformer(modules=modules, device="cpu").save(out)
    return out


def served_openai_fixtures(model_name: str, **client_kwargs):
    """Module-scoped `server` (kvloom.serve over the module's `engine` fixture) and `client` (openai.OpenAI).

    Use as `server, client = served_openai_fixtures("tiny")` at module level.
    """
    import openai
    import pytest

    import kvloom

    @pytest.fixture(scope="module")
    def server(engine):
        with kvloom.serve(engine, served_model_name=model_name) as handle:
            yield handle

    @pytest.fixture(scope="module")
    def client(server):
        return openai.OpenAI(base_url=server.base_url, api_key="unused", **client_kwargs)

    return server, client
