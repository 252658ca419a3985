"""Benchmarks run by `kvloom bench ...`."""
