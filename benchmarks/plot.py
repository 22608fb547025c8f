"""Plots for the docs' performance page from one results JSON of ``python -m dwops bench``.

    python benchmarks/plot.py benchmarks/results/2026-11-28T2031Z-NVIDIA-H200.json --out docs/_static

writes ``<stem>-roofline.png`` (fraction of the memory floor per shape, one panel per op and
direction, bars per backend, layout and dtype) and ``<stem>-speedup.png`` (speedup over PyTorch by
op and dtype: the geometric mean over shapes, with the range of shapes as error bars).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict


def shape_label(row) -> str:
    s = row["shape"]
    if row["op"] == "conv1d":
        return f"{s['N']}x{s['C']}x{s['L']} k{s['K']}" + (f" s{s['stride']}" if s["stride"] != 1 else "")
    base = f"{s['N']}x{s['C']}x{s['H']}x{s['W']}"
    if row["op"] == "pointwise":
        return base + f"->{s['C_out']}"
    return base + f" k{s['KH']}" + (f" s{s['stride']}" if s["stride"] != 1 else "")


def panels(rows):
    """(op, direction) -> rows, in first-seen order."""
    out = defaultdict(list)
    for r in rows:
        out[(r["op"], r["direction"])].append(r)
    return out


def plot_roofline(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = panels(result["rows"]) or {("no rows in this run", ""): []}
    fig, axes = plt.subplots(len(groups), 1, squeeze=False,
                             figsize=(12, 2.2 + 0.5 * max(len({shape_label(r) for r in g})
                                                          for g in groups.values()) * len(groups)))
    for ax, ((op, direction), rows) in zip(axes[:, 0], groups.items()):
        shapes = list(dict.fromkeys(shape_label(r) for r in rows))
        series = list(dict.fromkeys((r["backend"], r["layout"], r["dtype"]) for r in rows))
        height = 0.8 / max(len(series), 1)
        for k, ser in enumerate(series):
            vals = {shape_label(r): r["roofline_fraction"] or 0.0 for r in rows
                    if (r["backend"], r["layout"], r["dtype"]) == ser}
            ys = [i + k * height for i in range(len(shapes))]
            ax.barh(ys, [vals.get(s, 0.0) for s in shapes], height=height,
                    label=" ".join(ser))
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(shapes))])
        ax.set_yticklabels(shapes, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("fraction of the memory floor (copy bandwidth)")
        ax.set_title(f"{op} {direction}", fontsize=10)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"dwops on {result['device']} ({result['date'][:10]}), copy bandwidth "
                 f"{result['copy_bandwidth_gbs']:.0f} GB/s", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speedup(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = defaultdict(list)  # (op direction, dtype, backend) -> speedups over shapes and layouts
    for r in result["rows"]:
        if r["speedup_vs_torch"]:
            agg[(f"{r['op']}\n{r['direction']}", r["dtype"], r["backend"])].append(
                r["speedup_vs_torch"])
    fig, ax = plt.subplots(figsize=(12, 4.5))
    if not agg:
        ax.text(0.5, 0.5, "no PyTorch baseline in this run", ha="center", va="center")
    else:
        ops = list(dict.fromkeys(k[0] for k in agg))
        series = list(dict.fromkeys((k[1], k[2]) for k in agg))
        width = 0.8 / len(series)
        for k, (dtype, backend) in enumerate(series):
            xs, ys, lo, hi = [], [], [], []
            for i, op in enumerate(ops):
                v = agg.get((op, dtype, backend))
                if not v:
                    continue
                g = math.exp(sum(math.log(a) for a in v) / len(v))
                xs.append(i + k * width)
                ys.append(g)
                lo.append(max(g - min(v), 0.0))  # rounding can put the mean past a lone value
                hi.append(max(max(v) - g, 0.0))
            ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=2, label=f"{backend} {dtype}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ops))])
        ax.set_xticklabels(ops, fontsize=8)
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.legend(fontsize=7, ncol=2)
    ax.set_ylabel("speedup over PyTorch (geometric mean over shapes)")
    ax.set_title(f"dwops vs PyTorch on {result['device']} ({result['date'][:10]})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a results JSON written by `python -m dwops bench`")
    parser.add_argument("--out", default=".", help="directory for the PNGs (default: .)")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        result = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, os.path.splitext(os.path.basename(args.results))[0])
    plot_roofline(result, stem + "-roofline.png")
    plot_speedup(result, stem + "-speedup.png")
    print(f"wrote {stem}-roofline.png and {stem}-speedup.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
