"""Figures from metrics tables (seaborn, Agg backend): mean over seeds with 95% confidence bands."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

AXIS_LABELS = {
    "iter": "iteration",
    "bits_up": "cumulative uplink bits (all devices)",
    "sim_time": "simulated wall-clock time (s)",
    "opt_gap": "optimality gap F(θ) − F*",
    "train_loss": "training loss F(θ)",
    "test_loss": "test loss",
    "test_acc": "test accuracy",
    "grad_norm": "‖∇F(θ)‖",
}
LOG_COLUMNS = {"bits_up", "opt_gap", "train_loss", "grad_norm", "test_loss"}


def line_figure(data: pd.DataFrame, x: str, y: str, hue: str, out: Path, title: str = "") -> Path:
    """One line per ``hue`` value: mean of ``y`` over seeds against ``x``, 95% CI band; writes PNG
    (and PDF beside it). Log axes for quantities that span decades."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = data[data[x].notna() & data[y].notna()].copy()
    if x != "iter" and "iter" in data:
        # seeds reach different x (bits, time) at the same iteration: align them on the mean x of
        # each (curve, iteration) so the band is the spread of y across seeds, not across x
        data[x] = data.groupby([hue, "iter"])[x].transform("mean")
    if x == "bits_up":
        data = data[data[x] > 0]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    sns.lineplot(data=data, x=x, y=y, hue=hue, errorbar=("ci", 95), ax=ax)
    if x in LOG_COLUMNS:
        ax.set_xscale("log")
    if y in LOG_COLUMNS and (data[y] > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel(AXIS_LABELS.get(x, x))
    ax.set_ylabel(AXIS_LABELS.get(y, y))
    ax.set_title(title, fontsize=10)
    ax.legend(title=None, fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    fig.savefig(out.with_suffix(".pdf"))
    plt.close(fig)
    return out
