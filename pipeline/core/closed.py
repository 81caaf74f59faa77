"""`Closed`: the base of the pydantic models a recipe, a model.yaml and a stage handoff are read into.

Closed means a key no model names is an error (`extra="forbid"`), not silently dropped, and a value
of another type is refused (`strict`: YAML's `true` is not the integer 1, and "8" is not 8). The
models are frozen: what was read is not edited in place. `populate_by_name` lets a field with an
alias (the handoff envelope's `schema`) be set by its name; a model without aliases is unaffected.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)
