"""Beam search in the front end over the engine, as vLLM runs it, scored as transformers scores it.

Each step sends every live beam of every prompt to the engine at once as a 1-token request that
asks for the log-probabilities of its best `max(2 * beam_width, beam_width + number of EOS ids)`
next tokens. The engine batches them, and its prefix cache keeps the blocks of the shared prompt
and beam prefixes, so a step recomputes little more than each beam's last partial block.

What is computed is transformers' beam search (`generate(num_beams=beam_width, do_sample=False,
length_penalty=..., early_stopping=..., max_new_tokens=max_tokens)`, transformers 5.x), to the
floating-point noise of the two models:
- every step ranks the candidates of all live beams by cumulative log-probability; the best
  `beam_width` that do not end become the new live beams;
- a candidate ends with an EOS token (unless ignore_eos) or when it reaches max_tokens (capped at
  max_model_len - prompt length). An ended candidate is kept only if it ranks among the step's best
  `beam_width` candidates, scored `cum_logprob / num_generated_tokens ** length_penalty` (the EOS
  token counted), and only the best `beam_width` ended sequences are kept;
- the search stops at max_tokens, or earlier as transformers' `early_stopping` says (see
  BeamSearchParams); the result is the ended sequences, best score first.

vLLM's own search differs from transformers (and from kvloom) in three ways: it divides by the
length of the prompt and output together, EOS excluded; it keeps every EOS candidate of a step, not
only those among the best beam_width; and it always runs max_tokens steps. With length_penalty=0 and
no EOS reached, both find the same sequences with the same scores.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvloom.engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from kvloom.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from kvloom.engine.sampling_params import MAX_LOGPROBS, RequestOutputKind, SamplingParams

__all__ = ["BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence", "beam_search_async", "open_beam_search"]

Candidates = dict[int, Logprob]
_CONTEXT_TOKENS = 5  # prompt tokens decoded with the output, so its first characters decode as in context


@dataclass(eq=False)
class _Beam:
    tokens: list[int]
    cum_logprob: float = 0.0
    logprobs: list[Candidates] = field(default_factory=list)


@dataclass(eq=False)
class _Ended:
    beam: _Beam
    score: float
    finish_reason: str
    stop_reason: int | None


class BeamSearchInstance:
    """The beams of one prompt: fed the candidates of every live beam, one step at a time."""

    def __init__(
        self, prompt_token_ids: list[int], params: BeamSearchParams, eos_ids: set[int], max_tokens: int, lora=None
    ) -> None:
        self.params = params
        self.eos_ids = set() if params.ignore_eos else set(eos_ids)
        self.max_tokens = max_tokens
        self.lora_request = lora
        self.num_prompt_tokens = len(prompt_token_ids)
        self.live = [_Beam(list(prompt_token_ids))]
        self.ended: list[_Ended] = []
        self.num_generated = 0
        self.improvable = True  # transformers' early-stop heuristic is not yet satisfied
        self.done = False

    def step(self, candidates: Sequence[Candidates]) -> None:
        """Advance by one token; candidates[i] are live beam i's best next tokens with their log-probs."""
        p, width = self.params, self.params.beam_width
        pool = [
            (beam.cum_logprob + lp.logprob, i, token_id)
            for i, (beam, cands) in enumerate(zip(self.live, candidates))
            for token_id, lp in cands.items()
        ]
        pool.sort(key=lambda c: -c[0])  # stable: ties keep beam and candidate order
        last = self.num_generated + 1 >= self.max_tokens
        length = (self.num_generated + 1) ** p.length_penalty
        accept_ended = self.improvable and not (p.early_stopping is True and len(self.ended) == width)
        live: list[_Beam] = []
        for rank, (cum, i, token_id) in enumerate(pool):
            is_eos = token_id in self.eos_ids
            if not (last or is_eos):
                if len(live) < width:
                    live.append(self._extend(i, token_id, cum, candidates[i]))
            elif rank < width and accept_ended:
                beam = self._extend(i, token_id, cum, candidates[i])
                reason, stop = ("stop", token_id) if is_eos else ("length", None)
                self.ended.append(_Ended(beam, cum / length, reason, stop))
        self.ended.sort(key=lambda e: -e.score)
        del self.ended[width:]
        self.live = [] if last else live
        self.num_generated += 1
        if self.live and len(self.ended) == width:
            never = p.early_stopping == "never" and p.length_penalty > 0
            best_length = self.max_tokens if never else self.num_generated
            best_possible = self.live[0].cum_logprob / best_length**p.length_penalty
            self.improvable = self.improvable and best_possible > self.ended[-1].score
        full = p.early_stopping is True and len(self.ended) == width
        self.done = last or not self.improvable or full

    def _extend(self, i: int, token_id: int, cum: float, cands: Candidates) -> _Beam:
        beam = self.live[i]
        return _Beam(beam.tokens + [token_id], cum, beam.logprobs + [cands])

    def output(self, tokenizer) -> BeamSearchOutput:
        """The ended sequences, best first; text is the prompt and output decoded together."""
        sequences = []
        for e in self.ended:
            tokens = e.beam.tokens
            sequences.append(
                BeamSearchSequence(
                    tokens=tokens,
                    logprobs=e.beam.logprobs,
                    lora_request=self.lora_request,
                    cum_logprob=e.beam.cum_logprob,
                    text=tokenizer.decode(self._visible(tokens), skip_special_tokens=True)
                    + self._eos_text(e, tokenizer),
                    finish_reason=e.finish_reason,
                    stop_reason=e.stop_reason,
                    score=e.score,
                    num_prompt_tokens=self.num_prompt_tokens,
                )
            )
        return BeamSearchOutput(sequences)

    def _visible(self, tokens: list[int]) -> list[int]:
        """The tokens whose text is shown: an ending EOS only with include_stop_str_in_output (added apart)."""
        return tokens[:-1] if len(tokens) > self.num_prompt_tokens and tokens[-1] in self.eos_ids else tokens

    def _eos_text(self, ended: _Ended, tokenizer) -> str:
        if ended.finish_reason == "stop" and self.params.include_stop_str_in_output:
            return tokenizer.decode([ended.stop_reason])
        return ""

    def output_text(self, seq: BeamSearchSequence, tokenizer) -> str:
        """The generated text alone (decoded after a few prompt tokens, as generate() decodes it)."""
        context = seq.tokens[max(0, self.num_prompt_tokens - _CONTEXT_TOKENS) : self.num_prompt_tokens]
        shown = self._visible(seq.tokens)[self.num_prompt_tokens :]
        prefix = tokenizer.decode(context, skip_special_tokens=True)
        full = tokenizer.decode(context + shown, skip_special_tokens=True)
        text = full[len(prefix) :] if full.startswith(prefix) else tokenizer.decode(shown, skip_special_tokens=True)
        if seq.finish_reason == "stop" and self.params.include_stop_str_in_output:
            text += tokenizer.decode([seq.stop_reason])
        return text


