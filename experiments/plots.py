"""Plots shared by the experiment scripts (matplotlib, Agg backend)."""

from __future__ import annotations

import numpy as np


def latency_plot(summary, records, path, title: str, log_x: bool = False) -> None:
    """TTFT CDF per model (left) and per-model SLO attainment (right) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["models"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12 if len(names) > 4 else 11, 4))
    for name in names:
        ttft = sorted(r.first_token_s - r.arrival_s for r in records
                      if r.model == name and r.first_token_s is not None)
        if ttft:
            ax1.plot(np.array(ttft) * 1e3, np.arange(1, len(ttft) + 1) / len(ttft),
                     label=f"{name} ({summary['models'][name]['preset']})")
    if log_x:
        ax1.set_xscale("log")
    ax1.set_xlabel("TTFT (ms)")
    ax1.set_ylabel("CDF")
    ax1.set_title("Time to first token")
    ax1.legend(fontsize=7 if len(names) > 4 else 9)
    att = [summary["models"][n]["slo_attainment"] or 0.0 for n in names]
    ax2.bar(names, att, color="tab:blue")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("SLO attainment (TTFT < SLO)")
    if len(names) > 4:
        ax2.tick_params(axis="x", rotation=60, labelsize=7)
    overall = summary["overall"]["slo_attainment"]
    ax2.set_title(f"{title}: overall {overall if overall is not None else 0.0:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
