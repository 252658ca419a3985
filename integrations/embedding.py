"""What the LangChain and LlamaIndex embedding classes share: their fields and the shared embedding engine.

The engine is `kvloom.get_engine(model, runner="pooling", dtype=..., **vllm_kwargs)`: one per
configuration in the process, so every embedder of that model (and a `kvloom serve` of it with the
same arguments) shares its weights, and concurrent texts are batched together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from kvloom import EmbeddingRequestOutput, PoolingParams
from kvloom.integrations.common import arun_batch, local_engine_client, run_batch

_ENGINE_FIELDS = ("dtype", "trust_remote_code", "tensor_parallel_size", "download_dir")


class KvloomEmbeddingParams(BaseModel):
    """The fields of kvloom's embedding classes: the model and engine arguments, and per-text PoolingParams.

    `model` is an embedding model (a BERT/sentence-transformers directory or hub id) or a decoder,
    which pools its last token (`vllm_kwargs={"pooler_config": {...}}` changes that); `engine` may
    be an existing `AsyncLLM` or `kvloom.LLM` of an embedding model instead (also accepted as `llm`
    or `client`). `dimensions` shortens the vectors of Matryoshka models.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    model: str | None = None
    tensor_parallel_size: int | None = 1
    trust_remote_code: bool | None = False
    dtype: str = "auto"
    download_dir: str | None = None
    vllm_kwargs: dict[str, Any] = Field(default_factory=dict)
    dimensions: int | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None
    timeout: float | None = Field(default=None, gt=0)
    """Seconds a call may take; requests still running then are aborted and TimeoutError raised."""
    engine: Any = Field(default=None, exclude=True, validation_alias=AliasChoices("engine", "llm", "client"))

    _engine_client: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self) -> KvloomEmbeddingParams:
        self._pooling_params()  # bad values fail here, naming the field
        clash = sorted(set(_ENGINE_FIELDS) & set(self.vllm_kwargs))
        if clash:
            raise ValueError(f"vllm_kwargs sets {', '.join(clash)}: pass it as its own field instead")
        return self

    @property
    def engine_client(self):
        """The AsyncLLM of the embedding model (the shared engine, created on first use)."""
        if self._engine_client is None:
            runner = {} if {"runner", "task", "convert"} & set(self.vllm_kwargs) else {"runner": "pooling"}
            self._engine_client = local_engine_client(self, **runner)
            if self._engine_client.runner_type != "pooling":
                raise ValueError(
                    f"{self._engine_client.model_name} runs a generating engine; an embedding class needs an "
                    "engine created with runner='pooling'"
                )
        return self._engine_client

    def _pooling_params(self) -> PoolingParams:
        return PoolingParams(self.dimensions, self.normalize, self.truncate_prompt_tokens, task="embed")

    def _new_id(self) -> str:
        import uuid

        return f"embed-{uuid.uuid4().hex}"

    def _embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text; all texts are in the engine at once, so they are batched."""
        outs = run_batch(self.engine_client, list(texts), self._pooling_params(), None, self._new_id, self.timeout)
        return [EmbeddingRequestOutput.from_base(o).outputs.embedding for o in outs]

    async def _aembed(self, texts: Sequence[str]) -> list[list[float]]:
        """The async form of _embed (never blocks the event loop)."""
        outs = await arun_batch(
            self.engine_client, list(texts), self._pooling_params(), None, self._new_id, self.timeout
        )
        return [EmbeddingRequestOutput.from_base(o).outputs.embedding for o in outs]
