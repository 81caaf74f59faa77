"""Copy the tables of the last report stages (reports/readme_results.md, and after `make frontier`
reports/frontier/readme_results.md) into README.md's generated blocks (--write), or fail when one
differs (--check, as scripts/check_repro.py does). A block whose report was never generated here is
left as it is (--write) and not compared (--check), except the results block, which must exist.

Usage: .venv/bin/python scripts/readme_results.py --write | --check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.reporting.readme_results import BLOCKS, blocks_to_compare, drift, with_block

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def main(write: bool) -> int:
    failed = 0
    compared = blocks_to_compare(ROOT)
    for spec in BLOCKS:
        if spec not in compared:
            print(f"{README.name}: {spec.name} block left as it is ({spec.generated} not generated here)")
            continue
        generated = ROOT / spec.generated
        problem = drift(README, generated, spec)
        if problem is None:
            print(f"{README.name}: {spec.name} block matches {spec.generated}")
        elif write and generated.is_file():
            README.write_text(with_block(README.read_text(encoding="utf-8"), generated.read_text(encoding="utf-8"),
                                         spec=spec), encoding="utf-8")
            print(f"wrote the {spec.name} block of {README.name} from {spec.generated}")
        else:
            print(problem, file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    sys.exit(main(parser.parse_args().write))
