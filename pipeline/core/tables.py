"""Print rich tables without ever cutting a cell: artifact, recipe and GPU names are things users
copy. rich assumes 80 columns off a terminal and shrinks or ellipsizes cells to fit the console
(rich/table.py `_calculate_column_widths` collapses wrapable columns, then truncates), so the
console is widened to the table's natural width instead."""

from __future__ import annotations

from typing import Any


def print_table(table: Any) -> None:
    from rich.console import Console
    from rich.measure import Measurement

    console = Console()
    needed = Measurement.get(console, console.options.update(max_width=100_000), table).maximum
    if needed > console.width:
        console = Console(width=needed)
    console.print(table)
