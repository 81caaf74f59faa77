"""Typed errors for everything a user can get wrong.

Every user-facing error says where (file, field), what is wrong, and how to fix it. The CLI turns
a ForgeError into one line on stderr and exit code 2; tracebacks only with --debug.
"""

from __future__ import annotations


class ForgeError(Exception):
    """A problem the user can fix. `str()` is the whole message."""

    def __init__(self, where: str, problem: str, fix: str | None = None):
        self.where = where
        self.problem = problem
        self.fix = fix
        text = f"{where}: {problem}" if where else problem
        if fix:
            text += f" Fix: {fix}"
        super().__init__(text)


class RecipeError(ForgeError):
    """A recipe (or the GPU catalog) is malformed or asks for something impossible."""


class StageInputError(ForgeError):
    """A stage's upstream output is missing, stale or does not match its manifest."""


class SourceError(ForgeError):
    """A model or data source cannot be reached or is corrupt."""


class CalibrationError(ForgeError):
    """Calibration did not produce a usable quantized model."""


class RegistryError(ForgeError):
    """Publishing or pulling an artifact was refused."""


class VerificationError(RegistryError):
    """A file does not match the digest its manifest records."""


class ServeError(ForgeError):
    """An engine could not be started, did not answer, or serves something other than asked."""
MAX_LISTED = 20


class RecipeProblems(RecipeError):
    """Several problems found together, reported together (torchtune's ConfigError collects them
    all): fixing one and re-running to meet the next is the loop this avoids. Each line keeps the
    file: field: problem. Fix: shape."""

    def __init__(self, problems: list[ForgeError]):
        flat: list[ForgeError] = []
        for problem in problems:
            flat.extend(problem.problems if isinstance(problem, RecipeProblems) else [problem])
        self.problems = flat
        self.where, self.problem, self.fix = flat[0].where, flat[0].problem, flat[0].fix
        lines = [f"{len(flat)} problems:"] + [f"  {p}" for p in flat[:MAX_LISTED]]
        if len(flat) > MAX_LISTED:  # a generated or hostile file must not produce an unbounded message
            lines.append(f"  ... and {len(flat) - MAX_LISTED} more; fix these first.")
        Exception.__init__(self, "\n".join(lines))


def raise_all(problems: list[ForgeError]) -> None:
    """Raise nothing, the one problem, or all of them as one RecipeProblems."""
    if len(problems) == 1 and not isinstance(problems[0], RecipeProblems):
        raise problems[0]
    if problems:
        raise RecipeProblems(problems)
