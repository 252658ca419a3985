"""The OpenAI-compatible server's entry point and its vLLM-compatible command-line flags."""