# ---- the search loop, shared by every driver -----------------------------------------------------
Batch = list[tuple[dict, Any]]  # (TokensPrompt, LoRA) of each live beam


def _search(instances: list[BeamSearchInstance]) -> Generator[Batch, list[Candidates], None]:
    """Yields each step's batch of 1-token requests and is sent their candidates, in the same order."""
    while True:
        active = [inst for inst in instances if not inst.done]
        if not active:
            return
        batch = [({"prompt_token_ids": b.tokens}, inst.lora_request) for inst in active for b in inst.live]
        results = yield batch
        start = 0
        for inst in active:
            count = len(inst.live)
            inst.step(results[start : start + count])
            start += count


def step_params(params: BeamSearchParams, eos_ids: set[int]) -> SamplingParams:
    """The 1-token request each live beam sends per step (ValueError if it needs too many log-probs)."""
    if not isinstance(params, BeamSearchParams):
        raise TypeError(f"params must be BeamSearchParams, got {type(params).__name__}")
    num_eos = 0 if params.ignore_eos else len(eos_ids)
    wanted = max(2 * params.beam_width, params.beam_width + num_eos)
    if wanted > MAX_LOGPROBS:
        limit = next(w for w in range(MAX_LOGPROBS, 0, -1) if max(2 * w, w + num_eos) <= MAX_LOGPROBS)
        raise ValueError(
            f"BeamSearchParams.beam_width={params.beam_width} needs the {wanted} most likely next tokens of each "
            f"beam per step, above the {MAX_LOGPROBS} log-probabilities a request may return: use beam_width <= {limit}"
        )
    return SamplingParams(
        max_tokens=1,
        temperature=0.0,
        logprobs=wanted,
        ignore_eos=True,
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def new_instance(engine, prompt, params: BeamSearchParams, lora_request, probe: SamplingParams):
    """A BeamSearchInstance for prompt (a string, token ids or a prompt dict), validated as the engine would:
    bad prompts, LoRA names and lengths raise here. Returns (instance, prompt text)."""
    prepared = engine.prepare_request(None, prompt, probe, lora_request=lora_request)
    ids = prepared.state.prompt_token_ids
    max_tokens = min(params.max_tokens, engine.max_model_len - len(ids))
    eos = engine.input_processor.eos_token_ids
    return BeamSearchInstance(ids, params, eos, max_tokens, lora_request), prepared.state.prompt


def _candidates(out: RequestOutput) -> Candidates:
    return out.outputs[0].logprobs[0]


# ---- LLM (offline) ---------------------------------------------------------------------------------
def llm_beam_search(
    llm, prompts, params: BeamSearchParams, lora_request=None, use_tqdm: bool = False, concurrency_limit=None
):
    """LLM.beam_search: the prompts' beams step together (concurrency_limit prompts at a time) through
    LLM.generate's engine path."""
    from tqdm.auto import tqdm

    engine = llm.llm_engine
    prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
    loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
    if len(loras) != len(prompts):
        raise ValueError(f"got {len(loras)} LoRA requests for {len(prompts)} prompts")
    if concurrency_limit is not None and (not isinstance(concurrency_limit, int) or concurrency_limit < 1):
        raise ValueError(f"concurrency_limit must be a positive integer or None, got {concurrency_limit!r}")
    probe = step_params(params, engine.input_processor.eos_token_ids)
    instances = [new_instance(engine, p, params, lora, probe)[0] for p, lora in zip(prompts, loras)]
    group = concurrency_limit or max(len(instances), 1)
    with tqdm(total=len(instances), desc="Beam search", unit="prompt", disable=not use_tqdm) as bar:
        for start in range(0, len(instances), group):
            search = _search(instances[start : start + group])
            batch = next(search, None)
            while batch is not None:
                outs = llm._run([p for p, _ in batch], probe, False, [lora for _, lora in batch])
                try:
                    batch = search.send([_candidates(o) for o in outs])
                except StopIteration:
                    batch = None
            bar.update(len(instances[start : start + group]))
    return [inst.output(engine.tokenizer) for inst in instances]


# ---- an engine client (AsyncLLM): the server and the framework adapters -------------------------
async def _expand(client, batch: Batch, probe: SamplingParams, prefix: str) -> list[Candidates]:
    """One step's 1-token requests, queued together (one engine step sees them all) and awaited."""
    loop = asyncio.get_running_loop()
    done: asyncio.Queue = asyncio.Queue()
    requests = [
        (prompt, probe, f"{prefix}-{i}", lora, lambda item, i=i: loop.call_soon_threadsafe(done.put_nowait, (i, item)))
        for i, (prompt, lora) in enumerate(batch)
    ]
    # Validation and queueing run off the event loop; if the search is cancelled meanwhile, the
    # submission still completes (shielded) so that its requests can be aborted below.
    submitted = asyncio.ensure_future(asyncio.to_thread(client.submit_many, requests))
    ids: list[str] = []
    results: dict[int, Candidates] = {}
    try:
        try:
            ids = await asyncio.shield(submitted)
        except asyncio.CancelledError:
            ids = await submitted
            raise
        while len(results) < len(ids):
            i, item = await done.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                results[i] = _candidates(item)
    except BaseException:
        for rid in ids:
            client.abort(rid)
        raise
    return [results[i] for i in range(len(ids))]


async def open_beam_search(
    client, prompt, params: BeamSearchParams, request_id: str, lora_request=None, n: int | None = None
) -> AsyncIterator[RequestOutput]:
    """Validate a beam search on an AsyncLLM (bad input raises here) and return its output stream.

    The stream yields one RequestOutput when the search ends: the n best beams (all beam_width by
    default) as CompletionOutputs, best first, with text and token ids of the output alone (an ending
    EOS token included in token_ids, as generate() reports it). Closing it early aborts the search.
    """
    engine = client.engine
    probe = step_params(params, engine.input_processor.eos_token_ids)
    instance, prompt_text = await asyncio.to_thread(new_instance, engine, prompt, params, lora_request, probe)
    return _stream(client, instance, prompt_text, probe, request_id, n or params.beam_width)


async def _stream(client, instance: BeamSearchInstance, prompt_text, probe, request_id: str, n: int):
    metrics = RequestMetrics(time.time())
    await _search_on(client, instance, probe, request_id)
    # Nothing reaches the caller before the search ends: that is when its first token arrives.
    metrics.first_token_time = metrics.last_token_time = metrics.finished_time = time.time()
    yield to_request_output(instance, client.engine.tokenizer, request_id, prompt_text, n, metrics)


async def beam_search_async(client, prompt, params: BeamSearchParams, request_id: str | None = None, lora_request=None):
    """The BeamSearchOutput of one prompt, searched on an AsyncLLM's step loop."""
    engine = client.engine
    probe = step_params(params, engine.input_processor.eos_token_ids)
    instance, _ = await asyncio.to_thread(new_instance, engine, prompt, params, lora_request, probe)
    await _search_on(client, instance, probe, request_id or f"beam-{uuid.uuid4().hex}")
    return instance.output(engine.tokenizer)


async def _search_on(client, instance: BeamSearchInstance, probe: SamplingParams, request_id: str) -> None:
    search, step = _search([instance]), 0
    batch = next(search, None)
    while batch is not None:
        candidates = await _expand(client, batch, probe, f"{request_id}-beam{step}")
        step += 1
        try:
            batch = search.send(candidates)
        except StopIteration:
            batch = None


def run_blocking(make_coro: Callable[[], Any], timeout: float | None = None):
    """Run a coroutine to completion from synchronous code, on a private event loop in a worker thread
    (so a caller that is itself inside an event loop works too); a timeout cancels it, aborting its requests."""
    result: queue.SimpleQueue = queue.SimpleQueue()

    async def main() -> None:
        try:
            result.put((True, await asyncio.wait_for(make_coro(), timeout)))
        except asyncio.TimeoutError:
            result.put((False, TimeoutError(f"the beam search did not finish within timeout={timeout} s")))
        except BaseException as e:  # handed to the caller's thread
            result.put((False, e))

    worker = threading.Thread(target=asyncio.run, args=(main(),), name="kvloom-beam-search", daemon=True)
    worker.start()
    ok, value = result.get()
    worker.join()
    if not ok:
        raise value
    return value


def to_request_output(
    instance: BeamSearchInstance, tokenizer, request_id: str, prompt_text, n: int, metrics: RequestMetrics | None = None
) -> RequestOutput:
    """The n best beams as a finished RequestOutput (what generate() would return for them)."""
    out = instance.output(tokenizer)
    completions = [
        CompletionOutput(
            i,
            instance.output_text(seq, tokenizer),
            seq.output_tokens,
            seq.cum_logprob,
            None,
            seq.finish_reason,
            seq.stop_reason,
            instance.lora_request,
        )
        for i, seq in enumerate(out.sequences[:n])
    ]
    prompt_ids = out.sequences[0].tokens[: instance.num_prompt_tokens] if out.sequences else []
    return RequestOutput(request_id, prompt_text, prompt_ids, None, completions, True, metrics, instance.lora_request)
