"""Two LoRA adapters and the base model answering in one batch, on one engine.

The adapters are random ones in PEFT's format (rank 8, scaled up so that they visibly change the
answers), made here as stand-ins for fine-tuned adapters such as an "sql" and a "poet" adapter.
Each request names its adapter; the engine runs all three in the same steps.
"""

import asyncio
import tempfile
from pathlib import Path

from kvloom import LLM, LoRARequest, SamplingParams
from kvloom.bench.lora import make_random_adapter
from kvloom.engine.model_loader.resolve import resolve_model
from kvloom.integrations.langchain import ChatVLLM

model_dir = resolve_model(None)  # the default model's local directory
with tempfile.TemporaryDirectory() as tmp:
    adapters = [
        LoRARequest(name, i, make_random_adapter(model_dir, Path(tmp) / name, rank=8, seed=i, alpha=256))
        for i, name in enumerate(["sql", "poet"], 1)
    ]
    llm = LLM(enable_lora=True, max_loras=2, max_lora_rank=8)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0, max_tokens=24)
    outputs = llm.chat([question] * 3, params, use_tqdm=False, lora_request=[None, *adapters])
    for lora, out in zip([None, *adapters], outputs):
        print(f"{lora.lora_name if lora else 'base'}: {' '.join(out.outputs[0].text.split())}")
    print("requests in one step:", llm.get_metrics()["peak_running"])

    # The same through LangChain: adapters registered by name, chosen per call.
    for adapter in adapters:
        llm.add_lora(adapter)
    chat = ChatVLLM(llm=llm, temperature=0, max_new_tokens=24)

    async def ask_all():
        return await asyncio.gather(
            *(chat.ainvoke(question[0]["content"], lora=name) for name in [None, "sql", "poet"])
        )

    for name, message in zip(["base", "sql", "poet"], asyncio.run(ask_all())):
        print(f"{name} (LangChain): {' '.join(message.content.split())}")
