"""Input processing, on the caller's side: validate, apply the chat template, tokenize, load the
LoRA adapter and ask for the grammar; the result is a PreparedRequest that the engine queues.

Nothing here touches the engine core, so it runs on any thread (AsyncLLM runs it off the event loop).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from kvloom.engine.detokenizer import IncrementalDetokenizer
from kvloom.engine.lora.adapter import LoRAAdapter
from kvloom.engine.lora.manager import LoRAManager
from kvloom.engine.lora.request import LoRARequest
from kvloom.engine.output_processor import RequestState, SequenceState
from kvloom.engine.outputs import RequestMetrics
from kvloom.engine.request import Request
from kvloom.engine.sampling_params import SamplingParams
from kvloom.engine.structured_output.manager import StructuredOutputManager
from kvloom.engine.structured_output.request import StructuredOutputRequest


@dataclass
class PreparedRequest:
    """A validated, tokenized request ready to be queued."""

    state: RequestState
    requests: list[Request]
    adapter: LoRAAdapter | None = None
    lora_request: LoRARequest | None = None


class InputProcessor:
    """Turns (prompt or messages, SamplingParams, LoRA) into engine Requests, or raises a clear error."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        max_model_len: int,
        max_num_seqs: int,
        eos_token_id: int | None,
        extra_eos: set[int],
        structured_output: StructuredOutputManager,
        lora_manager: LoRAManager | None,
        lockstep: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self._eos_token_id = eos_token_id
        self._extra_eos = extra_eos
        self.structured_output = structured_output
        self.lora_manager = lora_manager
        # Every rank runs the same requests in lockstep under torchrun: nothing may depend on timing.
        self.lockstep = lockstep
        self._ids = itertools.count()

    @property
    def eos_token_ids(self) -> set[int]:
        """The token ids that end a sequence unless ignore_eos (the primary EOS and the generation config's)."""
        return ({self._eos_token_id} if self._eos_token_id is not None else set()) | self._extra_eos

    def process_prompt(self, prompt) -> tuple[str | None, list[int]]:
        """Accept a string, a list of token ids, or vLLM's {"prompt": ...}/{"prompt_token_ids": ...}."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            return prompt, self.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            vocab = self.vocab_size
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
                raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
            return None, ids
        raise TypeError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def prepare_request(
        self,
        request_id: str | None,
        prompt,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        lora_request=None,
    ) -> PreparedRequest:
        """Validate and tokenize a request without touching engine state (safe from any thread)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if params.use_beam_search:
            # Beam search runs in the front end over 1-token requests (kvloom.beam_search).
            raise ValueError(
                "SamplingParams(use_beam_search=True) is not a request the engine runs: call "
                "LLM.beam_search / AsyncLLM.beam_search with BeamSearchParams (the server and the "
                "LangChain/LlamaIndex wrappers do this for use_beam_search)"
            )
        vocab = self.vocab_size
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias token ids must be below the vocabulary size ({vocab})")
        if params.stop_token_ids and max(params.stop_token_ids) >= vocab:
            raise ValueError(f"stop_token_ids must be below the vocabulary size ({vocab})")
        if params.num_samples > self.max_num_seqs:
            raise ValueError(
                f"n (or best_of) is {params.num_samples}, above max_num_seqs ({self.max_num_seqs}); "
                "raise max_num_seqs (--max-num-seqs) to sample more sequences per request"
            )
        adapter = self._load_lora(lora_request)
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        text, ids = self.process_prompt(prompt)
        if params.truncate_prompt_tokens is not None:
            ids = ids[-params.truncate_prompt_tokens :]
        if not ids:
            raise ValueError("the prompt is empty (it has no tokens)")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len}: "
                f"at most {self.max_model_len - 1} prompt tokens leave room for one output token"
            )
        arrival = arrival_time or time.time()
        max_tokens = min(params.max_tokens or self.max_model_len, self.max_model_len - len(ids))
        constraint = params.structured_outputs
        compiled = self.structured_output.compile(constraint) if constraint is not None else None
        num = params.num_samples
        seqs, requests = [], []
        if compiled is not None and self.lockstep:
            compiled.result()  # compile now: a grammar ready on one rank and not another would split the ranks
        for i in range(num):
            if num == 1:
                # A copy: the engine adds to its stop ids, and the caller may reuse its params.
                child = params.clone() if self._extra_eos and not params.ignore_eos else params
            else:
                child = params.clone(
                    n=1,
                    best_of=None,
                    seed=None if params.seed is None else params.seed + i,
                    logprobs=params.logprobs if params.logprobs is not None or not params.best_of else 0,
                )
            if not child.ignore_eos and self._extra_eos:
                child._all_stop_token_ids = child._all_stop_token_ids | self._extra_eos
            seq_id = request_id if num == 1 else f"{request_id}#{i}"
            requests.append(
                Request(
                    seq_id,
                    ids,
                    child,
                    self._eos_token_id,
                    max_tokens,
                    arrival,
                    lora_id=adapter.lora_int_id if adapter is not None else 0,
                    structured_output=StructuredOutputRequest(constraint, compiled) if compiled is not None else None,
                )
            )
            detok = None
            if params.detokenize:
                detok = IncrementalDetokenizer(
                    self.tokenizer, ids, params.skip_special_tokens, params.spaces_between_special_tokens
                )
            seqs.append(SequenceState(i, child, detok, logprobs=[] if params.logprobs is not None else None))
        state = RequestState(request_id, text, ids, params, seqs, RequestMetrics(arrival), lora_request)
        core_lora = LoRARequest(adapter.name, adapter.lora_int_id, adapter.path) if adapter is not None else None
        return PreparedRequest(state, requests, adapter, core_lora)

    def _load_lora(self, lora_request) -> LoRAAdapter | None:
        if lora_request is None:
            return None
        if self.lora_manager is None:
            raise ValueError("LoRA is not enabled: create the engine with enable_lora=True (or --enable-lora)")
        if isinstance(lora_request, str):
            named = self.lora_manager.get_lora_request(lora_request)
            if named is None:
                raise ValueError(f"no LoRA adapter named {lora_request!r} is registered (add it with add_lora)")
            lora_request = named
        return self.lora_manager.load(lora_request)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **kwargs,
    ) -> list[int]:
        """Render a conversation with the model's chat template into prompt token ids."""
        if not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        if getattr(self.tokenizer, "chat_template", None) is None and chat_template is None:
            raise ValueError("this model's tokenizer has no chat template; pass chat_template= or use generate()")
        text = self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
            chat_template=chat_template,
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text; text that is not valid Unicode (a lone surrogate) is a ValueError."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the text cannot be tokenized: {e.reason} at position {e.start}") from None
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
