"""Training curves as PNG (OUT/loss.png of the finetuning jobs, OUT/reward.png of the RL jobs)."""

from __future__ import annotations

from pathlib import Path


def plot_curves(rows: list[dict], x: str, curves: dict[str, str], png: Path, ylabel: str, title: str | None = None,
                markers: bool = False) -> None:
    """One line per `curves` key (its label the value) over `x`, from the rows that have both; no file
    when no row has any curve."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training nodes
    import matplotlib.pyplot as plt

    lines = {label: [(r[x], r[key]) for r in rows if r.get(key) is not None and x in r] for key, label in curves.items()}
    if not any(lines.values()):
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, pts in lines.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if markers else None, label=label)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if len(lines) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
