"""deploy/kubernetes/init-container.yaml (issue 26 item 10): valid against Kubernetes' own schemas, and its
serving container is the bundle's: the TensorRT-LLM image of the one pin, SERVE.md's command bound beyond
the pod's loopback, a GPU limit of the target's TP, and a Service in front of it. Parsed, never hand-copied,
so the example cannot drift from the pin, the planner or the serve commands."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import ValidationError, validate
from kubernetes_validate.utils import latest_version

from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
from pipeline.engines.contracts import TENSORRT_LLM_VERSION
from pipeline.planning.validate import check_named_target
from pipeline.recipe.loading import load_recipe
from pipeline.serving.identity import SERVE_MD_NAME
from pipeline.serving.serve_commands import serve_commands, served_model_id
from pipeline.serving.trtllm import NGC_IMAGE
from pipeline.serving.trtllm_options import llm_api_options

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy/kubernetes/init-container.yaml"
RECIPE, GPU = ROOT / "recipes/smollm2-135m-instruct/fp8-kv-bf16.yaml", "h200"  # the artifact the pod fetches


def _resources() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


def _serve(pod: dict) -> dict:
    [serve] = pod["spec"]["containers"]
    return serve


@pytest.mark.parametrize("kind", ["Pod", "Service"])
def test_each_resource_passes_kubernetes_strict_schema(kind):
    """kubernetes-validate: the JSON schemas generated from Kubernetes' OpenAPI, strict (unknown fields refused)."""
    resource = _resources()[kind]
    assert validate(resource, latest_version(), strict=True)


def test_the_schema_check_catches_a_misspelled_gpu_limit():
    pod = copy.deepcopy(_resources()["Pod"])
    serve = _serve(pod)
    serve["resources"] = {"limit": serve["resources"]["limits"]}  # `limit` is no field of ResourceRequirements
    with pytest.raises(ValidationError, match="limit"):
        validate(pod, latest_version(), strict=True)


def test_image_is_the_tensorrt_llm_pin():
    assert _serve(_resources()["Pod"])["image"] == f"{NGC_IMAGE}:{TENSORRT_LLM_VERSION}"


def test_serving_container_runs_serve_md_on_the_targets_gpus_reachable_through_the_service():
    resources = _resources()
    pod, service = resources["Pod"], resources["Service"]
    serve = _serve(pod)
    recipe = load_recipe(RECIPE)
    catalog = load_catalog(DEFAULT_CATALOG)
    plan = check_named_target(recipe, GPU, catalog)
    options = llm_api_options(plan, recipe.spec.targets[GPU], recipe.spec.quant.format,
                              recipe.spec.quant.kv_cache_dtype)
    serve_md = serve_commands(options, plan, served_model_id(recipe)).trtllm_serve
    # SERVE.md's command from the bundle directory (the mounted volume), so /v1/models answers with the
    # name `forge evaluate --serve-url` checks; bound to every interface at the declared port.
    [mount] = serve["volumeMounts"]
    assert serve["workingDir"] == mount["mountPath"] and serve_md[1] == SERVE_MD_NAME
    [port] = serve["ports"]
    assert serve["command"] == [*serve_md, "--host", "0.0.0.0", "--port", str(port["containerPort"])]
    assert serve["resources"]["limits"] == {"nvidia.com/gpu": options["tensor_parallel_size"]}
    assert serve["readinessProbe"]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]
    # ... and it serves the artifact the init container fetches.
    [init] = pod["spec"]["initContainers"]
    url = next(e["value"] for e in init["env"] if e["name"] == "ARTIFACT_URL")
    assert url.split("/")[-2] == recipe.artifact_name(GPU)
