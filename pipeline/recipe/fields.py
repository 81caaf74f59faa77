"""Field rules shared by the model.yaml and recipe schemas: pinned digests and plain file-stem names."""

from __future__ import annotations

import re

COMMIT_PATTERN = r"^[0-9a-f]{40}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
# Calibration sets and eval suites are looked up as <dir>/<name>.yaml: a name is one plain file
# stem, never a path (`../recipes/gpus` would read another file).
PLAIN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


def plain_name(value: str, what: str, directory: str) -> str:
    """`value` when it is a plain file stem of `directory`; ValueError (a pydantic field error) otherwise."""
    if len(value) > 64 or not re.match(PLAIN_NAME_PATTERN, value):
        raise ValueError(f"{what} names are plain file stems ({directory}/<name>.yaml), got {value[:60]!r}; "
                         "use up to 64 letters, digits, '-' and '_', no '/' or '..'")
    return value
