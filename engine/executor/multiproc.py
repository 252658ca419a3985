"""One worker process per TP rank, joined by torch.distributed (gloo on CPU, NCCL on CUDA).

The driver (the engine core's process) pickles each call once and writes the bytes to every
worker's pipe; every rank runs it, rank 0 returns the step's sampled tokens and the others an
acknowledgement. The driver waits on the pipes and on each process's sentinel, so a worker that
dies (killed, out of memory) is noticed at once: the engine fails its requests and the remaining
workers are stopped. Workers exit on their own if the driver's process goes away.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
import weakref
from dataclasses import replace
from multiprocessing.connection import Connection, wait

from kvloom.engine.config import CacheConfig
from kvloom.engine.errors import WorkerDiedError, portable_exception
from kvloom.engine.executor.abstract import Executor
from kvloom.engine.lora.request import LoRARequest
from kvloom.engine.scheduler.output import ModelRunnerOutput, SchedulerOutput
from kvloom.engine.worker import WorkerConfig

logger = logging.getLogger(__name__)

# After one rank reports an error, how long the others get to finish the step before the engine
# concludes they are stuck in a collective the failed rank never joined.
_ERROR_GRACE_SECONDS = 30.0


class MultiprocExecutor(Executor):
    name = "mp"

    def __init__(self, cfg: WorkerConfig, tp_size: int) -> None:
        if cfg.device.startswith("cuda:"):
            raise ValueError(
                f"device={cfg.device!r} names one GPU; with tensor_parallel_size={tp_size} use device='cuda' "
                "(rank r runs on cuda:r; choose GPUs with CUDA_VISIBLE_DEVICES)"
            )
        self.tp_size = tp_size
        self.cfg = cfg
        ctx = mp.get_context("spawn")
        self._rendezvous = tempfile.mkdtemp(prefix="kvloom-tp-")
        init_method = f"file://{self._rendezvous}/store"
        threads = max(1, len(os.sched_getaffinity(0)) // tp_size)
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []
        self._dead = False
        # Time of each step spent outside the workers' own work: pickling, pipes, wake-ups.
        self.num_steps = 0
        self.overhead_seconds = 0.0
        for rank in range(tp_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(cfg, rank, tp_size, init_method, child, os.getpid(), threads),
                name=f"kvloom-tp{rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns, self._rendezvous)
        t0 = time.perf_counter()
        try:
            self._gather()
        except BaseException:
            self.shutdown()
            raise
        logger.info(
            "tensor parallel: %d worker processes (pids %s), %s on %s, %d threads each, ready in %.1f s",
            tp_size,
            ", ".join(str(p.pid) for p in self.procs),
            "nccl" if cfg.device.startswith("cuda") else "gloo",
            cfg.device,
            threads,
            time.perf_counter() - t0,
        )

    # ---- calls -----------------------------------------------------------------------------------
    def _call(self, method: str, *args):
        if self._dead:
            raise WorkerDiedError("the tensor-parallel workers have stopped; create a new engine")
        payload = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self.conns:
                conn.send_bytes(payload)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self._fail("a worker's pipe closed")
        return self._gather()

    def _gather(self) -> list:
        """Every rank's reply in rank order; raises the first error, or WorkerDiedError."""
        try:
            replies = self._replies()
        except WorkerDiedError:
            raise
        except BaseException:
            # Interrupted (e.g. KeyboardInterrupt) with replies still unread: they would be taken
            # for the next call's, so these workers cannot be used again.
            self.shutdown()
            raise
        errors = [r[1] for r in replies if r[0] == "error"]
        if errors:
            raise errors[0]
        return [r[1] for r in replies]

    def _replies(self) -> list:
        replies: list = [None] * self.tp_size
        pending = {conn: rank for rank, conn in enumerate(self.conns)}
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.procs)}
        error_deadline = None
        while pending:
            timeout = None if error_deadline is None else max(error_deadline - time.monotonic(), 0)
            ready = wait([*pending, *sentinels], timeout)
            if not ready:
                # One rank failed and the others never finished: they wait in a collective for it.
                ranks = ", ".join(str(r) for r in sorted(pending.values()))
                self._fail(f"TP worker rank(s) {ranks} did not finish a step that another rank failed")
            for obj in ready:
                if obj in pending:
                    rank = pending.pop(obj)
                    try:
                        replies[rank] = obj.recv()
                    except (EOFError, OSError):
                        self._fail(f"TP worker rank {rank} closed its pipe")
                    if replies[rank][0] == "error" and error_deadline is None:
                        error_deadline = time.monotonic() + _ERROR_GRACE_SECONDS
            for obj in ready:
                rank = sentinels.pop(obj, None)
                if rank is not None and self.conns[rank] in pending:
                    proc = self.procs[rank]
                    self._fail(f"TP worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}")
        return replies

    def _fail(self, why: str):
        logger.error("%s; stopping the other workers", why)
        self.shutdown()
        raise WorkerDiedError(f"{why}; the engine has stopped and its requests failed")

    # ---- Executor --------------------------------------------------------------------------------
    def determine_num_kv_blocks(self, cache: CacheConfig, max_num_batched_tokens: int | None) -> int:
        return min(self._call("determine_num_kv_blocks", cache, max_num_batched_tokens))

    def kv_bytes_per_block(self) -> int:
        return self._call("kv_bytes_per_block")[0]

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._call("allocate_kv_cache", num_blocks)

    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        t0 = time.perf_counter()
        result, busy = self._call("execute_model_timed", out)[0]
        self.num_steps += 1
        self.overhead_seconds += time.perf_counter() - t0 - busy
        return result

    def add_lora(self, request: LoRARequest) -> None:
        self._call("add_lora", request)

    def remove_lora(self, lora_id: int) -> None:
        self._call("remove_lora", lora_id)

    def describe(self) -> str:
        if self.tp_size == 1:
            return f"one worker process ({self.cfg.device})"
        return f"{self.tp_size} worker processes (tensor parallel, {self.cfg.device})"

    def shutdown(self) -> None:
        self._dead = True
        self._finalizer()


