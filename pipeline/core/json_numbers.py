"""How forge writes a float that strict JSON cannot hold. JSON has no infinity (RFC 8259 section 6:
"Numeric values that cannot be represented in the grammar below (such as Infinity and NaN) are not
permitted"), and a recovery ratio is infinite when its denominator is at the metric's floor
(pipeline/accuracy/gates.py), so the gate report and the published metadata spell it "inf" / "-inf" and read it back with float()."""

from __future__ import annotations

import math


def json_number(value: float | None) -> float | str | None:
    """`value`, with an infinity spelled "inf" or "-inf"."""
    if value is not None and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def from_json_number(value: float | str | None) -> float | None:
    """The float `json_number` wrote ("inf" -> inf)."""
    return float(value) if isinstance(value, str) else value
