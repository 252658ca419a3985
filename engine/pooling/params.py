"""PoolingParams: per-request settings of an embedding request (vLLM's `PoolingParams`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

# The pooling tasks kvloom implements (vLLM's names): "embed" pools one vector per prompt, and
# "encode" is vLLM's generic entry point, which for an embedding model is the same vector.
POOLING_TASKS = ("embed", "encode")
POOLING_TYPES = ("CLS", "MEAN", "LAST")


@dataclass
class PoolingParams:
    """How one prompt becomes an embedding.

    dimensions: keep only the first `dimensions` values (Matryoshka models only), then normalize.
    normalize: L2-normalize the vector (None: the engine's pooler config, True unless it says otherwise).
    truncate_prompt_tokens: keep at most this many prompt tokens (-1: max_model_len) instead of refusing
    a prompt that is too long.
    """

    dimensions: int | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None
    task: str | None = None
    # Filled in by the engine from its pooler config (not set by callers).
    pooling_type: str | None = None

    def __post_init__(self) -> None:
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)):
            raise ValueError(f"dimensions must be an integer, got {self.dimensions!r}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be True, False or None, got {self.normalize!r}")
        k = self.truncate_prompt_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or (k < 1 and k != -1)):
            raise ValueError(f"truncate_prompt_tokens must be -1 (max_model_len) or an integer >= 1, got {k!r}")
        if self.task is not None and self.task not in POOLING_TASKS:
            raise ValueError(
                f"pooling task {self.task!r} is not supported; kvloom implements {', '.join(POOLING_TASKS)} "
                "(classify, score and reward models are not served)"
            )
        if self.pooling_type is not None and self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}")

    def clone(self, **changes) -> PoolingParams:
        return replace(self, **changes)
