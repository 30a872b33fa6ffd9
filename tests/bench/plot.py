#!/usr/bin/env python3
"""plot.py RESULTS.json OUT.png: latency percentiles and throughput per path, from ferry-bench's
records (medians over runs). Needs matplotlib (Debian: python3-matplotlib)."""
import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

records = [r for r in json.load(open(sys.argv[1])) if not r.get("failed")]
paths = []
for r in records:
    if r["path"] not in paths:
        paths.append(r["path"])
colors = {"direct": "#888888", "ferry": "#1f77b4", "ferry-l4": "#9ecae1", "nginx": "#2ca02c", "haproxy": "#d62728"}


def med(scenario, path, key):
    v = [r["load"][key] for r in records if r["scenario"] == scenario and r["path"] == path]
    return statistics.median(v) if v else None


latency = [(s, t) for s, t in [("h1-fixed", "HTTP/1.1 at the fixed rate: latency"),
                                ("h2-fixed", "HTTP/2 at the fixed rate: latency")]
           if any(med(s, p, "p50_ms") for p in paths)]
scen = [("h1-max", "rps", "HTTP/1.1"), ("h2-max", "rps", "HTTP/2"), ("tcp", "gbps", "TCP"),
        ("conn-churn", "rps", "conn/req")]
scen = [s for s in scen if med(s[0], "direct", s[1])]
panels = len(latency) + (1 if scen else 0)
if panels == 0:
    sys.exit("plot.py: nothing to plot")


def bars(ax, groups, value):
    """One bar per path in each group, labelled with its value(group, path)."""
    width = 0.8 / max(len(paths), 1)
    for i, p in enumerate(paths):
        vals = [value(g, p) or 0 for g in groups]
        xs = [j + i * width for j in range(len(groups))]
        ax.bar(xs, vals, width, label=p, color=colors.get(p))
        for x, v in zip(xs, vals):
            if v:
                ax.text(x, v, f"{v:.2f}" if v < 10 else f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks([j + width * (len(paths) - 1) / 2 for j in range(len(groups))])


fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 5), squeeze=False)
axes = list(axes[0])
# Latency percentiles at the fixed rate, HTTP/1.1 and HTTP/2.
for ax, (scenario, title) in zip(axes, latency):
    bars(ax, ["p50_ms", "p90_ms", "p99_ms"], lambda k, p, s=scenario: med(s, p, k))
    ax.set_xticklabels(["p50", "p90", "p99"])
    ax.set_ylabel("ms (lower is better)")
    ax.set_title(title)
    ax.legend()
# Throughput of the max scenarios, as a share of direct.
if scen:
    ax = axes[-1]

    def share(sc, p):
        s, key, _ = sc
        v, d = med(s, p, key), med(s, "direct", key)
        return 100.0 * v / d if v and d else 0

    bars(ax, scen, share)
    ax.set_xticklabels([s[2] for s in scen])
    ax.set_ylabel("% of direct (higher is better)")
    ax.set_ylim(0, 130)
    ax.set_title("Max throughput through two sidecars")
    ax.legend(loc="upper center", ncol=len(paths), fontsize=8)
fig.suptitle("ferry-bench: client pod -> sidecar -> sidecar -> app (medians)")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
