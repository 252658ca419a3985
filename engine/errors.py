"""Errors that end an engine rather than a request."""


class EngineDeadError(RuntimeError):
    """The engine was shut down, or lost a worker; no request can be served."""


class WorkerDiedError(EngineDeadError):
    """A worker process exited or closed its pipe; the engine stopped its other workers."""
