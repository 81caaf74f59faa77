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


def manifest(name, version="v1.0.0", *, gpu="h200", cc="9.0", bits=8.0, verdict="pass", tp=1, mem=None, fmt="fp8",
             engine=None):
    meta = {
        "format": fmt,
        "gpu": gpu,
        "compute_capability": cc,
        "bits_per_weight": bits,
        "gate": {"verdict": verdict},
        "tp": tp,
    }
    if mem is not None:
        meta["min_gpu_memory_bytes"] = mem
    if engine is not None:
        meta["engine"] = engine
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
    assert reject_reason(cands[0], H200) == "accuracy gate verdict is 'fail', not one that publishes (pass, inconclusive)"


def test_an_inconclusive_artifact_its_recipe_published_is_chosen_only_where_no_pass_qualifies():
    """The registry holds INCONCLUSIVE artifacts a recipe published with `inconclusive: publish`
    (GATE_RULE); `pull --gpu` takes one (issue 26: it refused the embedded fp8 artifact), after any PASS."""
    inconclusive = manifest("m-fp8-h200", "v1.0.0", bits=8.0, verdict="inconclusive")
    assert pick([inconclusive], H200) == "m-fp8-h200@v1.0.0" and reject_reason(inconclusive, H200) is None
    passing = manifest("m-fp8-h200", "v1.0.1", bits=8.0, gpu="h100")
    assert pick([inconclusive, passing], H200) == "m-fp8-h200@v1.0.1"  # a PASS first, even for another SKU


def test_compute_capability_tp_and_memory_filter():
    b200_only = [manifest("m-nvfp4-b200", gpu="b200", cc="10.0", bits=4.5, fmt="nvfp4")]
    assert pick(b200_only, H200) is None
    assert reject_reason(b200_only[0], H200) == ("nvfp4 weights need compute capability 10.0 or newer; "
                                                 "this GPU (NVIDIA H200) is 9.0")

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


def test_a_checkpoint_bundle_runs_on_any_gpu_at_its_formats_floor_an_engine_only_on_its_own():
    """Issue 26 item 5: FP8's floor is 8.9 (pipeline/core/formats.py), so an FP8 bundle built for an H200
    runs on a B200 and an L40S; a serialized TensorRT engine only on the compute capability it was built for."""
    b200 = LocalGpu("NVIDIA B200", "10.0", 192_265_846_784, sku="b200")
    l40s = LocalGpu("NVIDIA L40S 48GB", "8.9", 48_305_799_168, sku="l40s")
    a100 = LocalGpu("NVIDIA A100-SXM4-80GB", "8.0", 85_899_345_920)
    fp8 = manifest("m-fp8-h200")
    assert pick([fp8], b200) == pick([fp8], l40s) == "m-fp8-h200@v1.0.0"
    assert reject_reason(fp8, a100) == ("fp8 weights need compute capability 8.9 or newer; "
                                        "this GPU (NVIDIA A100-SXM4-80GB) is 8.0")
    kv = manifest("m-bf16-h200", fmt="bf16", bits=16.0)
    kv["metadata"]["kv_cache_dtype"] = "fp8"
    assert reject_reason(kv, a100) == ("the fp8 KV cache needs compute capability 8.9 or newer; "
                                       "this GPU (NVIDIA A100-SXM4-80GB) is 8.0")
    # the exact SKU still comes first: its options were sized for this card
    assert pick([fp8, manifest("m-fp8-b200", gpu="b200", cc="10.0")], b200) == "m-fp8-b200@v1.0.0"
    engine = manifest("m-fp8-h200-engine", engine="tensorrt")
    assert pick([engine], b200) is None and pick([engine], H100) == "m-fp8-h200-engine@v1.0.0"
    assert reject_reason(engine, b200) == ("a TensorRT engine built for compute capability 9.0 (h200) runs only there; "
                                           "this GPU (NVIDIA B200) is 10.0")
