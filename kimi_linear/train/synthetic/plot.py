"""The synthetic suite's two figures (matplotlib, Agg backend): the accuracy table as a heatmap-style grid
(table.png: one panel per task, lengths across, mixers down, ours with the report's number under it) and the
accuracy-vs-step curves at one length (curves_1024.png: one panel per task, one line per mixer)."""

from __future__ import annotations

import os

from kimi_linear.train.synthetic.reference import reference

TABLE_PNG = "table.png"
CURVES_PNG = "curves_{n}.png"
COLORS = {"kda": "tab:red", "gdn": "tab:blue", "mla": "tab:gray"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_table(runs: dict, out_dir: str) -> str:
    plt = _plt()
    tasks = [t for t in ("palindrome", "mqar", "stack") if any(k[0] == t for k in runs)]
    mixers = [m for m in ("kda", "gdn", "mla") if any(k[1] == m for k in runs)]
    lengths = sorted({k[2] for k in runs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 0.9 * len(mixers) + 1.4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        grid = [[(runs.get((t, m, n)) or {}).get("best_acc") for n in lengths] for m in mixers]
        ax.imshow([[(v or 0.0) for v in row] for row in grid], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, m in enumerate(mixers):
            for j, n in enumerate(lengths):
                v, ref = grid[i][j], reference(t, m, n)
                text = ("-" if v is None else f"{100 * v:.0f}") + ("" if ref is None else f"\n({ref:g})")
                ax.text(j, i, text, ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(mixers)), [m.upper() for m in mixers])
        ax.set_title(f"{t}: best accuracy % (report)")
        ax.set_xlabel("sequence length")
    fig.tight_layout()
    path = os.path.join(out_dir, TABLE_PNG)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(runs: dict, out_dir: str, seq_len: int = 1024) -> str | None:
    keys = [k for k in runs if k[2] == seq_len and runs[k]["points"]]
    if not keys:
        return None
    plt = _plt()
    tasks = [t for t in ("palindrome", "mqar", "stack") if any(k[0] == t for k in keys)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for m in ("kda", "gdn", "mla"):
            run = runs.get((t, m, seq_len))
            if run and run["points"]:
                steps, accs = zip(*run["points"])
                ax.plot(steps, [100 * a for a in accs], "-o", ms=2, color=COLORS[m], label=m.upper())
        ax.set(title=f"{t}, length {seq_len}", xlabel="training step", ylabel="answer accuracy %", ylim=(0, 101))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, CURVES_PNG.format(n=seq_len))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
