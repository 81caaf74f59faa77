"""GPU detection (NVML, through a stand-in module) and NIM-style artifact selection."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.core.errors import RecipeError
from pipeline.core.local_gpu import LocalGpu, detect_local_gpu, match_sku
from pipeline.registry.selection import reject_reason, select_for_gpu

CATALOG = {"h100": "H100", "h100-nvl": "H100 NVL", "h200": "H200", "b200": "B200"}
H200 = LocalGpu(name="NVIDIA H200", compute_capability="9.0", memory_bytes=150_754_820_096, count=1, sku="h200")
H100 = LocalGpu(
    name="NVIDIA H100 80GB HBM3", compute_capability="9.0", memory_bytes=85_520_809_984, count=1, sku="h100"
)


def manifest(name, version="v1.0.0", *, gpu="h200", cc="9.0", bits=8.0, verdict="pass", tp=1, mem=None):
    meta = {
        "gpu": gpu,
        "compute_capability": cc,
        "bits_per_weight": bits,
        "gate": {"verdict": verdict},
        "tp": tp,
    }
    if mem is not None:
        meta["min_gpu_memory_bytes"] = mem
    return {"name": name, "version": version, "metadata": meta}


def pick(manifests, gpu):
    chosen = select_for_gpu(manifests, gpu)
    return None if chosen is None else f"{chosen['name']}@{chosen['version']}"


# ----------------------------------------------------------------------------- selection


def test_exact_sku_beats_lower_precision_of_sibling_sku():
    both = [manifest("m-fp8-h200", gpu="h200", bits=8.0), manifest("m-int4-h100", gpu="h100", bits=4.25)]
    assert pick(both, H200) == "m-fp8-h200@v1.0.0"
    assert pick(both, H100) == "m-int4-h100@v1.0.0"
    # an unknown SKU of the same SM: no exact match, so precision decides
    assert pick(both, LocalGpu("NVIDIA GH200", "9.0", 100_000_000_000)) == "m-int4-h100@v1.0.0"


def test_lower_bits_then_newest_version():
    same_sku = [
        manifest("m-fp8-h200", "v1.0.9", bits=8.0),
        manifest("m-w4-h200", "v1.0.2", bits=4.5),
        manifest("m-w4-h200", "v1.0.10", bits=4.5),
        manifest("m-w4-h200", "v1.0.3", bits=4.5),
    ]
    assert pick(same_sku, H200) == "m-w4-h200@v1.0.10"  # semantic, not string, order
    assert pick(list(reversed(same_sku)), H200) == "m-w4-h200@v1.0.10"


def test_failed_gate_never_chosen_even_if_best():
    cands = [
        manifest("m-nvfp4-h200", "v1.0.5", bits=4.5, verdict="fail"),
        manifest("m-fp8-h200", "v1.0.0", bits=8.0),
        manifest("m-fp8-h200", "v1.0.1", bits=8.0, verdict="skipped"),
    ]
    assert pick(cands, H200) == "m-fp8-h200@v1.0.0"
    assert pick([c for c in cands if c["version"] != "v1.0.0"], H200) is None
    assert reject_reason(cands[0], H200) == "accuracy gate verdict is 'fail', not 'pass'"


def test_compute_capability_tp_and_memory_filter():
    b200_only = [manifest("m-nvfp4-b200", gpu="b200", cc="10.0", bits=4.5)]
    assert pick(b200_only, H200) is None
    assert reject_reason(b200_only[0], H200) == "built for compute capability 10.0, local GPU is 9.0"

    tp2 = manifest("m-fp8-h200-tp2", bits=8.0, tp=2)
    assert pick([tp2], H200) is None
    assert reject_reason(tp2, H200) == "needs 2 GPUs (tensor parallel), 1 available"
    two = LocalGpu("NVIDIA H200", "9.0", 150_754_820_096, count=2, sku="h200")
    assert pick([tp2], two) == "m-fp8-h200-tp2@v1.0.0"

    big = manifest("m-fp8-h200", mem=120_000_000_000)
    assert pick([big], H200) == "m-fp8-h200@v1.0.0"
    assert pick([big], LocalGpu("NVIDIA H100 80GB HBM3", "9.0", 85_520_809_984, sku="h100")) is None
    assert pick([], H200) is None


# ----------------------------------------------------------------------------- SKU matching


@pytest.mark.parametrize(
    ("nvml_name", "key"),
    [
        ("NVIDIA H200", "h200"),
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 NVL", "h100-nvl"),
        ("nvidia b200", "b200"),
        ("NVIDIA A100-SXM4-80GB", None),
    ],
)
def test_match_sku(nvml_name, key):
    assert match_sku(nvml_name, CATALOG) == key


def test_match_sku_with_lists_of_substrings_as_in_gpus_yaml():
    catalog = {"h100": ["H100 80GB HBM3", "H100 SXM"], "h100-nvl": ["H100 NVL"], "h200": ["H200"]}
    assert match_sku("NVIDIA H100 80GB HBM3", catalog) == "h100"
    assert match_sku("NVIDIA H100 SXM5 80GB", catalog) == "h100"
    assert match_sku("NVIDIA H100 NVL", catalog) == "h100-nvl"
    assert match_sku("NVIDIA H100 PCIe", catalog) is None


def test_match_sku_ambiguous_catalog():
    with pytest.raises(RecipeError) as err:
        match_sku("NVIDIA H200", {"h200": "H200", "h200-dup": "h200"})
    assert str(err.value) == (
        "GPU catalog: GPU name 'NVIDIA H200' matches 'h200' of 'h200-dup' and an equally long substring of "
        "'h200'. Fix: make each GPU's NVML name substring unique (e.g. 'H100 PCIe' vs 'H100 80GB HBM3')."
    )


# ----------------------------------------------------------------------------- NVML detection


class NVMLError(Exception):
    pass


def fake_nvml(names, cc=(9, 0), total=150_754_820_096, init_error=False):
    state = {"shutdown": 0}

    def init():
        if init_error:
            raise NVMLError("NVML Shared Library Not Found")

    def shutdown():
        state["shutdown"] += 1

    module = SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=init,
        nvmlShutdown=shutdown,
        nvmlDeviceGetCount=lambda: len(names),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: names[h].encode() if h == 0 else names[h],  # old bindings return bytes
        nvmlDeviceGetCudaComputeCapability=lambda h: cc,
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=total, free=1, used=2),
    )
    return module, state


def test_detect_with_stand_in_nvml():
    module, state = fake_nvml(["NVIDIA H200", "NVIDIA H200", "NVIDIA H100 80GB HBM3"])
    gpu = detect_local_gpu(CATALOG, nvml=module)
    assert gpu == LocalGpu(
        name="NVIDIA H200", compute_capability="9.0", memory_bytes=150_754_820_096, count=2, sku="h200"
    )
    assert state["shutdown"] == 1
    module, _ = fake_nvml(["NVIDIA B200"], cc=(10, 0))
    assert detect_local_gpu(nvml=module) == LocalGpu("NVIDIA B200", "10.0", 150_754_820_096, 1, None)


def test_detect_without_driver_or_devices():
    module, state = fake_nvml(["x"], init_error=True)
    assert detect_local_gpu(CATALOG, nvml=module) is None
    assert state["shutdown"] == 0
    module, state = fake_nvml([])
    assert detect_local_gpu(CATALOG, nvml=module) is None
    assert state["shutdown"] == 1


def test_detect_with_real_pynvml():
    gpu = detect_local_gpu(CATALOG)
    if not Path("/dev/nvidiactl").exists():
        assert gpu is None
    else:
        assert gpu is not None and gpu.memory_bytes > 0
        assert gpu.compute_capability.replace(".", "").isdigit()
