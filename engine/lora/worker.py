"""A worker's LoRA state: stacked slot weights in every LoRA layer, and the adapters it has read.

The engine core decides which adapter goes in which slot (kvloom.engine.lora.slots); each worker
copies its own shard of the adapter's A/B into the slot (S-LoRA style: column-parallel layers
take B's rows, row-parallel layers A's columns, see kvloom.engine.layers.linear).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch

from kvloom.engine.lora.adapter import LoRAAdapter, load_adapter
from kvloom.engine.lora.layers import LinearLoRA, LoRAContext
from kvloom.engine.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class WorkerLoRA:
    def __init__(
        self,
        model,
        max_loras: int,
        max_rank: int,
        max_cpu_loras: int,
        dtype: torch.dtype,
        kernels,
        lookup: Callable[[int], LoRAAdapter | None] | None = None,
    ) -> None:
        self.max_rank = max_rank
        self.max_cpu_loras = max_cpu_loras
        self.dtype = dtype
        self.shapes = model.lora_shapes()
        self.num_layers = model.cfg.num_layers
        # In one process the front end's host cache already holds every adapter a request uses.
        self.lookup = lookup
        self.ctx = LoRAContext()
        self.layers: list[LinearLoRA] = []
        for layer_idx, linear, modules in model.lora_targets():
            linear.lora = LinearLoRA(linear, layer_idx, modules, max_loras, max_rank, self.ctx, kernels)
            self.layers.append(linear.lora)
        self.requests: dict[int, LoRARequest] = {}
        self._cache: OrderedDict[int, LoRAAdapter] = OrderedDict()

    @property
    def num_bytes(self) -> int:
        return sum(layer.num_bytes for layer in self.layers)

    def add_lora(self, request: LoRARequest) -> None:
        """Remember where an adapter lives; it is read when a slot first needs it."""
        self.requests[request.lora_int_id] = request

    def remove_lora(self, lora_id: int) -> None:
        self.requests.pop(lora_id, None)
        self._cache.pop(lora_id, None)

    def load_slots(self, loads: dict[int, int]) -> None:
        """Copy each adapter's weights into its slot (slot -> lora id)."""
        for slot, lora_id in loads.items():
            adapter = self._adapter(lora_id)
            for layer in self.layers:
                layer.set_slot(slot, adapter.weights)

    def _adapter(self, lora_id: int) -> LoRAAdapter:
        adapter = self.lookup(lora_id) if self.lookup is not None else None
        if adapter is not None:
            return adapter
        adapter = self._cache.get(lora_id)
        if adapter is None:
            request = self.requests.get(lora_id)
            if request is None:
                raise RuntimeError(f"LoRA adapter id {lora_id} was scheduled but never added to this worker")
            adapter = load_adapter(request, self.shapes, self.num_layers, self.max_rank, self.dtype)
            self._cache[lora_id] = adapter
            while len(self._cache) > self.max_cpu_loras:
                self._cache.popitem(last=False)
        self._cache.move_to_end(lora_id)
        return adapter
