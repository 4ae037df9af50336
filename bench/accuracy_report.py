"""The accuracy benchmark's report: summary per (method, wire, budget), table and plot.

Every cell carries validation and test accuracy side by side; rankings use validation (the
split a user can see while choosing), test is computed once per fit and shown beside it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def wire_of(row: dict[str, Any]) -> str:
    """The wire a row's oracle used: ``uint8`` unless the oracle names another."""
    oracle = str(row.get("oracle", ""))
    if oracle.startswith("HTTP "):
        return "uint8"
    parts = oracle.split()
    return parts[1] if len(parts) > 1 else "uint8"


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, wire, budget): test accuracy's mean, std, min and max (``mean`` ...) and
    validation accuracy's (``val_mean`` ...), over seeds."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], wire_of(r), r["budget"]), []).append(r)
    out = []
    for (method, wire, budget), members in groups.items():
        test = _stats([float(r["test_accuracy"]) for r in members])
        val = _stats([float(r["val_accuracy"]) for r in members])
        out.append({"method": method, "wire": wire, "budget": budget, "n": len(members),
                    **test, **{f"val_{k}": v for k, v in val.items()}})
    return out


def ranked(summary: Sequence[dict[str, Any]], budget: int, wire: str = "uint8"
           ) -> list[dict[str, Any]]:
    """The cells of one budget and wire, best first by mean validation accuracy."""
    cells = [s for s in summary if s["budget"] == budget and s["wire"] == wire]
    return sorted(cells, key=lambda s: -s["val_mean"])


def ranking_lines(summary: Sequence[dict[str, Any]]) -> list[str]:
    """Per wire and budget, the methods ranked by mean validation accuracy (test beside)."""
    lines = []
    for wire in dict.fromkeys(s["wire"] for s in summary):
        for budget in sorted({s["budget"] for s in summary}):
            cells = ranked(summary, budget, wire)
            lines.append(f"ranked by validation accuracy, {budget:,} queries, {wire} wire "
                         "(validation / test):")
            lines += [f"  {i:>2}. {c['method']:<26} {c['val_mean']:.3f} / {c['mean']:.3f}"
                      for i, c in enumerate(cells, 1)]
    return lines


def table(summary: Sequence[dict[str, Any]]) -> str:
    """One line per method; per wire and budget ``val / test mean ± test std``."""
    budgets = sorted({s["budget"] for s in summary})
    wires = list(dict.fromkeys(s["wire"] for s in summary))
    methods = list(dict.fromkeys(s["method"] for s in summary))
    cell = {(s["method"], s["wire"], s["budget"]): s for s in summary}
    cols = [(w, b) for w in wires for b in budgets]
    head = f"{'method':<22}" + "".join(f"{f'{w} {b:,}':>24}" for w, b in cols)
    lines = [head + "   (validation / test ± test std)", "-" * len(head)]
    for m in methods:
        parts = []
        for w, b in cols:
            s = cell.get((m, w, b))
            parts.append(f"{s['val_mean']:.3f} / {s['mean']:.3f} ± {s['std']:.3f}" if s
                         else "-")
        lines.append(f"{m:<22}" + "".join(f"{p:>24}" for p in parts))
    return "\n".join(lines)


def plot(summary: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.8), dpi=110)
    methods = list(dict.fromkeys(s["method"] for s in summary))
    cmap = plt.get_cmap("tab20")
    colors = [cmap(k) for k in range(20)]
    wires = list(dict.fromkeys(s["wire"] for s in summary))
    for i, m in enumerate(methods):
        pts = sorted((s for s in summary if s["method"] == m and s["wire"] == wires[0]),
                     key=lambda s: s["budget"])
        xs = [p["budget"] for p in pts]
        ours = m.startswith("ours")
        color = colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20]  # dark shades, then light
        ax.plot(xs, [p["mean"] for p in pts], marker="o" if ours else "s", color=color,
                linestyle="-" if ours else "--", linewidth=2.2 if m == "ours" else 1.4,
                label=m)
        ax.fill_between(xs, [p["min"] for p in pts], [p["max"] for p in pts], color=color,
                        alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("image queries (budget)")
    ax.set_ylabel(f"test accuracy ({wires[0]} wire)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


