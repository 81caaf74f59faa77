"""`forge probe` on a real CUDA GPU: the measured rates are plausible against the catalog's datasheet.

Skips without CUDA; the FP8 part skips below compute capability 8.9 (no FP8 tensor cores). The
0.3 x datasheet floor catches a broken measurement (wrong byte or FLOP count, a GEMM that fell back
to a slow path), not a slow card: one H100 here (2026-11) reached ~0.9 of datasheet bandwidth, ~0.8 of BF16.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FLOOR = 0.3


@pytest.fixture(scope="module")
def probed():
    from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
    from pipeline.measure.probe import match_gpu_key, probe_gpu

    catalog = load_catalog(DEFAULT_CATALOG)
    result = probe_gpu(0)
    key = match_gpu_key(result.gpu_name, catalog)
    return result, (catalog[key] if key else None)


def _cc() -> tuple[int, int]:
    return torch.cuda.get_device_capability(0) if torch.cuda.is_available() else (0, 0)


def test_probe_reports_the_device(probed):
    result, _ = probed
    major, minor = _cc()
    assert result.compute_capability == f"{major}.{minor}"
    assert result.gpu_name == torch.cuda.get_device_name(0)
    assert result.copy_bandwidth_bytes_per_s > 0 and result.bf16_tflops > 0


def test_bandwidth_and_bf16_are_plausible(probed):
    result, spec = probed
    if spec is None:
        pytest.skip(f"{result.gpu_name} is not in pipeline/core/data/gpus.yaml")
    assert result.copy_bandwidth_bytes_per_s > FLOOR * spec.memory_bandwidth_bytes_per_s
    assert result.copy_bandwidth_bytes_per_s < 1.1 * spec.memory_bandwidth_bytes_per_s
    assert result.bf16_tflops > FLOOR * spec.tflops["bf16"]
    assert result.bf16_tflops < 1.1 * spec.tflops["bf16"]


@pytest.mark.skipif(_cc() < (8, 9), reason="FP8 GEMM needs compute capability >= 8.9")
def test_fp8_is_measured_and_plausible(probed):
    result, spec = probed
    assert result.fp8_tflops is not None and result.fp8_tflops > 0
    if spec is None or "fp8" not in spec.tflops:
        pytest.skip("no datasheet FP8 rate for this GPU")
    assert FLOOR * spec.tflops["fp8"] < result.fp8_tflops < 1.1 * spec.tflops["fp8"]


@pytest.mark.skipif(_cc() >= (8, 9), reason="only below compute capability 8.9")
def test_fp8_skipped_below_sm89(probed):
    result, _ = probed
    assert result.fp8_tflops is None
    assert "no FP8 tensor cores" in result.method["fp8"]["skipped"]


def test_saved_probe_becomes_measured_ceilings(probed, tmp_path):
    from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
    from pipeline.measure.probe import load_ceilings, save_probe

    result, spec = probed
    if spec is None:
        pytest.skip(f"{result.gpu_name} is not in pipeline/core/data/gpus.yaml")
    path = save_probe(result, load_catalog(DEFAULT_CATALOG), tmp_path)
    ceilings = load_ceilings(path.stem, "bf16", tmp_path)
    assert ceilings.source == "measured"
    assert ceilings.peak_flops == pytest.approx(result.bf16_tflops * 1e12)
