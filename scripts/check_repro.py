"""CI check run after `make repro` (.ci/run): the promises of the main job hold.

`make repro` runs the embedded default (`dvc repro report`: plan.yaml's targets whose recipes are not
`frontier: true`, pipeline/planning/dvc_plan.py); every check below is about those.

1. Every planned target (plan.yaml `targets`) has a publish receipt in data/published/<target>/.
2. Each published artifact pulls into a fresh directory with `forge pull` (which verifies every
   file's sha256 against the registry manifest), and the pulled files are byte-for-byte the bundle's.
3. Each refused one was refused for a failed accuracy gate, and at least one artifact was published.
4. A second `dvc repro report` publishes nothing new (the registry's versions and stage labels are
   unchanged) and leaves `dvc status --with-deps report` with no changed stage.
5. A stage re-run on the same inputs writes the same bytes: `dvc repro --force` of the first target's
   calibration-set, build, throughput and publish stages leaves dvc.lock unchanged (no wall-clock byte
   in any output: pipeline/handoff/manifest.py; fleet-check proves download and calibrate the same way).
6. Editing only one target's serving shape in a recipe changes only that target's stages (`dvc status`
   names build@<target> and throughput@<target>, nothing upstream); the recipe is restored afterwards.
7. README.md's results block is the table this run generated (reports/readme_results.md), and its
   frontier block the frontier report's, where `make frontier` ran here.

Usage (from anywhere): .venv/bin/python scripts/check_repro.py [--skip-repro]
Exit code 0 when everything holds, 1 otherwise; a summary line per check either way.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.core.files import file_digests
from pipeline.core.layout import RECEIPT_FILE
from pipeline.handoff.reader import open_upstream
from pipeline.planning.dvc_plan import REPORT_STAGE, in_report
from pipeline.registry.artifacts import PULL_WRITES
from pipeline.reporting.readme_results import blocks_to_compare, drift, other_host

ROOT = Path(__file__).resolve().parents[1]
PLAN_FILE = ROOT / "plan.yaml"
PUBLISHED_DIR = ROOT / "data" / "published"
VENV_BIN = ROOT / ".venv" / "bin"
FORGE = VENV_BIN / "forge"
DVC = VENV_BIN / "dvc"


@dataclass(frozen=True)
class Check:
    ok: bool
    line: str


def main(skip_repro: bool = False) -> int:
    targets = planned_targets(PLAN_FILE)
    receipts = {key: read_receipt(PUBLISHED_DIR / key) for key in targets}
    checks = [check_receipt_present(key, receipt) for key, receipt in receipts.items()]
    found = {key: receipt for key, receipt in receipts.items() if receipt is not None}
    with tempfile.TemporaryDirectory(prefix="forge-check-pull-") as scratch:
        checks += [check_pull(key, receipt, targets[key]["gpu"], Path(scratch) / key)
                   for key, receipt in found.items() if receipt["published"]]
    checks += [check_refusal(key, receipt) for key, receipt in found.items() if not receipt["published"]]
    checks.append(check_something_published(found))
    checks += check_readme_results()
    checks += check_served(targets)
    if not skip_repro:
        registries = sorted({receipt["registry"] for receipt in found.values() if receipt["published"]})
        before = {url: registry_snapshot(url) for url in registries}
        checks.append(check_second_repro())
        checks += [check_unchanged(url, before[url], registry_snapshot(url)) for url in registries]
        checks.append(check_dvc_status())
        checks.append(check_forced_rerun(targets))
        checks.append(check_serving_shape_edit(targets))
    for check in checks:
        print(("ok    " if check.ok else "FAIL  ") + check.line)
    failed = sum(not c.ok for c in checks)
    print(f"check_repro: {len(checks) - failed} of {len(checks)} checks passed")
    return 1 if failed else 0


def planned_targets(plan_file: Path) -> dict[str, dict]:
    """The targets `make repro` builds (the frontier recipes are `make frontier`'s)."""
    targets = yaml.safe_load(plan_file.read_text())["targets"]
    return {key: t for key, t in targets.items() if in_report(t, frontier=False)}


def read_receipt(out_dir: Path) -> dict | None:
    path = out_dir / RECEIPT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_receipt_present(key: str, receipt: dict | None) -> Check:
    if receipt is None:
        return Check(False, f"{key}: no publish receipt in {PUBLISHED_DIR / key} (did the publish stage run?)")
    return Check(True, f"{key}: publish receipt found ({'published' if receipt['published'] else 'refused'})")


def check_pull(key: str, receipt: dict, gpu: str, dest: Path) -> Check:
    """`forge pull` verifies each file against the registry manifest; then compare with the bundle itself."""
    name, version = receipt["name"], receipt["version"]
    done = run([str(FORGE), "pull", name, "--version", version, "--registry", receipt["registry"], "--gpu", gpu,
                "--dest", str(dest)])
    if done.returncode != 0:
        return Check(False, f"{key}: forge pull {name} {version} failed: {tail(done)}")
    bundle = Path(open_upstream(PUBLISHED_DIR / key, "publish", verify=False).envelope.inputs["bundle"].path)
    bundle = bundle if bundle.is_absolute() else ROOT / bundle
    pulled = file_digests(dest, exclude=PULL_WRITES)  # forge-artifact.json, SHA256SUMS: written by pull
    expected = file_digests(bundle, exclude=())
    if pulled != expected:
        differing = sorted(set(pulled) ^ set(expected) | {k for k in set(pulled) & set(expected)
                                                           if pulled[k] != expected[k]})
        return Check(False, f"{key}: pulled {name} {version} differs from {bundle}: {', '.join(differing[:5])}")
    size = sum(entry["size"] for entry in pulled.values())
    return Check(True, f"{key}: pulled {name} {version}, {len(pulled)} files ({size / 1e6:,.1f} MB) verified, "
                       f"identical to {bundle.relative_to(ROOT) if bundle.is_relative_to(ROOT) else bundle}")


def check_refusal(key: str, receipt: dict) -> Check:
    failures = receipt.get("gate_failures") or []
    # an inconclusive gate refuses too unless its recipe says eval.gates.inconclusive: publish
    if not failures or not str(receipt.get("reason", "")).startswith(("accuracy gate failed",
                                                                      "accuracy gate inconclusive")):
        return Check(False, f"{key}: not published, but not for a failed gate: {receipt.get('reason')!r}")
    return Check(True, f"{key}: refused for its accuracy gate ({', '.join(f['metric'] for f in failures)})")


def check_something_published(receipts: dict[str, dict]) -> Check:
    published = [key for key, receipt in receipts.items() if receipt["published"]]
    if not published:
        return Check(False, "no artifact was published: every target was refused or missing")
    return Check(True, f"{len(published)} of {len(receipts)} targets published")


# Formats vLLM's CPU build serves here (pipeline/engines/contracts.py vllm-cpu contract; issue 10's acceptance:
# the baseline and FP8 are served for real by `make repro`).
SERVED_HERE = ("fp8",)


def check_served(targets: dict[str, dict]) -> list[Check]:
    """The baseline and every FP8 target were scored through a real engine (serve-baseline, serve-eval),
    not recorded as "not served here"."""
    eval_dir = ROOT / "data" / "eval"
    dirs = {f"{m}-baseline-served" for m in {t.get("model") for t in targets.values()} if m}
    dirs |= {f"{key}-served" for key, t in targets.items() if t.get("format") in SERVED_HERE}
    checks = []
    for name in sorted(dirs):
        metrics = eval_dir / name / "metrics.json"
        data = json.loads(metrics.read_text()) if metrics.is_file() else {}
        served = (data.get("extra") or {}).get("served")  # a served score's labels (pipeline/accuracy/lm_eval_runner.py)
        if not served:
            reason = data.get("reason") or f"no served score in {metrics}"
            checks.append(Check(False, f"{name}: not served by a real engine ({reason})"))
        else:
            checks.append(Check(True, f"{name}: served by {served.get('engine')} {served.get('engine_version')} "
                                      f"on {served.get('device')}"))
    return checks


def check_readme_results() -> list[Check]:
    """The results block always; the frontier block where this checkout ran `make frontier`."""
    checks = []
    for spec in blocks_to_compare(ROOT):
        elsewhere = other_host(ROOT / "README.md", ROOT / spec.generated, spec)
        if elsewhere:
            checks.append(Check(True, f"not compared: {elsewhere}"))
            continue
        problem = drift(ROOT / "README.md", ROOT / spec.generated, spec)
        checks.append(Check(False, problem) if problem else
                      Check(True, f"README.md {spec.name} block matches {spec.generated} from this run"))
    return checks


def registry_snapshot(url: str) -> dict[str, dict]:
    """{name: {versions, stages}} as `forge list --json` reports them."""
    done = run([str(FORGE), "list", "--registry", url, "--json"])
    if done.returncode != 0:
        return {"error": {"versions": [], "stages": {}, "message": tail(done)}}
    return {row["name"]: {"versions": row["versions"], "stages": row["stages"]} for row in json.loads(done.stdout)}


def check_second_repro() -> Check:
    done = run([str(DVC), "repro", REPORT_STAGE])
    if done.returncode != 0:
        return Check(False, f"second dvc repro {REPORT_STAGE} failed: {tail(done)}")
    return Check(True, f"second dvc repro {REPORT_STAGE} finished")


def check_unchanged(url: str, before: dict, after: dict) -> Check:
    if before != after:
        changed = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
        return Check(False, f"registry {url}: the second repro changed {', '.join(changed)}: {before} -> {after}")
    count = sum(len(entry["versions"]) for entry in after.values())
    return Check(True, f"registry {url}: nothing new published ({len(after)} artifacts, {count} versions)")


def check_dvc_status() -> Check:
    done = run([str(DVC), "status", "--with-deps", REPORT_STAGE, "--json"])
    if done.returncode != 0:
        return Check(False, f"dvc status failed: {tail(done)}")
    changed = json.loads(done.stdout or "{}")
    if changed:
        return Check(False, f"dvc status reports changed stages: {', '.join(sorted(changed))}")
    return Check(True, f"dvc status --with-deps {REPORT_STAGE}: every stage up to date")


def check_forced_rerun(targets: dict[str, dict]) -> Check:
    key, target = min(targets.items())
    stages = [f"calibration-set@{target['recipe_id']}", f"build@{key}", f"throughput@{key}", f"publish@{key}"]
    lock = ROOT / "dvc.lock"
    before = lock.read_text()
    for stage in stages:
        done = run([str(DVC), "repro", "--force", "--single-item", stage])
        if done.returncode != 0:
            return Check(False, f"dvc repro --force {stage} failed: {tail(done)}")
    after = lock.read_text()
    if after != before:
        changed = [line.strip() for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
                   if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        return Check(False, f"re-running {', '.join(stages)} on the same inputs rewrote {len(changed)} line(s) of "
                            f"dvc.lock: {' | '.join(changed[:4])}")
    return Check(True, f"re-running {', '.join(stages)} on the same inputs left dvc.lock byte-identical")


def check_serving_shape_edit(targets: dict[str, dict]) -> Check:
    key, target = sorted(targets.items())[0]
    recipe = ROOT / target["recipe"]
    original = recipe.read_text()
    data = yaml.safe_load(original)
    data["targets"][target["gpu"]]["max_output_len"] += 1
    try:
        recipe.write_text(yaml.safe_dump(data, sort_keys=False))
        done = run([str(DVC), "status", "--with-deps", REPORT_STAGE, "--json"])
    finally:
        recipe.write_text(original)
    if done.returncode != 0:
        return Check(False, f"dvc status after a serving-shape edit failed: {tail(done)}")
    changed = set(json.loads(done.stdout or "{}"))
    expected = {f"build@{key}", f"throughput@{key}"}
    if changed != expected:
        return Check(False, f"editing targets.{target['gpu']} of {target['recipe']} changed {sorted(changed)}, "
                            f"expected exactly {sorted(expected)}")
    return Check(True, f"editing targets.{target['gpu']}.max_output_len changes only {', '.join(sorted(expected))} "
                       "(their downstream publish/report follow); calibrate and evaluate untouched")


def run(command: list[str]) -> subprocess.CompletedProcess:
    # dvc.yaml's commands call `forge` by name: put the venv first on PATH, as the Makefile does.
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)


def tail(done: subprocess.CompletedProcess, lines: int = 5) -> str:
    return " | ".join((done.stderr or done.stdout).strip().splitlines()[-lines:])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-repro", action="store_true", help="skip the second `dvc repro` and `dvc status`")
    sys.exit(main(parser.parse_args().skip_repro))
