"""Paged KV cache bookkeeping: block pool and per-request block tables (pure Python)."""
