"""`kimi-linear train --plot OUT`: OUT/metrics.jsonl's loss and throughput curves, drawn to OUT/metrics.png.

Three panels against the optimizer step: training loss (and eval loss where logged), tokens/s, and the
learning rate. matplotlib runs with the Agg backend (no display needed).
"""

from __future__ import annotations

import os

from kimi_linear.train.metrics import read_metrics


def plot_metrics(out_dir: str, png: str | None = None) -> str:
    """Draw the curves of `out_dir`/metrics.jsonl; return the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(out_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    png = png or os.path.join(out_dir, "metrics.png")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    ax = axes[1]
    ax.plot([r["step"] for r in train], [r.get("tokens_per_s", 0) for r in train])
    ax.set(xlabel="step", ylabel="tokens/s", title="throughput")
    ax = axes[2]
    ax.plot([r["step"] for r in train], [r.get("lr", 0) for r in train])
    ax.set(xlabel="step", ylabel="lr", title="learning rate")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
