"""Which adapters the engine knows, which are in host memory, and which sit in the device slots.

- Registry: adapters added by name with `add_lora` (servers and SDK adapters look them up by name).
- Host cache: loaded adapters, LRU, up to `max_cpu_loras`. An adapter used by an unfinished request
  is pinned (never evicted), so the step loop never reads from disk.
- Slots: `max_loras` rows of stacked A/B weights in every LoRA layer. The scheduler never runs
  more than `max_loras` distinct adapters at once; `activate` puts the step's adapters in slots,
  reusing a slot that already holds an adapter and replacing the least recently used otherwise.

Loading and registration may come from any thread; `activate` runs on the engine's step thread.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from kvloom.engine.lora.adapter import LoRAAdapter, LoRALoadError, load_adapter
from kvloom.engine.lora.layers import LinearLoRA, LoRAContext
from kvloom.engine.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(
        self, model, max_loras: int, max_rank: int, max_cpu_loras: int | None, dtype: torch.dtype, kernels
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
        self.shapes: dict[str, tuple[int, int]] = model.lora_shapes()
        self.num_layers = model.cfg.num_layers
        self.ctx = LoRAContext()
        self.layers: list[LinearLoRA] = []
        for layer_idx, linear, modules in model.lora_targets():
            linear.lora = LinearLoRA(linear, layer_idx, modules, max_loras, max_rank, self.ctx, kernels)
            self.layers.append(linear.lora)
        self._lock = threading.Lock()
        self._registry: dict[str, LoRARequest] = {}
        self._cache: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self._pins: dict[int, int] = {}
        self._removed: set[int] = set()  # removed while requests still used them
        self._slots: list[LoRAAdapter | None] = [None] * max_loras
        self._slot_use = [0] * max_loras
        self._tick = 0
        logger.info(
            "LoRA: %d slots, max rank %d, up to %d adapters in host memory, %.1f MiB of slot weights",
            max_loras,
            max_rank,
            max_cpu_loras,
            sum(layer.num_bytes for layer in self.layers) / 2**20,
        )

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

    def activate(self, lora_ids: set[int]) -> dict[int, int]:
        """Put every adapter of this step in a slot; returns lora id -> slot."""
        if len(lora_ids) > self.max_loras:
            raise RuntimeError(f"{len(lora_ids)} adapters scheduled in one step, max_loras is {self.max_loras}")
        with self._lock:
            wanted = {i: self._cache[i] for i in lora_ids}
        self._tick += 1
        mapping: dict[int, int] = {}
        for slot, held in enumerate(self._slots):
            if held is not None and wanted.get(held.lora_int_id) is held:
                mapping[held.lora_int_id] = slot
        for lora_id, adapter in wanted.items():
            if lora_id in mapping:
                continue
            busy = set(mapping.values())
            slot = min((s for s in range(self.max_loras) if s not in busy), key=lambda s: self._slot_use[s])
            for layer in self.layers:
                layer.set_slot(slot, adapter.weights)
            self._slots[slot] = adapter
            mapping[lora_id] = slot
        for slot in mapping.values():
            self._slot_use[slot] = self._tick
        return mapping

    def slot_ids(self) -> list[int | None]:
        """The adapter id held by each slot (None for an empty slot)."""
        return [a.lora_int_id if a is not None else None for a in self._slots]

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
