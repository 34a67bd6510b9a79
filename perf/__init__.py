"""Benchmarks, the autotune sweep and the paper experiments (see README)."""
