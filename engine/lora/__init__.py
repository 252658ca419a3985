"""LoRA multiplexing: PEFT adapters loaded into a host cache and a few device slots, per request.

`LoRARequest` is light (no torch); the loader, layers and manager live in their modules.
"""

from kvloom.engine.lora.request import LoRARequest

__all__ = ["LoRARequest"]
