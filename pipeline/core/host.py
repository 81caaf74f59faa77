"""The CPU a run computed on, as far as it decides the run's floating-point results.

torch's CPU kernels are chosen per instruction set at run time (ATen's CPU capability: AVX2,
AVX512, ...; torch/backends/cpu get_cpu_capability) and the BLAS they call picks its own code path
per CPU, so the same calibration and evaluation on the same inputs give different low-order bits on
an AVX2-only AMD EPYC than on an AVX-512 Intel Xeon. Seen here: `make repro` of one commit gave the
fp8 recipe a held-out perplexity change of +3.29% on the EPYC (twice, old and new code alike) and
+3.1% on the machine that had generated the README; the gate verdicts agreed. Each run is
deterministic on one CPU kind, so results are compared only between runs on the same kind.
"""

from __future__ import annotations

from pathlib import Path


def cpu_model() -> str:
    """The `model name` /proc/cpuinfo gives (e.g. "AMD EPYC"), else the platform's processor."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def numerics_host() -> str:
    """e.g. "AMD EPYC, torch CPU capability AVX2": what a results table was computed on."""
    import torch

    return f"{cpu_model()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
