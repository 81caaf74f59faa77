"""Per-row and summary error of the throughput model against published trtllm-bench rows.

    python bench/perfmodel_error.py calibration   # the 22 rows the constants were fitted to
    python bench/perfmodel_error.py heldout       # the held-out rows: run once, never tuned against

Each row is predicted at the limits trtllm-bench picks for it (pipeline/sizing/published.py). Prints one
line per row, then median / p90 / worst |error| and the seconds one prediction takes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.gpus import load_catalog
from pipeline.sizing.iteration import Efficiency
from pipeline.sizing.published import CALIBRATION_ROWS, HELDOUT_ROWS, ROOT, errors, load_rows, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", choices=("calibration", "heldout"))
    args = parser.parse_args()
    rows = load_rows(CALIBRATION_ROWS if args.rows == "calibration" else HELDOUT_ROWS)
    start = time.perf_counter()
    result = errors(rows, load_catalog(ROOT / "pipeline/core/data/gpus.yaml"), Efficiency.load())
    seconds = (time.perf_counter() - start) / len(rows)
    print(f"{'model':15s}{'gpu':11s}{'prec':5s}{'tp':>3s}{'ISL/OSL':>12s}{'published':>11s}{'predicted':>11s}{'error':>8s}"
          f"{'batch':>7s}{'tokens':>7s}  bound prefill/decode")
    for row, p, err in result:
        print(f"{row.model:15s}{row.gpu:11s}{row.precision:5s}{row.tp:3d}{f'{row.isl}/{row.osl}':>12s}{row.measured:11,.0f}"
              f"{p.predicted_output_tok_s:11,.0f}{err:+8.1%}{p.concurrency:7d}{p.max_num_tokens:7d}  "
              f"{p.bound_prefill}/{p.bound_decode}")
    stats = summary([e for _, _, e in result])
    print(json.dumps({"rows": args.rows, **{k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()},
                      "seconds_per_prediction": round(seconds, 4)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
