"""`forge`: one CLI whose verbs are the pipeline's stages. dvc.yaml calls these same commands.

This module is the parser and the dispatch: each verb's arguments and body live in its module
(pipeline/verbs/, pipeline/stages/, pipeline/fleet/cli.py), which registers it here.
Only this module touches argv, the environment and the process exit code. A ForgeError becomes
one line on stderr and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from pipeline import __version__
from pipeline.core.errors import ForgeError
from pipeline.fleet.cli import register as register_fleet
from pipeline.verbs.newmodel import register as register_new
from pipeline.verbs.plan import register as register_plan
from pipeline.verbs.recipes import register as register_recipe_verbs
from pipeline.verbs.recommend import register as register_recommend

log = logging.getLogger("forge")

EXAMPLES = """examples:
  forge validate                                   # every recipe under recipes/
  forge show recipes/smollm2-135m-instruct/fp8.yaml
  forge plan recipes/llama-3-3-70b-instruct/fp8.yaml
  forge plan --model-config recipes/llama-3-3-70b-instruct/config.json --format nvfp4 --gpu b200
  forge plan --dvc                                 # regenerate plan.yaml (+ dvc.yaml artifacts)
  forge recommend recipes/llama-3-3-70b-instruct --input-len 1000 --output-len 1000 --rate 20 --ttft-ms 2000 --tpot-ms 50
  forge list --gpu h200                            # published artifacts for one GPU
  forge pull smollm2-135m-instruct --gpu auto --dest ./model   # best artifact for this machine's GPU
  forge promote smollm2-135m-instruct-fp8-h200 --version v1.0.0 --to prod   # a stage label, in the registry
  forge probe                                      # measure this GPU's bandwidth and GEMM rates
  forge new meta-llama/Llama-3.1-8B-Instruct --revision <40-hex commit> --config config.json --gpu h200 --gpu b200
stage verbs (download, calibration-set, calibrate, baseline, evaluate, build, throughput, report,
publish) are what dvc.yaml runs; `forge VERB --help` shows each one's arguments and an example.
"""




def configure_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    else:  # plain lines under DVC and CI, no progress bars (tqdm >= 4.66 reads TQDM_DISABLE)
        import os

        os.environ.setdefault("TQDM_DISABLE", "1")
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        # Libraries' deprecation notices (torch, transformers, ModelOpt, lm-eval) speak to their
        # callers' authors, not to someone running a stage; `forge -v` shows them.
        import warnings

        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)


# ---------------------------------------------------------------------------- parser


def build_parser(stage_verbs: dict[str, Callable[[argparse._SubParsersAction], None]] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forge", description=__doc__.splitlines()[0], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors (also after the verb)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"forge {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    register_recipe_verbs(sub)
    register_plan(sub)
    register_recommend(sub)
    register_new(sub)
    register_fleet(sub)

    for register in (stage_verbs or {}).values():
        register(sub)
    _accept_global_flags_after_the_verb(sub)
    return parser


def _accept_global_flags_after_the_verb(sub: argparse._SubParsersAction) -> None:
    """`forge validate --debug` as well as `forge --debug validate`. SUPPRESS keeps a verb's parser
    from resetting what the top-level parser already set (argparse copies sub-parser defaults)."""
    for verb_parser in set(sub.choices.values()):
        for flags, options in ((("--debug",), {"help": "show tracebacks for errors"}),
                               (("-v", "--verbose"), {"help": "debug logging"})):
            try:
                verb_parser.add_argument(*flags, action="store_true", default=argparse.SUPPRESS, **options)
            except argparse.ArgumentError:  # the verb defines this flag itself
                pass


def stage_verbs() -> dict[str, Callable[[argparse._SubParsersAction], None]]:
    """Stage modules register their own sub-commands; imported lazily so `forge validate` stays fast."""
    from pipeline import stages, verbs

    return {**stages.registry_of_verbs(), **verbs.registry_of_verbs()}


# Only these verbs may reach the Hugging Face Hub (weights; hub calibration data). Every other
# stage runs offline, so a compute step can never download silently.
ONLINE_VERBS = {"download", "calibration-set"}


def main(argv: list[str] | None = None) -> int:
    import os

    parser = build_parser(stage_verbs())
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    if args.verb not in ONLINE_VERBS:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # `forge plan ... | head -1`: the reader left. Point stdout at devnull so the interpreter's
        # final flush does not raise again (Python docs, signal module: "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the broken pipe
    except ForgeError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