def _stop(procs, conns, rendezvous: str) -> None:
    """Ask every worker to exit, then make sure they have; no process or file is left behind."""
    for conn in conns:
        try:
            conn.send_bytes(pickle.dumps(("shutdown", ())))
        except OSError:
            pass
    deadline = time.monotonic() + 5
    for proc in procs:
        proc.join(max(deadline - time.monotonic(), 0))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(2)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for conn in conns:
        conn.close()
    shutil.rmtree(rendezvous, ignore_errors=True)


def _worker_main(cfg: WorkerConfig, rank: int, size: int, init_method: str, conn, parent_pid: int, threads: int):
    """Entry of a worker process: join the group, build this rank's shard, serve calls until told to stop."""
    import torch
    import torch.distributed as dist

    from kvloom.engine.parallel import TPContext

    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    # Ctrl-C in the terminal reaches the whole process group; the engine's process decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("kvloom").addHandler(logging.StreamHandler())
    logging.getLogger("kvloom").setLevel(logging.WARNING)
    torch.set_num_threads(threads)
    try:
        if cfg.device.startswith("cuda"):
            cfg = replace(cfg, device=f"cuda:{rank}")
            torch.cuda.set_device(rank)
            backend = "nccl"
        else:
            # All ranks of this executor live on this machine.
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            backend = "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
        worker = _TimedWorker(cfg, TPContext(rank, size))
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which raises it
        conn.send(("error", portable_exception(e)))
        return
    conn.send(("ok", None))
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            break
        if method == "shutdown":
            break
        try:
            conn.send(("ok", getattr(worker, method)(*args)))
        except Exception as e:  # noqa: BLE001
            conn.send(("error", portable_exception(e)))
    worker.shutdown()
    dist.destroy_process_group()
    conn.close()


class _TimedWorker:
    """A Worker whose step reply carries the seconds it computed (to measure the executor's overhead)."""

    def __init__(self, cfg: WorkerConfig, tp) -> None:
        from kvloom.engine.worker import Worker

        self.worker = Worker(cfg, tp)

    def __getattr__(self, name: str):
        return getattr(self.worker, name)

    def execute_model_timed(self, out: SchedulerOutput):
        t0 = time.perf_counter()
        result = self.worker.execute_model(out)
        return result, time.perf_counter() - t0


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)
