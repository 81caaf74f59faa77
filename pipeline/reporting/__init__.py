"""Reports: the gate and throughput report, the accuracy-vs-bits frontier, the GPU comparison, the README results block."""
