"""PNG bar plots for the report (matplotlib's Agg canvas: no display, no pyplot global state)."""

from __future__ import annotations

from pathlib import Path


def plot_bars(values: dict[str, float], title: str, ylabel: str, path: str | Path) -> Path:
    """Write a bar chart of ``values`` (label -> value, in the given order) to ``path`` (PNG); returns it.

    Each bar is annotated with its value. Raises ``ValueError`` for no values or a non-finite value.
    """
    import math

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not values:
        raise ValueError("plot_bars: values is empty")
    bad = {k: v for k, v in values.items() if not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad:
        raise ValueError(f"plot_bars: non-finite or non-numeric value(s) {bad}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels, heights = list(values), [float(v) for v in values.values()]
    fig = Figure(figsize=(max(4.0, 1.1 * len(labels) + 1.5), 3.6), dpi=100)
    FigureCanvasAgg(fig)  # render with Agg; no pyplot, no global backend switch
    ax = fig.subplots()
    bars = ax.bar(range(len(labels)), heights, color="#4C72B0")
    ax.set_xticks(range(len(labels)), labels, rotation=20 if len(labels) > 4 else 0, ha="right"
                  if len(labels) > 4 else "center")
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
