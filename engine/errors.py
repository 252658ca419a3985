"""Errors that end an engine rather than a request."""

import pickle


class EngineDeadError(RuntimeError):
    """The engine was shut down, or lost a worker; no request can be served."""


class WorkerDiedError(EngineDeadError):
    """A worker process exited or closed its pipe; the engine stopped its other workers."""


def portable_exception(e: BaseException) -> BaseException:
    """The exception itself if it pickles (to cross to another process), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")
