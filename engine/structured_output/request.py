"""One sequence's constraint state: its compiling grammar and, once it runs, its matcher (no torch here)."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from kvloom.engine.structured_output.params import StructuredOutputsParams


@dataclass(eq=False)
class StructuredOutputRequest:
    """Held by the scheduler's Request; the matcher lives as long as the sequence (preemption included)."""

    params: StructuredOutputsParams
    compiled: Future
    matcher: Any = None
    # A bitmask row computed while checking whether the grammar is complete, reused by the next step.
    next_mask: Any = None

    def is_ready(self) -> bool:
        """The grammar has compiled (or failed to), so the request may be scheduled."""
        return self.compiled.done()
