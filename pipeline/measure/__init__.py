"""Measurement on a GPU: running trtllm-bench, its I/O, GEMM/bandwidth probes, power sampling."""
