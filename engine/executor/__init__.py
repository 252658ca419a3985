"""Executors own the workers: one in this process, one process per TP rank, or torchrun's processes."""

from kvloom.engine.executor.abstract import Executor, WorkerDiedError, build_executor

__all__ = ["Executor", "WorkerDiedError", "build_executor"]
