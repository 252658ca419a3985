"""Embedding ("pooling") models: per-request PoolingParams, the engine's PoolerConfig, and the pooler."""
