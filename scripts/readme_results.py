"""Copy the results table of the last `dvc repro` (reports/readme_results.md) into README.md's
results block (--write), or fail when they differ (--check, as scripts/check_repro.py does).

Usage: .venv/bin/python scripts/readme_results.py --write | --check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.readme_results import drift, with_block

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GENERATED = ROOT / "reports" / "readme_results.md"


def main(write: bool) -> int:
    problem = drift(README, GENERATED)
    if problem is None:
        print(f"{README.name}: results block matches {GENERATED.relative_to(ROOT)}")
        return 0
    if not write or not GENERATED.is_file():
        print(problem, file=sys.stderr)
        return 1
    README.write_text(with_block(README.read_text(encoding="utf-8"), GENERATED.read_text(encoding="utf-8")),
                      encoding="utf-8")
    print(f"wrote the results block of {README.name} from {GENERATED.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    sys.exit(main(parser.parse_args().write))
