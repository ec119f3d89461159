"""Benchmarks: latency of spotattn's kernels and peers, measured in one process on the same inputs."""
