"""Latency against batch size per variant, W1 (a small MLP field) and W5 (the transformer expert),
from a gpu_bench results file.

    python bench/plot.py bench/results/<date>-<gpu>.json [--out bench/results/<...>.png]
"""

import argparse
import json
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = {"W1": "W1: bf16 MLP field", "W5": "W5: transformer expert over a prompt KV cache"}


def series(rows, workload):
    """``{variant: [(batch, median_us), ...]}`` of one workload's timed rows."""
    out = {}
    for r in rows:
        m = re.fullmatch(rf"{workload}-(?:\w+-)?b(\d+)", r["workload"])
        if m and r["median_us"] is not None:
            out.setdefault(r["variant"], []).append((int(m.group(1)), r["median_us"]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--out", default=None, help="PNG path (default: next to the results file)")
    args = ap.parse_args()
    data = json.load(open(args.results))
    panels = {w: s for w in PANELS if (s := series(data["rows"], w))}
    if not panels:
        raise SystemExit(f"{args.results}: no W1 or W5 rows to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8), squeeze=False)
    env = data["environment"]
    for ax, (workload, lines) in zip(axes[0], panels.items()):
        for name, points in sorted(lines.items()):
            points.sort()
            style = "--" if name.startswith(("original", "torch.compile", "per-forward")) else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="batch size (samples per scene)",
               ylabel="latency per sample() call (us)",
               title=f"{PANELS[workload]}, x_dims=(64, 2), 10 Euler steps\n{env['gpu']}, "
                     f"torch {env['torch']}, {env['date']}, commit {env['commit']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = args.out or args.results.rsplit(".", 1)[0] + "-" + "-".join(panels) + ".png"
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()
