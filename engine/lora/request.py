"""LoRARequest: which adapter a request uses (vLLM's name and fields)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class LoRARequest:
    """An adapter by name, a unique positive integer id and a local PEFT directory.

    As in vLLM, `lora_int_id` identifies the adapter inside the engine (the KV prefix cache and the
    slots are keyed by it), so one id must always mean the same adapter.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None
    lora_local_path: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.lora_path and self.lora_local_path:
            self.lora_path = self.lora_local_path
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and self.lora_name == other.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)
