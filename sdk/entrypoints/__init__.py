"""Entry points laid out as vLLM's (`python -m kvloom.entrypoints.openai.api_server`)."""
