"""The front end's adapters: which the engine knows by name, and which are loaded and validated.

- Registry: adapters added by name with `add_lora` (servers and SDK adapters look them up by name).
- Host cache: loaded adapters, LRU, up to `max_cpu_loras`. Loading validates an adapter against the
  base model, so a bad one fails its request before it is queued. An adapter used by an unfinished
  request is pinned (never evicted); an in-process worker reads its weights from here.

Slots are the engine core's business (kvloom.engine.lora.slots) and slot weights the workers'
(kvloom.engine.lora.worker). Loading and registration may come from any thread.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from kvloom.engine.lora.adapter import LoRAAdapter, LoRALoadError, load_adapter
from kvloom.engine.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        num_layers: int,
        max_loras: int,
        max_rank: int,
        max_cpu_loras: int | None,
        dtype: torch.dtype,
    ) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {max_loras}")
        if max_rank < 1:
            raise ValueError(f"max_lora_rank must be at least 1, got {max_rank}")
        max_cpu_loras = max_loras if max_cpu_loras is None else max_cpu_loras
        if max_cpu_loras < max_loras:
            raise ValueError(f"max_cpu_loras ({max_cpu_loras}) must be at least max_loras ({max_loras})")
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.max_cpu_loras = max_cpu_loras
        self.dtype = dtype
        self.shapes = shapes
        self.num_layers = num_layers
        self._lock = threading.Lock()
        self._registry: dict[str, LoRARequest] = {}
        self._cache: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self._pins: dict[int, int] = {}
        self._removed: set[int] = set()  # removed while requests still used them
        # Called with an adapter id when the engine must forget it (workers and slots).
        self.on_drop = None
        logger.info("LoRA: %d slots, max rank %d, up to %d adapters in host memory", max_loras, max_rank, max_cpu_loras)

    # ---- registry and host cache (any thread) ---------------------------------------------------
    def load(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter for request, from the host cache or from disk; LoRALoadError if it is unusable."""
        if not isinstance(request, LoRARequest):
            raise TypeError(f"lora_request must be a kvloom LoRARequest, got {type(request).__name__}")
        with self._lock:
            cached = self._cache.get(request.lora_int_id)
            if cached is not None:
                self._check_same(cached, request)
                self._cache.move_to_end(request.lora_int_id)
                return cached
        adapter = load_adapter(request, self.shapes, self.num_layers, self.max_rank, self.dtype)
        with self._lock:
            cached = self._cache.get(request.lora_int_id)
            if cached is not None:  # another thread loaded it meanwhile
                self._check_same(cached, request)
                return cached
            self._cache[request.lora_int_id] = adapter
            self._evict()
        logger.info(
            "LoRA adapter %r (id %d, rank %d) loaded from %s",
            adapter.name,
            adapter.lora_int_id,
            adapter.rank,
            adapter.path,
        )
        return adapter

    def add_lora(self, request: LoRARequest) -> bool:
        """Register an adapter by name and load it now (so errors surface here)."""
        with self._lock:
            known = self._registry.get(request.lora_name)
            if known is not None and known.lora_int_id != request.lora_int_id:
                raise LoRALoadError(
                    f"a LoRA adapter named {request.lora_name!r} is already registered with id {known.lora_int_id}"
                )
        self.load(request)
        with self._lock:
            self._registry[request.lora_name] = request
        return True

    def remove_lora(self, lora_id: int) -> bool:
        """Forget an adapter; requests already using it finish with it. False if it was unknown."""
        with self._lock:
            names = [n for n, r in self._registry.items() if r.lora_int_id == lora_id]
            for n in names:
                del self._registry[n]
            known = bool(names) or lora_id in self._cache
            if self._pins.get(lora_id):
                self._removed.add(lora_id)
            else:
                self._drop(lora_id)
        return known

    def list_loras(self) -> set[int]:
        with self._lock:
            return {r.lora_int_id for r in self._registry.values()} | set(self._cache)

    def get_lora_request(self, name: str) -> LoRARequest | None:
        with self._lock:
            return self._registry.get(name)

    def registered(self) -> list[LoRARequest]:
        with self._lock:
            return list(self._registry.values())

    # ---- request lifetime (step thread) ---------------------------------------------------------
    def acquire(self, adapter: LoRAAdapter, count: int = 1) -> None:
        """Pin an adapter for `count` queued requests (put back in the cache if it was evicted meanwhile)."""
        with self._lock:
            # Evicted between loading and queueing: put it back (a reload of the same files may be
            # cached instead, which serves as well).
            self._cache.setdefault(adapter.lora_int_id, adapter)
            self._removed.discard(adapter.lora_int_id)
            self._pins[adapter.lora_int_id] = self._pins.get(adapter.lora_int_id, 0) + count

    def release(self, lora_id: int) -> None:
        """One request using lora_id ended."""
        with self._lock:
            left = self._pins.get(lora_id, 0) - 1
            if left > 0:
                self._pins[lora_id] = left
                return
            self._pins.pop(lora_id, None)
            if lora_id in self._removed:
                self._drop(lora_id)
            self._evict()

    @property
    def num_pinned(self) -> int:
        """Unfinished requests holding an adapter (0 when the engine is idle)."""
        with self._lock:
            return sum(self._pins.values())

    def cached(self, lora_id: int) -> LoRAAdapter | None:
        """A loaded adapter by id (pinned while a request uses it)."""
        with self._lock:
            return self._cache.get(lora_id)

    # ---- internals (lock held) ------------------------------------------------------------------
    def _check_same(self, cached: LoRAAdapter, request: LoRARequest) -> None:
        if not _same_dir(cached.path, request.lora_path):
            raise LoRALoadError(
                f"lora_int_id {request.lora_int_id} already names adapter {cached.name!r} from {cached.path}; "
                f"give {request.lora_name!r} ({request.lora_path}) another id"
            )

    def _drop(self, lora_id: int) -> None:
        self._cache.pop(lora_id, None)
        self._removed.discard(lora_id)
        if self.on_drop is not None:
            self.on_drop(lora_id)

    def _evict(self) -> None:
        while len(self._cache) > self.max_cpu_loras:
            victim = next((i for i in self._cache if not self._pins.get(i)), None)
            if victim is None:
                break  # every cached adapter serves a request; the cap is exceeded until they end
            self._drop(victim)


def _same_dir(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


__all__ = ["LoRALoadError", "LoRAManager"]
