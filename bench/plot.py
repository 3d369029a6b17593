"""Latency against batch size per variant (W1, Alpamayo's shape) from a gpu_bench results file.

    python bench/plot.py bench/results/<date>-<gpu>.json [--out bench/results/<...>.png]
"""

import argparse
import json
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--out", default=None, help="PNG path (default: next to the results file)")
    args = ap.parse_args()
    data = json.load(open(args.results))
    series = {}
    for r in data["rows"]:
        m = re.fullmatch(r"W1-b(\d+)", r["workload"])
        if not m or r["median_us"] is None:
            continue
        series.setdefault(r["variant"], []).append((int(m.group(1)), r["median_us"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(series.items()):
        points.sort()
        style = "--" if name.startswith(("original", "torch.compile")) else "-"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=name)
    env = data["environment"]
    ax.set(xscale="log", yscale="log", xlabel="batch size (samples per scene)",
           ylabel="latency per sample() call (us)",
           title=f"W1: x_dims=(64, 2), 10 Euler steps, bf16 MLP field\n{env['gpu']}, "
                 f"torch {env['torch']}, {env['date']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = args.out or args.results.rsplit(".", 1)[0] + "-W1.png"
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()
