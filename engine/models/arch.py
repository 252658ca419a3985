"""The architecture facts kvloom needs, read from a model's config.json."""

from __future__ import annotations

from dataclasses import dataclass

from kvloom.engine.layers.rotary import SUPPORTED_ROPE_TYPES

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "BertModel",
)


@dataclass(frozen=True)
class ArchConfig:
    """Shape of a Llama-family decoder."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None
    # Mixture of experts (Mixtral, Qwen2-MoE); num_experts == 0 for dense models.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[int, ...] = ()  # indices of the layers whose MLP is a sparse MoE block
    # Per-layer sliding window (None: full attention); () when no layer has one.
    sliding_windows: tuple[int | None, ...] = ()
    partial_rotary_factor: float = 1.0  # share of each head's dimensions that rotary rotates (Phi-3)
    # Gemma 2 / 3.
    hidden_act: str = "silu"
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power when set
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    local_rope_theta: float | None = None  # rope base of sliding-window layers (Gemma 3)
    # Encoder-only embedding models (BERT): bidirectional attention within one step, no KV cache.
    is_encoder: bool = False
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-12

    def sliding_window_of(self, layer_idx: int) -> int | None:
        """The sliding window of a layer, None when it attends to the whole context."""
        return self.sliding_windows[layer_idx] if self.sliding_windows else None

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ArchConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported model architecture {archs or cfg.get('model_type')!r}; kvloom supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if arch == "BertModel":
            return cls(**_bert_fields(cfg))
        if cfg.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        # transformers 5 keeps rope settings in rope_parameters; older configs use rope_theta/rope_scaling.
        rope_params = cfg.get("rope_parameters") or {}
        local_rope = None
        if "full_attention" in rope_params or "sliding_attention" in rope_params:
            # Per layer type (Gemma 3 in transformers 5): global layers' rope here, local ones' below.
            rope_params, local_rope = rope_params.get("full_attention") or {}, rope_params.get("sliding_attention")
        rope = dict(rope_params or cfg.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        partial_rotary_factor = float(rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        num_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_size=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope if rope_type != "default" else None,
            max_position=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", arch in _GEMMA),  # Gemma configs may omit it
            attention_bias=arch == "Qwen2ForCausalLM"
            or (arch == "Qwen2MoeForCausalLM" and cfg.get("qkv_bias", True))
            or (arch != "Phi3ForCausalLM" and cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            **_moe_fields(arch, cfg),
            **_dense_variant_fields(arch, cfg, local_rope, partial_rotary_factor),
        )


def _moe_fields(arch: str, cfg: dict) -> dict:
    """The mixture-of-experts fields of ArchConfig for Mixtral and Qwen2-MoE (none for dense models)."""
    if arch not in ("MixtralForCausalLM", "Qwen2MoeForCausalLM"):
        return {}
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={cfg['hidden_act']!r} is not supported for {arch}; only 'silu' is")
    layers = range(cfg["num_hidden_layers"])
    if arch == "MixtralForCausalLM":
        num_experts, size, renorm, shared = cfg["num_local_experts"], cfg["intermediate_size"], True, 0
        moe_layers = tuple(layers)
    else:
        num_experts, size = cfg.get("num_experts", 0), cfg["moe_intermediate_size"]
        renorm, shared = bool(cfg.get("norm_topk_prob", False)), cfg.get("shared_expert_intermediate_size", 0)
        dense, step = set(cfg.get("mlp_only_layers") or ()), cfg.get("decoder_sparse_step", 1)
        moe_layers = tuple(i for i in layers if num_experts > 0 and i not in dense and (i + 1) % step == 0)
    top_k = cfg["num_experts_per_tok"]
    if moe_layers and not 1 <= top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok ({top_k}) must be between 1 and the number of experts ({num_experts})")
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=size,
        norm_topk_prob=renorm,
        shared_expert_intermediate_size=shared,
        moe_layers=moe_layers,
    )


_GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
# Architectures whose sliding window (when set) covers every layer, as their HF models apply it.
_WINDOW_ON_ALL_LAYERS = ("MistralForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM")


def _layer_windows(arch: str, cfg: dict, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention) as the HF model picks it; () when none has one."""
    window = cfg.get("sliding_window", 4096 if arch in _GEMMA else None)  # transformers' Gemma default
    types = cfg.get("layer_types")
    if types is not None:
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(f"layer_types {unknown} are not supported; only full_attention and sliding_attention")
        if len(types) != num_layers:
            raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
    elif arch in _WINDOW_ON_ALL_LAYERS:
        types = ["sliding_attention"] * num_layers
    elif arch == "Gemma2ForCausalLM":
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    elif arch == "Gemma3ForCausalLM":
        pattern = cfg.get("sliding_window_pattern", 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    elif cfg.get("use_sliding_window"):  # Qwen2 / Qwen3: the layers from max_window_layers on
        first = cfg.get("max_window_layers", num_layers)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    else:
        types = ["full_attention"] * num_layers
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM") and not cfg.get("use_sliding_window"):
        window = None  # their HF configs drop sliding_window unless use_sliding_window is set
    if arch in _GEMMA and not window:
        # Their sliding layers also differ in rope base (Gemma 3), which windows mark here.
        raise ValueError(f"{arch} needs a sliding_window in its config")
    if not window:
        return ()
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window must be a positive integer, got {window!r}")
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    if any(windows) and arch in ("MixtralForCausalLM", "Qwen2MoeForCausalLM"):
        # The windowed attention is Llama's, but no test has covered it with experts yet.
        if window < cfg.get("max_position_embeddings", 0):
            raise ValueError(f"sliding-window attention is not supported for {arch} yet; use a model without it")
        return ()
    return windows if any(windows) else ()


def _dense_variant_fields(arch: str, cfg: dict, local_rope: dict | None, partial_rotary_factor: float) -> dict:
    """Sliding windows, partial rotary and the Gemma 2 / 3 fields of ArchConfig."""
    fields: dict = {"sliding_windows": _layer_windows(arch, cfg, cfg["num_hidden_layers"])}
    if not 0.0 < partial_rotary_factor <= 1.0:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {partial_rotary_factor}")
    fields["partial_rotary_factor"] = partial_rotary_factor
    if arch not in _GEMMA:
        act = cfg.get("hidden_act", "silu")
        if arch in ("Qwen3ForCausalLM", "Phi3ForCausalLM") and act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported for {arch}; only 'silu' is")
        return fields
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"hidden_activation={act!r} is not supported for {arch}; only 'gelu_pytorch_tanh' is")
    if cfg.get("use_bidirectional_attention"):
        raise ValueError(f"use_bidirectional_attention=True is not supported for {arch}")
    # Absent keys take transformers' defaults (Gemma 2: 50 and 30); null means no cap.
    gemma2 = arch == "Gemma2ForCausalLM"
    attn_cap = cfg.get("attn_logit_softcapping", 50.0 if gemma2 else None)
    final_cap = cfg.get("final_logit_softcapping", 30.0 if gemma2 else None)
    if arch == "Gemma3ForCausalLM":
        if attn_cap is not None:
            # transformers' Gemma 3 does not apply it either; refuse rather than guess.
            raise ValueError("attn_logit_softcapping is not supported for Gemma3ForCausalLM; set it to null")
        local = dict(local_rope or {})
        fields["local_rope_theta"] = float(local.pop("rope_theta", cfg.get("rope_local_base_freq", 10000.0)))
        local_type = local.get("rope_type", local.get("type", "default"))
        if local_type != "default":
            raise ValueError(f"rope type {local_type!r} of sliding-window layers is not supported; only 'default'")
    return fields | {
        "hidden_act": act,
        "query_pre_attn_scalar": float(cfg.get("query_pre_attn_scalar", 256)),
        "attn_logit_softcap": None if attn_cap is None else float(attn_cap),
        "final_logit_softcap": None if final_cap is None else float(final_cap),
    }


def _bert_fields(cfg: dict) -> dict:
    """ArchConfig of a BERT encoder (BertModel: all-MiniLM, bge, e5): absolute positions, post-LayerNorm."""
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"position_embedding_type={cfg['position_embedding_type']!r} is not supported; only 'absolute'"
        )
    act = cfg.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
        raise ValueError(f"hidden_act={act!r} is not supported for BertModel; gelu, gelu_new and relu are")
    num_heads = cfg["num_attention_heads"]
    return dict(
        architecture="BertModel",
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_size=cfg["hidden_size"] // num_heads,
        rms_norm_eps=0.0,
        rope_theta=0.0,
        rope_scaling=None,
        max_position=cfg.get("max_position_embeddings", 512),
        tie_word_embeddings=False,
        attention_bias=True,
        bos_token_id=None,
        eos_token_ids=(),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        hidden_act=act,
        is_encoder=True,
        type_vocab_size=cfg.get("type_vocab_size", 2),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
    )
