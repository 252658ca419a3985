"""Which runner an engine uses and how its embedding model pools (vLLM's runner/convert/task and PoolerConfig).

A sentence-transformers directory says how it pools in modules.json (its Pooling module's
config.json and whether a Normalize module follows) and how long its inputs may be in
sentence_bert_config.json; kvloom reads them as vLLM does. Without them an encoder pools its CLS
token and a decoder its last token, both L2-normalized (vLLM's defaults for embedding models).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from kvloom.engine.pooling.params import POOLING_TYPES, PoolingParams

RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed")
# vLLM's older `task` values that kvloom runs, and the runner each means.
TASKS = {"auto": None, "generate": "generate", "embed": "pooling", "embedding": "pooling"}

# sentence-transformers Pooling modes and vLLM's pooling type for each (None: not implemented);
# older files set one boolean key per mode (the second names), newer ones name it in "pooling_mode".
_ST_MODES = {
    "cls": "CLS",
    "mean": "MEAN",
    "lasttoken": "LAST",
    "max": None,
    "mean_sqrt_len_tokens": None,
    "weightedmean": None,
}
_ST_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
_ST_MODULES = ("Transformer", "Pooling", "Normalize")


def resolve_runner(runner: str, convert: str, task: str | None, architecture: str, is_encoder: bool) -> str:
    """The runner ("generate" or "pooling") for these engine arguments and this model; the rest raises."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    if convert not in CONVERTS:
        raise ValueError(
            f"convert={convert!r} is not supported; kvloom implements convert='embed' (and 'auto', 'none')"
        )
    if task is not None and task not in TASKS:
        raise ValueError(
            f"task={task!r} is not supported; kvloom implements task='generate' and task='embed' "
            "(or runner='generate' / runner='pooling')"
        )
    wanted = {r for r in (TASKS.get(task), "pooling" if convert == "embed" else None) if r is not None}
    if runner != "auto":
        wanted.add(runner)
    if len(wanted) > 1:
        raise ValueError(f"runner={runner!r}, convert={convert!r} and task={task!r} contradict each other")
    chosen = wanted.pop() if wanted else ("pooling" if is_encoder else "generate")
    if chosen == "generate" and is_encoder:
        raise ValueError(f"{architecture} is an encoder-only embedding model and cannot generate; use runner='pooling'")
    if chosen == "pooling" and convert == "none" and not is_encoder:
        raise ValueError(
            f"convert='none' keeps {architecture} generative; runner='pooling' needs convert='embed' or 'auto'"
        )
    return chosen


def load_pooling_config(args, model_name: str, model_dir: str, hf_config: dict, arch) -> PoolingModelConfig | None:
    """The pooling config of an engine whose runner is "pooling" (None for a generating engine).

    args are the EngineArgs; arch the model's ArchConfig. Settings a pooling engine cannot honour raise.
    """
    runner = resolve_runner(args.runner, args.convert, args.task, arch.architecture, arch.is_encoder)
    user = PoolerConfig.from_user(args.pooler_config)
    override = PoolerConfig.from_user(args.override_pooler_config, "override_pooler_config")
    if user is not None and override is not None:
        raise ValueError("give pooler_config or override_pooler_config (its older name), not both")
    user = user or override
    if runner == "generate":
        if user is not None:
            raise ValueError("pooler_config applies to embedding models: use it with runner='pooling'")
        return None
    refused = [
        (args.enable_lora, "enable_lora", "LoRA adapters"),
        (args.speculative_config is not None, "speculative_config", "speculative decoding"),
        (
            arch.is_encoder and (args.quantization is not None or "quantization_config" in hf_config),
            "quantization",
            "quantized encoder weights",
        ),
    ]
    for is_set, name, what in refused:
        if is_set:
            raise ValueError(f"{name} cannot be used with runner='pooling' ({what}: not implemented for embeddings)")
    return PoolingModelConfig.load(model_name, model_dir, hf_config, arch.hidden_size, arch.is_encoder, user)


