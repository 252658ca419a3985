"""AsyncLLM: one engine stepped by a background thread, streamed to many callers at once.

Callers on any thread or event loop add requests and read their outputs as they are produced:
`async for out in llm.generate(...)` from asyncio code, `for out in llm.stream(...)` from plain
threads. Outputs are DELTA, CUMULATIVE or FINAL_ONLY as the request's SamplingParams say
(CUMULATIVE by default, as in vLLM). A request whose consumer goes away is aborted and its KV
blocks freed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

from kvloom.engine.arg_utils import EngineArgs
from kvloom.engine.errors import EngineDeadError, WorkerDiedError
from kvloom.engine.outputs import PoolingRequestOutput, RequestOutput
from kvloom.engine.pooling.params import PoolingParams
from kvloom.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_Deliver = Callable[[object], None]


def blocking_outputs(q: queue.SimpleQueue, rid: str, timeout: float | None, abort) -> Iterator[RequestOutput]:
    """The outputs a request's deliver callback puts on q, until the last (or its exception, or the
    timeout); a consumer that stops early, or a timeout, aborts the request."""
    deadline = None if timeout is None else time.monotonic() + timeout
    finished = False
    try:
        while not finished:
            try:
                item = q.get(timeout=None if deadline is None else max(deadline - time.monotonic(), 0))
            except queue.Empty:
                raise _timed_out(rid, timeout) from None
            if isinstance(item, BaseException):
                raise item
            finished = item.finished
            yield item
    finally:
        if not finished:
            abort(rid)


def _timed_out(request_id: str, timeout: float) -> TimeoutError:
    return TimeoutError(f"request {request_id} did not finish within its timeout of {timeout} s and was aborted")


class AsyncLLM:
    """The engine client shared by the server and the framework adapters."""

    def __init__(self, engine_args: EngineArgs | None = None, engine=None, **kwargs) -> None:
        """Build an engine from engine_args (or keyword arguments), or serve an existing LLMEngine."""
        from kvloom.engine.llm_engine import LLMEngine

        if engine is None:
            engine = LLMEngine(engine_args or EngineArgs.from_kwargs(**kwargs))
        if engine.lockstep:
            raise ValueError(
                "distributed_executor_backend='external_launcher' runs offline batches (LLM.generate/chat) "
                "with the same calls on every rank; an async engine client cannot keep ranks in lockstep"
            )
        self.engine_args = engine.args
        self.engine = engine
        # The engine is touched only by the loop thread. Callers hand it new requests and aborts
        # through these inboxes, so adding a request never waits for a step to finish.
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._inbox: list = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Deliver] = {}
        self._ids = itertools.count()
        self._dead = False
        self._thread = threading.Thread(target=self._run, name="kvloom-engine", daemon=True)
        self._thread.start()

    # ---- the background loop -----------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._lock:
                while not (self._dead or self._inbox or self._aborts or engine.has_unfinished_requests()):
                    self._work.wait()
                if self._dead:
                    return
                adds, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            for prepared in adds:
                engine.commit_request(prepared)
            for rid in aborts:
                engine.abort_request(rid)
            if not engine.has_unfinished_requests():
                continue
            try:
                outputs, errors = engine.step(), engine.take_errors()
            except WorkerDiedError as e:
                # The model is gone: fail everything, queued or running, and refuse new requests.
                logger.error("%s", e)
                self._fail_all(e)
                return
            except Exception as e:
                # The engine fails only the requests that cause a model error (it re-runs the step
                # without them); anything else that breaks a step fails the requests in flight.
                logger.exception("engine step failed outside the model; failing the requests in flight")
                failed = list(engine.output_processor.requests)
                engine.abort_request(failed)
                outputs, errors = [], {rid: e for rid in failed}
            with self._lock:
                deliveries = [(self._streams.get(o.request_id), o) for o in outputs]
                for out in outputs:
                    if out.finished:
                        self._streams.pop(out.request_id, None)
                deliveries += [(self._streams.pop(rid, None), error) for rid, error in errors.items()]
            for deliver, item in deliveries:
                if deliver is not None:
                    deliver(item)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            self._dead = True
            streams, self._streams = self._streams, {}
            self._inbox, self._aborts = [], []
        for deliver in streams.values():
            deliver(EngineDeadError(f"the engine stopped: {error}"))
        self.engine.shutdown()

    # ---- requests ----------------------------------------------------------------------------
    def submit(
        self, prompt, params: SamplingParams | None, request_id: str | None, lora_request, deliver: _Deliver
    ) -> str:
        """Queue a request whose outputs (or an exception) are passed to deliver on the engine thread.

        Validation and tokenization happen here, on the caller's thread: bad input raises at once.
        """
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        return self._enqueue(self.engine.prepare_request(rid, prompt, params, lora_request=lora_request), deliver)

    def _enqueue(self, prepared, deliver: _Deliver) -> str:
        rid = prepared.state.request_id
        with self._lock:
            if self._dead:
                raise EngineDeadError("the engine has been shut down")
            if rid in self._streams:
                raise ValueError(f"request id {rid!r} is already in use")
            self._streams[rid] = deliver
            self._inbox.append(prepared)
            self._work.notify()
        return rid

    def submit_many(self, requests) -> list[str]:
        """Queue several (prompt, params, request_id, lora_request, deliver) requests so that the engine
        takes them in the same step (beam search sends a step's beams this way). Bad input in any
        raises before any is queued."""
        prepared = [
            (self.engine.prepare_request(rid, prompt, params, lora_request=lora), deliver)
            for prompt, params, rid, lora, deliver in requests
        ]
        ids = [p.state.request_id for p, _ in prepared]
        with self._lock:
            if self._dead:
                raise EngineDeadError("the engine has been shut down")
            taken = [rid for rid in ids if rid in self._streams]
            if taken or len(set(ids)) != len(ids):
                raise ValueError(f"request id {(taken or ids)[0]!r} is already in use")
            for p, deliver in prepared:
                self._streams[p.state.request_id] = deliver
                self._inbox.append(p)
            self._work.notify()
        return ids

    async def beam_search(self, prompt, request_id: str | None, params, lora_request=None, n: int | None = None):
        """vLLM's EngineClient.beam_search (same argument order): one final RequestOutput with the n best
        beams (all beam_width by default), best first; bad input raises before anything is yielded.
        See kvloom.beam_search."""
        from kvloom.beam_search import open_beam_search

        rid = request_id if request_id is not None else f"beam-{next(self._ids)}"
        stream = await open_beam_search(self, prompt, params, rid, lora_request, n)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    async def open_stream(
        self,
        prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        lora_request=None,
        timeout: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request and return its output stream; bad input raises here.

        Validation and tokenization run on a worker thread, so a huge prompt never stalls the event
        loop. Iterate the stream to the end, or close it (which aborts the request).
        """
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        prepared = await asyncio.to_thread(
            self.engine.prepare_request, rid, prompt, sampling_params, lora_request=lora_request
        )
        self._enqueue(prepared, lambda item: loop.call_soon_threadsafe(q.put_nowait, item))
        return self._consume(rid, q, timeout)

    async def generate(
        self,
        prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        lora_request=None,
        timeout: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request; bad input raises before anything is yielded.

        With a timeout (seconds), a request still running when it passes is aborted and TimeoutError raised.
        """
        stream = await self.open_stream(prompt, sampling_params, request_id, lora_request, timeout)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    async def encode(
        self,
        prompt,
        pooling_params: PoolingParams | None = None,
        request_id: str | None = None,
        lora_request=None,
        timeout: float | None = None,
    ) -> AsyncIterator[PoolingRequestOutput]:
        """vLLM's AsyncLLM.encode: the one, final PoolingRequestOutput of an embedding request (runner='pooling').

        The request joins the engine's batches like any other; bad input raises before anything is yielded.
        """
        params = pooling_params if pooling_params is not None else PoolingParams()
        if not isinstance(params, PoolingParams):
            raise TypeError(f"pooling_params must be PoolingParams, got {type(params).__name__}")
        stream = await self.open_stream(prompt, params, request_id, lora_request, timeout)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    async def _consume(self, rid: str, q: asyncio.Queue, timeout: float | None) -> AsyncIterator[RequestOutput]:
        deadline = None if timeout is None else time.monotonic() + timeout
        finished = False
        try:
            while not finished:
                if deadline is None:
                    item = await q.get()
                else:
                    try:
                        item = await asyncio.wait_for(q.get(), max(deadline - time.monotonic(), 0))
                    except asyncio.TimeoutError:
                        raise _timed_out(rid, timeout) from None
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(rid)

    def stream(
        self,
        prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        lora_request=None,
        timeout: float | None = None,
    ) -> Iterator[RequestOutput]:
        """The blocking form of generate(), for callers without an event loop."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        rid = self.submit(prompt, sampling_params, request_id, lora_request, q.put)
        return blocking_outputs(q, rid, timeout, self.abort)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; unknown or finished ids are ignored."""
        with self._lock:
            if self._streams.pop(request_id, None) is not None and not self._dead:
                self._aborts.append(request_id)
                self._work.notify()

    # ---- engine facts and lifecycle ----------------------------------------------------------
    def get_tokenizer(self):
        return self.engine.tokenizer

    def apply_chat_template(self, messages: list[dict], **kwargs) -> list[int]:
        return self.engine.apply_chat_template(messages, **kwargs)

    # The adapter registry is thread-safe; registering never waits for a step.
    def add_lora(self, lora_request) -> bool:
        return self.engine.add_lora(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self.engine.remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        return self.engine.list_loras()

    def get_lora_request(self, name: str):
        return self.engine.get_lora_request(name)

    def list_lora_requests(self) -> list:
        """The adapters registered by name (what a server lists as models)."""
        return self.engine.lora_manager.registered() if self.engine.lora_manager is not None else []

    def get_metrics(self) -> dict:
        """The engine's counters and gauges (read while it runs; each value is current to a step)."""
        return self.engine.get_metrics()

    def get_config_info(self) -> dict[str, str]:
        """The settings the engine runs with (dtype, threads, KV blocks, scheduling, speculation)."""
        return self.engine.config_info()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def runner_type(self) -> str:
        """The engine's runner: "pooling" for an embedding model (use encode), "generate" otherwise."""
        return self.engine.runner_type

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def is_running(self) -> bool:
        return not self._dead and self._thread.is_alive()

    def shutdown(self) -> None:
        """Stop the loop, fail what is still running, and drop the model and KV cache."""
        with self._lock:
            if self._dead:
                return
            self._dead = True
            streams, self._streams = self._streams, {}
            self._inbox, self._aborts = [], []
            self._work.notify_all()
        self._thread.join(timeout=30)
        for deliver in streams.values():
            deliver(EngineDeadError("the engine was shut down while the request ran"))
        self.engine.shutdown()
