"""Which evaluation publish gates on, by the one rule (pipeline/recipe/eval_schema.py GATE_RULE): the
served one where a real engine scored the bundle, else the simulated one; its verdict alone decides,
an INCONCLUSIVE one by the recipe's `eval.gates.inconclusive`. The source says which (`scored_by`).

A served result beats the simulation because it is what a deployment delivers: served with its
FP8 KV cache by vLLM, the fp8 recipe lost ~7 points of acc_norm where the simulation lost ~1
(issue 10). Where no engine here runs the format (NVFP4, MXFP4 on a CPU machine), the served
stage records "not served here: <reason>" and the gate falls back to the simulation, saying so.
An inconclusive served verdict is not replaced by the simulated one (issue 26: that published a
bundle whose own gate report said it does not publish); the recipe's policy decides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import RegistryError
from pipeline.handoff.manifest import manifest_digest
from pipeline.handoff.models import EvaluateDetails, NotServedDetails
from pipeline.handoff.reader import open_upstream


@dataclass(frozen=True)
class GateSource:
    evaluation_dir: Path
    served: bool
    scored_by: str  # e.g. "served: vllm 0.32.0 on cpu: AMD EPYC" or "simulated (simulated-cpu); not served here: ..."


def choose_gate_source(simulated_dir: Path, served_dir: Path | None, bundle_dir: Path) -> GateSource:
    # Typed, not verified here: publish verifies the evaluation it gates on (open_upstream).
    simulated = open_upstream(Path(simulated_dir), "evaluate", verify=False).details
    path = simulated.path if isinstance(simulated, EvaluateDetails) else None
    simulated_by = f"simulated ({path})" if path else "simulated"
    if served_dir is None:
        return GateSource(Path(simulated_dir), False, f"{simulated_by}; no served evaluation given")
    opened = open_upstream(Path(served_dir), "evaluate", verify=False)
    details = opened.details
    if isinstance(details, NotServedDetails):
        return GateSource(Path(simulated_dir), False, f"{simulated_by}; not served here: {details.reason}")
    scored = opened.envelope.inputs.get("bundle")
    scored_bundle = scored.manifest_sha256 if scored else None
    if scored_bundle != manifest_digest(Path(bundle_dir)):
        raise RegistryError(str(served_dir), f"served and scored another bundle than {bundle_dir} (build manifest "
                            f"{str(scored_bundle)[:12]}…, the bundle's is {manifest_digest(Path(bundle_dir))[:12]}…).",
                            "re-run the served evaluation: dvc repro serve-eval.")
    served = details.served or {}
    # A served score without the recipe's FP8 KV cache (a CPU without AVX-512 or AMX,
    # pipeline/serving/engines_here.py) still gates, and the receipt's `gated_on` says what it covered.
    kv = f" ({served['kv_not_served']})" if served.get("kv_not_served") else ""
    # A server that reports no checkpoint root (trtllm-serve) is scored under its name only (serving/identity.py).
    if served.get("weights_checked") is False:
        kv += f" (weights not checked: {served.get('weights_note') or 'the server reports no checkpoint root'})"
    return GateSource(Path(served_dir), True,
                      f"served: {served.get('engine')} {served.get('engine_version')} on {served.get('device')}{kv}")
