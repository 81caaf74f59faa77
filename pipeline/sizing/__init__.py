"""Sizing and predicted performance: model shapes, memory plans, calibration placement, the throughput model and NVIDIA's published rows."""
