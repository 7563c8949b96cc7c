"""What the bench scripts print: percentiles, medians over runs, and their tables."""

from __future__ import annotations

import statistics

Measure = tuple[str, str, str]  # a row of a measures table: name, result, note


def pct(values: list[float], q: float) -> float:
    """The q-quantile of `values` (the nearest rank below; NaN when there are none)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def med(runs: list[dict[str, float]], key: str) -> float:
    """The median of one figure over the runs."""
    return statistics.median(run[key] for run in runs)


def fmt(values: dict[str, float]) -> str:
    """One run's figures on a line."""
    return ", ".join(f"{k}={v:.3g}" for k, v in values.items())


def print_grid(title: str, rows: list[list[str]]) -> None:
    """The title, then the rows indented with their columns aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(title)
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


def print_measures(title: str, rows: list[Measure]) -> None:
    """The title, then a measure / result / note table."""
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}\n")
    print(f"{'measure':<{width}}  {'result':>18}  note")
    print(f"{'-' * width}  {'-' * 18}  {'-' * 30}")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>18}  {note}")
