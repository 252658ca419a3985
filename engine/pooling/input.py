"""Input processing of embedding requests: tokenize (lower-case, truncate), check the length, build the Request."""

from __future__ import annotations

import itertools
import time

from kvloom.engine.input_processor import InputProcessor, PreparedRequest
from kvloom.engine.output_processor import RequestState, SequenceState
from kvloom.engine.outputs import RequestMetrics
from kvloom.engine.pooling.config import PoolingModelConfig
from kvloom.engine.pooling.params import PoolingParams
from kvloom.engine.request import Request


class PoolingInputProcessor:
    """Turns (prompt, PoolingParams) into a prefill-only Request that ends, pooled, once its prompt is computed."""

    def __init__(self, inputs: InputProcessor, config: PoolingModelConfig) -> None:
        self.inputs = inputs
        self.config = config
        self.max_model_len = inputs.max_model_len
        self._ids = itertools.count()

    def prepare_request(
        self, request_id: str | None, prompt, params, arrival_time: float | None = None, lora_request=None
    ) -> PreparedRequest:
        if not isinstance(params, PoolingParams):
            raise ValueError(
                "this engine runs an embedding model (runner='pooling'): it cannot generate text; use "
                "embed() / encode() with PoolingParams, or create an engine with runner='generate' for generation"
            )
        if lora_request is not None:
            raise ValueError("LoRA adapters are not supported for embedding (pooling) requests")
        params = self.config.resolve(params)
        k = params.truncate_prompt_tokens
        if k == -1:
            k = self.max_model_len
        if k is not None and k > self.max_model_len:
            raise ValueError(f"truncate_prompt_tokens ({k}) is greater than max_model_len ({self.max_model_len})")
        text, ids = self._tokenize(prompt, k)
        if not ids:
            raise ValueError("the prompt is empty (it has no tokens)")
        if len(ids) > self.max_model_len:
            raise ValueError(
                f"the input has {len(ids)} tokens, but this embedding model takes at most max_model_len = "
                f"{self.max_model_len}; shorten it or pass truncate_prompt_tokens to cut it"
            )
        request_id = f"embed-{next(self._ids)}" if request_id is None else str(request_id)
        arrival = arrival_time or time.time()
        request = Request(request_id, ids, None, None, 0, arrival, pooling_params=params)
        seq = SequenceState(0, params, None)
        state = RequestState(request_id, text, ids, params, [seq], RequestMetrics(arrival))
        return PreparedRequest(state, [request])

    def _tokenize(self, prompt, k: int | None) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict) and "prompt_token_ids" not in prompt and "prompt" in prompt:
            prompt = prompt["prompt"]
        if not isinstance(prompt, str):
            text, ids = self.inputs.process_prompt(prompt)
            return text, ids[-k:] if k is not None else ids
        if not prompt:
            raise ValueError("the prompt is empty")
        text = prompt.lower() if self.config.do_lower_case else prompt
        ids = self.inputs.encode(text)
        if k is not None and len(ids) > k:
            # The tokenizer's own truncation keeps its special tokens (BERT's [CLS] ... [SEP]), as vLLM does.
            ids = self.inputs.tokenizer.encode(text, truncation=True, max_length=k)
        return prompt, ids
