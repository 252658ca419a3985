"""Continuous-batching scheduler (pure Python)."""
