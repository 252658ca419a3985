"""OpenAI-compatible HTTP server over the shared engine."""
