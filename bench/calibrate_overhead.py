"""How much does forge's calibrate stage cost over a bare ModelOpt call on the same model, data
and format? Each variant runs in a fresh process so peak RSS is its own.

  bare        mtq.quantize(model, <same config>, forward_loop) + export_hf_checkpoint
  forge-core  pipeline.quant.modelopt_glue.calibrate + hf_export.export_unified (what the stage wraps)
  forge-stage `forge calibrate` end to end (adds the perplexity check, state save, export verification)

Usage (after `make repro` has produced the model and calibration set):
  .venv/bin/python bench/calibrate_overhead.py [--recipe recipes/smollm2-135m-instruct/fp8.yaml] [--repeats 2]
Prints one JSON object: wall seconds per variant (median), ratios to bare, peak RSS, and the RSS
growth over the process's post-import baseline (the model + calibration working set).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANT_CODE = r"""
import json, resource, sys, time
from pathlib import Path
variant, recipe_path, model_dir, calib_dir, out = sys.argv[1:6]
import torch, modelopt.torch.quantization as mtq
from modelopt.torch.export import export_hf_checkpoint
from pipeline.calibration.tensors import load_materialized
from pipeline.core.formats import FORMATS
from pipeline.sources.loading import load_checkpoint
from pipeline.quant.hf_export import export_unified
from pipeline.quant.modelopt_glue import calibrate
from pipeline.quant.quant_config import build_quant_config
from pipeline.recipe.loading import load_recipe
recipe = load_recipe(Path(recipe_path))
q = recipe.spec.quant
config = build_quant_config(FORMATS[q.format].modelopt_config, q.kv_cache_dtype, list(q.exclude))
rss_after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
loaded = load_checkpoint(Path(model_dir) / "checkpoint")
ids = load_materialized(Path(calib_dir) / "calibration.safetensors").input_ids[: recipe.spec.calibration.num_samples]
start = time.perf_counter()
if variant == "bare":
    def loop(m):
        with torch.no_grad():
            for row in ids.split(1):
                m(input_ids=row)
    mtq.quantize(loaded.model, config, loop)
    calibrated = time.perf_counter()
    loaded.model.to(torch.bfloat16)
    export_hf_checkpoint(loaded.model, export_dir=out)
else:
    calibrate(loaded.model, config, [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in ids.split(1)], progress=False)
    calibrated = time.perf_counter()
    export_unified(loaded.model, Path(out))
end = time.perf_counter()
print(json.dumps({"calibrate_s": calibrated - start, "calibrate_export_s": end - start,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "rss_after_imports": rss_after_imports}))
"""


def run_variant(variant: str, recipe: str, model_dir: str, calib_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if variant == "forge-stage":
            start = time.perf_counter()
            cmd = [sys.executable, "-m", "pipeline.cli", "calibrate", recipe, "--model", model_dir,
                   "--calibration", calib_dir, "--out", f"{tmp}/out", "--metrics", f"{tmp}/metrics.json",
                   "--timings", f"{tmp}/timings.json"]
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            subprocess.run(cmd, check=True, capture_output=True)
            wall = time.perf_counter() - start
            timings = json.loads(Path(f"{tmp}/timings.json").read_text())  # pipeline/handoff/kpis.py write_timings
            return {"stage_wall_s": wall, "calibrate_s": timings["calibrate_s"], "peak_rss": timings["peak_cpu_rss_bytes"],
                    "children_maxrss_before": before}
        proc = subprocess.run([sys.executable, "-c", VARIANT_CODE, variant, recipe, model_dir, calib_dir, f"{tmp}/out"],
                              check=True, capture_output=True, text=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/smollm2-135m-instruct/fp8.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    recipe_id = f"{Path(args.recipe).parent.name}-{Path(args.recipe).stem}"
    model_dir = f"data/models/{Path(args.recipe).parent.name}"
    calib_dir = f"data/calibration/{recipe_id}"
    runs = {v: [run_variant(v, args.recipe, model_dir, calib_dir) for _ in range(args.repeats)]
            for v in ("bare", "forge-core", "forge-stage")}
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}
    bf16_bytes = sum(p.stat().st_size for p in Path(model_dir, "checkpoint").glob("*.safetensors"))
    bare = med["bare"]
    print(json.dumps({
        "recipe": args.recipe, "repeats": args.repeats, "median": med,
        "ratio_calibrate_forge_core_vs_bare": med["forge-core"]["calibrate_s"] / bare["calibrate_s"],
        "ratio_calibrate_export_forge_core_vs_bare": med["forge-core"]["calibrate_export_s"] / bare["calibrate_export_s"],
        "ratio_stage_wall_vs_bare_calibrate_export": med["forge-stage"]["stage_wall_s"] / bare["calibrate_export_s"],
        "bf16_model_bytes": bf16_bytes,
        "rss_growth_forge_core_bytes": med["forge-core"]["peak_rss"] - med["forge-core"]["rss_after_imports"],
        "rss_growth_bare_bytes": bare["peak_rss"] - bare["rss_after_imports"],
    }, indent=2))


if __name__ == "__main__":
    main()
