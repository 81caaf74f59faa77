"""The `forge` verbs that are not DVC stages. Each verb module exposes `register(subparsers)`
(argument parsing only; heavy imports happen when the verb runs). pipeline/cli.py registers the
recipe verbs (recipes.py: validate, formats, show), plan.py and newmodel.py first, so `forge --help`
lists them first; the modules of VERB_MODULES (pull, list, promote, probe) come after the stage verbs."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

VERB_MODULES: tuple[str, ...] = ("pull", "listing", "promote", "probe")


def registry_of_verbs() -> dict[str, Callable[[argparse._SubParsersAction], None]]:
    return {name: importlib.import_module(f"pipeline.verbs.{name}").register for name in VERB_MODULES}