@dataclass(frozen=True)
class PoolerConfig:
    """vLLM's PoolerConfig fields that kvloom implements: how hidden states become one vector."""

    pooling_type: str | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.pooling_type is not None and self.pooling_type not in POOLING_TYPES:
            raise ValueError(
                f"pooler_config.pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}"
            )
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"pooler_config.normalize must be true or false, got {self.normalize!r}")

    @classmethod
    def from_user(cls, value, name: str = "pooler_config") -> PoolerConfig | None:
        """Parse a PoolerConfig, a dict or a JSON string; keys kvloom does not implement raise."""
        if value is None or isinstance(value, PoolerConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"{name} is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a dict, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{name} key(s) not supported: {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
        cfg = dict(value)
        if isinstance(cfg.get("pooling_type"), str):
            cfg["pooling_type"] = cfg["pooling_type"].upper()
        return cls(**cfg)

    def over(self, base: PoolerConfig) -> PoolerConfig:
        """This config's set fields over base's."""
        return PoolerConfig(
            self.pooling_type if self.pooling_type is not None else base.pooling_type,
            self.normalize if self.normalize is not None else base.normalize,
        )


@dataclass(frozen=True)
class PoolingModelConfig:
    """Everything the front end needs to turn a PoolingParams into what the runner computes."""

    model_name: str
    pooler: PoolerConfig
    hidden_size: int
    is_matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] | None = None
    # sentence_bert_config.json: the longest input and whether text is lower-cased first.
    max_seq_length: int | None = None
    do_lower_case: bool = False

    @classmethod
    def load(
        cls, model_name: str, model_dir: str, hf_config: dict, hidden_size: int, is_encoder: bool, user=None
    ) -> PoolingModelConfig:
        default = PoolerConfig("CLS" if is_encoder else "LAST", True)
        st_pooler, st_config = read_sentence_transformers(Path(model_dir))
        pooler = (st_pooler or PoolerConfig()).over(default)
        if user is not None:
            pooler = user.over(pooler)
        dims = hf_config.get("matryoshka_dimensions")
        return cls(
            model_name,
            pooler,
            hidden_size,
            bool(dims) or bool(hf_config.get("is_matryoshka", False)),
            tuple(dims) if dims else None,
            st_config.get("max_seq_length"),
            bool(st_config.get("do_lower_case", False)),
        )

    def max_model_len(self, requested: int | None) -> int | None:
        """The engine's max_model_len: a sentence-transformers model's max_seq_length bounds it (vLLM's rule)."""
        limit = self.max_seq_length
        if limit is None:
            return requested
        if requested is not None and requested > limit:
            raise ValueError(
                f"max_model_len ({requested}) exceeds this model's max_seq_length ({limit}, sentence_bert_config.json)"
            )
        return requested or limit

    def resolve(self, params: PoolingParams | None) -> PoolingParams:
        """A request's params with the pooler's defaults filled in; a `dimensions` the model cannot give raises."""
        params = params or PoolingParams()
        if not isinstance(params, PoolingParams):
            raise TypeError(f"pooling params must be PoolingParams, got {type(params).__name__}")
        if params.pooling_type is not None:
            raise ValueError("pooling_type is set by the engine's pooler_config, not per request")
        dims = params.dimensions
        if dims is not None:
            # vLLM's rule: only Matryoshka models (is_matryoshka / matryoshka_dimensions in config.json).
            if not self.is_matryoshka:
                raise ValueError(
                    f'Model "{self.model_name}" does not support matryoshka representation, '
                    "changing output dimensions will lead to poor results."
                )
            if self.matryoshka_dimensions is not None and dims not in self.matryoshka_dimensions:
                raise ValueError(
                    f'Model "{self.model_name}" only supports {list(self.matryoshka_dimensions)} matryoshka '
                    "dimensions, use other output dimensions will lead to poor results."
                )
            if not 1 <= dims <= self.hidden_size:
                raise ValueError(f"dimensions must be between 1 and the model's {self.hidden_size}, got {dims}")
        normalize = params.normalize if params.normalize is not None else self.pooler.normalize
        return params.clone(normalize=normalize, pooling_type=self.pooler.pooling_type)


def read_sentence_transformers(model_dir: Path) -> tuple[PoolerConfig | None, dict]:
    """The pooling of a sentence-transformers directory and its sentence_bert_config (None, {} elsewhere)."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return None, {}
    modules = json.loads(modules_file.read_text())
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unsupported = sorted({k for k in kinds if k not in _ST_MODULES})
    if unsupported:
        raise ValueError(
            f"sentence-transformers module(s) {', '.join(unsupported)} in {modules_file} are not supported; "
            f"kvloom reproduces {', '.join(_ST_MODULES)}"
        )
    pooler = None
    pooling = next((m for m in modules if str(m.get("type", "")).endswith(".Pooling")), None)
    if pooling is not None:
        pooling_cfg = json.loads((model_dir / pooling["path"] / "config.json").read_text())
        modes = pooling_cfg.get("pooling_mode")
        if modes is None:
            modes = [mode for key, mode in _ST_LEGACY_KEYS.items() if pooling_cfg.get(key) is True]
        modes = [modes] if isinstance(modes, str) else list(modes)
        types = [_ST_MODES.get(m) for m in modes]
        if len(types) != 1 or types[0] is None:
            raise ValueError(
                f"the sentence-transformers pooling mode {modes or 'none'} is not supported; kvloom implements "
                "one of cls, mean, lasttoken"
            )
        pooler = PoolerConfig(types[0], "Normalize" in kinds)
    st_file = model_dir / "sentence_bert_config.json"
    st_config = json.loads(st_file.read_text()) if st_file.is_file() else {}
    return pooler, st_config
