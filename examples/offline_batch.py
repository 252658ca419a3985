"""Offline batch generation with the embedded default model (vLLM's LLM API)."""

from kvloom import LLM, SamplingParams

llm = LLM()  # SmolLM2-135M-Instruct, fetched and converted once into ~/.cache/kvloom
params = SamplingParams(temperature=0.0, max_tokens=48)
questions = ["What is the capital of France?", "Name three primary colors.", "What is 2 + 2?"]
outputs = llm.chat([[{"role": "user", "content": q}] for q in questions], params)
for q, out in zip(questions, outputs):
    print(f"Q: {q}\nA: {out.outputs[0].text.strip()}\n")
print(llm.get_metrics())
