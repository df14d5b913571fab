"""Benchmarks: engine throughput beside vLLM, and (later) workloads, simulator, capacity search."""
