"""`sheepdog costs --plot FILE.png`: cost and savings per day by lane (matplotlib, Agg).

matplotlib is the `plot` extra (`pip install 'sheepdog[plot]'`), not a dependency of every
worker; without it the plot is refused with one line saying what to install.
"""

from __future__ import annotations

from pathlib import Path

from costs.report import Line

ROUTE_COLOURS = {
    "priority": "#c44e52",
    "stream": "#4c72b0",
    "flex": "#dd8452",
    "batch": "#55a868",
}
ORDER = ("priority", "stream", "flex", "batch")
MISSING_MATPLOTLIB = "--plot needs matplotlib, the plot extra: pip install 'sheepdog[plot]'"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise PlotUnavailable (saying what to install) when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(MISSING_MATPLOTLIB) from None


def plot_daily(rows: list[tuple[str, str, Line]], path: Path) -> Path:
    """Write a PNG: stacked cost per day by lane (or route) above, with what the same requests
    would have cost at the standard rate as a line; savings per day by lane below."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    days = sorted({day for day, _, _ in rows})
    routes = sorted(
        {route for _, route, _ in rows}, key=lambda r: (ORDER.index(r) if r in ORDER else 9, r)
    )
    index = {day: i for i, day in enumerate(days)}
    cost = {r: [0.0] * len(days) for r in routes}
    saved = {r: [0.0] * len(days) for r in routes}
    for day, route, line in rows:
        cost[route][index[day]] = float(line.cost_usd)
        saved[route][index[day]] = float(line.savings_usd)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    x = list(range(len(days)))
    base = [0.0] * len(days)
    for route in routes:
        colour = ROUTE_COLOURS.get(route)
        top.bar(x, cost[route], bottom=base, label=route, color=colour)
        base = [b + c for b, c in zip(base, cost[route], strict=True)]
    standard = [0.0] * len(days)
    for day, _, line in rows:
        standard[index[day]] += float(line.standard_cost_usd)
    if days:
        top.plot(x, standard, "k--", marker="o", label="all standard")
    top.set_ylabel("cost (USD)")
    top.set_title("Sheepdog: cost per day by lane")
    if routes:
        top.legend(loc="upper left")
    base = [0.0] * len(days)
    for route in routes:
        bottom.bar(x, saved[route], bottom=base, label=route, color=ROUTE_COLOURS.get(route))
        base = [b + s for b, s in zip(base, saved[route], strict=True)]
    bottom.set_ylabel("saved vs standard rate (USD)")
    bottom.set_title("savings per day by lane")
    bottom.set_xticks(x, days, rotation=45, ha="right")
    if not days:
        top.text(0.5, 0.5, "no costs recorded in this period", ha="center", transform=top.transAxes)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path
