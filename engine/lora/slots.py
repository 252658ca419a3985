"""Which adapter sits in which LoRA slot: the engine core's bookkeeping, by adapter id only.

The scheduler never runs more than `max_loras` distinct adapters in one step. Each step `assign`
keeps adapters already in a slot where they are, and puts the others in the least recently used
free slots; the workers are told the step's id -> slot mapping and which slots to (re)load.
"""

from __future__ import annotations


class LoRASlots:
    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self.held: list[int | None] = [None] * max_loras
        self._last_use = [0] * max_loras
        self._tick = 0

    def assign(self, lora_ids: set[int]) -> tuple[dict[int, int], dict[int, int]]:
        """(lora id -> slot for this step, slot -> lora id of the slots whose weights must change)."""
        if len(lora_ids) > self.max_loras:
            raise RuntimeError(f"{len(lora_ids)} adapters scheduled in one step, max_loras is {self.max_loras}")
        self._tick += 1
        mapping = {i: slot for slot, i in enumerate(self.held) if i in lora_ids}
        loads: dict[int, int] = {}
        for lora_id in sorted(lora_ids - mapping.keys()):
            busy = set(mapping.values())
            slot = min((s for s in range(self.max_loras) if s not in busy), key=lambda s: self._last_use[s])
            self.held[slot] = lora_id
            mapping[lora_id] = slot
            loads[slot] = lora_id
        for slot in mapping.values():
            self._last_use[slot] = self._tick
        return mapping, loads

    def forget(self, lora_id: int) -> None:
        """An adapter was removed: a later adapter with its id must be loaded afresh."""
        self.held = [None if i == lora_id else i for i in self.held]
