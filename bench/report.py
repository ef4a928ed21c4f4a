"""Benchmark maths and reports: percentiles, one summary row per run, ratios, the issue-4 bars,
and the markdown / JSON / PNG outputs.

A summary row is a flat dict (JSON-ready). Latencies are seconds in the row and in JSON; the table
shows TTFT and E2E in seconds and ITL in milliseconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from bench.client import RunResult

PERCENTILES = (50, 95, 99)
LATENCIES = ("ttft", "itl", "e2e")  # each gets <name>_p50_s, _p95_s, _p99_s in a row

# Bars of issue 4 (see docs/benchmark.md).
THROUGHPUT_BAR = 4.0  # ours / baseline output tokens/s at saturation
TTFT_BAR = 5.0  # baseline / ours p95 TTFT at the baseline's saturation load
KNEE_FRACTION = 0.9  # saturation load = the lowest load reaching this share of the best tokens/s


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default); None if empty."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError("q must be in [0, 100]")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def cost_per_million(price_per_hour: float, output_tokens_per_s: float) -> Optional[float]:
    """Machine cost (price per hour) of one million output tokens at this throughput; None at zero."""
    if output_tokens_per_s <= 0:
        return None
    return price_per_hour / 3600.0 / output_tokens_per_s * 1e6


def summarize(run: RunResult, price_per_hour: float) -> dict[str, Any]:
    """One row: counts, throughputs over the run's duration, latency percentiles, cost."""
    ok = [r for r in run.results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    duration = max(run.duration_s, 1e-9)
    samples = {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "itl": [x for r in ok for x in r.itl_s],  # NOTE: pooled over all requests' gaps
        "e2e": [r.e2e_s for r in ok if r.e2e_s is not None],
    }
    row: dict[str, Any] = {
        "target": run.target,
        "mode": run.mode,
        "load": run.load,
        "num_requests": len(run.results),
        "num_ok": len(ok),
        "num_errors": len(run.results) - len(ok),
        "duration_s": run.duration_s,
        "request_throughput": len(ok) / duration,
        "output_tokens_per_s": out_tokens / duration,
        "total_output_tokens": out_tokens,
        "usage_reported_fraction": (sum(r.usage_reported for r in ok) / len(ok)) if ok else 0.0,
        "max_send_lag_s": max((r.sent_s - r.scheduled_s for r in run.results if r.scheduled_s is not None), default=0.0),
        "first_error": next((r.error for r in run.results if r.error), None),
    }
    for name in LATENCIES:
        for q in PERCENTILES:
            row[f"{name}_p{q}_s"] = percentile(samples[name], q)
    row["cost_per_m_output_tokens"] = cost_per_million(price_per_hour, row["output_tokens_per_s"])
    return row


def ratio_rows(rows: Sequence[dict], reference: str) -> list[dict[str, Any]]:
    """For every other target and every load both have: target / reference for throughputs and latencies."""
    ref = {r["load"]: r for r in rows if r["target"] == reference}
    keys = ["request_throughput", "output_tokens_per_s"] + [f"{n}_p{q}_s" for n in LATENCIES for q in PERCENTILES]
    out = []
    for row in rows:
        base = ref.get(row["load"])
        if row["target"] == reference or base is None:
            continue
        ratio = {"target": f"{row['target']}/{reference}", "mode": row["mode"], "load": row["load"]}
        for k in keys:
            a, b = row.get(k), base.get(k)
            ratio[k] = a / b if a is not None and b else None
        out.append(ratio)
    return out


def _best(rows: Sequence[dict]) -> dict:
    return max(rows, key=lambda r: r["output_tokens_per_s"])


def knee(rows: Sequence[dict]) -> dict:
    """The saturation row of one target's sweep: the lowest load reaching KNEE_FRACTION of its best tokens/s."""
    best = _best(rows)["output_tokens_per_s"]
    return min((r for r in rows if r["output_tokens_per_s"] >= KNEE_FRACTION * best), key=lambda r: r["load"])


def check_bars(rows: Sequence[dict], ours: str = "ours", reference: str = "baseline") -> Optional[dict[str, Any]]:
    """The issue-4 bars from a sweep of both targets, or None without both.

    Saturation throughput of a target = its best output tokens/s over the sweep. The baseline's
    saturation load = the lowest load at which the baseline reaches KNEE_FRACTION of its best.
    """
    mine = sorted((r for r in rows if r["target"] == ours), key=lambda r: r["load"])
    base = sorted((r for r in rows if r["target"] == reference), key=lambda r: r["load"])
    if not mine or not base:
        return None
    best_mine, best_base = _best(mine), _best(base)
    base_knee = knee(base)
    at_knee = next((r for r in mine if r["load"] == base_knee["load"]), None)
    tput = best_mine["output_tokens_per_s"] / best_base["output_tokens_per_s"] if best_base["output_tokens_per_s"] else None
    ttft_mine = at_knee and at_knee["ttft_p95_s"]
    ttft = base_knee["ttft_p95_s"] / ttft_mine if ttft_mine and base_knee["ttft_p95_s"] is not None else None
    warnings = []
    if base_knee["load"] == base[-1]["load"] and len(base) > 1:
        warnings.append(f"{reference}: tokens/s still rising at the highest load, so the sweep may not reach its "
                        "saturation: add higher loads")
    if knee(mine)["load"] == mine[-1]["load"] and len(mine) > 1:
        warnings.append(f"{ours}: tokens/s still rising at the highest load, so its saturation throughput is a lower bound")
    if any(r["num_errors"] for r in rows):
        warnings.append("some requests failed (see the errors column)")
    return {
        "throughput_ratio": tput, "throughput_bar": THROUGHPUT_BAR,
        "throughput_pass": tput is not None and tput >= THROUGHPUT_BAR,
        "ours_best_load": best_mine["load"], "baseline_best_load": best_base["load"],
        "baseline_saturation_load": base_knee["load"],
        "ttft_p95_baseline_s": base_knee["ttft_p95_s"], "ttft_p95_ours_s": ttft_mine,
        "ttft_ratio": ttft, "ttft_bar": TTFT_BAR, "ttft_pass": ttft is not None and ttft >= TTFT_BAR,
        "warnings": warnings,
    }


def fmt_value(value: Any, scale: float = 1.0, digits: int = 3) -> str:
    """A table cell: n/a for None, scaled fixed-point for floats."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value * scale:.{digits}f}"
    return str(value)


def format_table(rows: Sequence[dict], price_per_hour: float, ratios: bool = False) -> str:
    """A markdown table of summary rows (or of ratio rows with `ratios=True`)."""
    load = "rate (req/s)" if rows and rows[0]["mode"] == "open" else "concurrency"
    cols: list[tuple[str, str, float, int]] = [("request_throughput", "req/s", 1, 2), ("output_tokens_per_s", "out tok/s", 1, 1)]
    for name, unit, scale, digits in (("ttft", "s", 1, 3), ("itl", "ms", 1e3, 1), ("e2e", "s", 1, 3)):
        cols += [(f"{name}_p{q}_s", f"{name.upper()} p{q} ({unit})", scale, digits) for q in PERCENTILES]
    if ratios:
        cols = [(k, h.split(" (")[0], 1, 2) for k, h, _, _ in cols]
        header = ["ratio", load] + [h for _, h, _, _ in cols]
    else:
        header = ["target", load, "ok/err"] + [h for _, h, _, _ in cols] + [f"$/M out tok @ ${price_per_hour:g}/h"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["target"], f"{r['load']:g}"]
        if not ratios:
            cells.append(f"{r['num_ok']}/{r['num_errors']}")
        cells += [fmt_value(r.get(k), s, d) for k, _, s, d in cols]
        if not ratios:
            cells.append(fmt_value(r["cost_per_m_output_tokens"], 1, 2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_bars(bars: dict) -> str:
    """The bars as markdown lines."""
    def mark(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    def times(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v:.2f}x"
    lines = [
        f"- Output tokens/s at saturation, ours / baseline: {times(bars['throughput_ratio'])} "
        f"(bar >= {bars['throughput_bar']:g}x): **{mark(bars['throughput_pass'])}** "
        f"(best loads: ours {bars['ours_best_load']:g}, baseline {bars['baseline_best_load']:g})",
        f"- p95 TTFT at the baseline's saturation load {bars['baseline_saturation_load']:g}: baseline "
        f"{fmt_value(bars['ttft_p95_baseline_s'])} s, ours {fmt_value(bars['ttft_p95_ours_s'])} s, baseline / ours: "
        f"{times(bars['ttft_ratio'])} (bar >= {bars['ttft_bar']:g}x): **{mark(bars['ttft_pass'])}**",
    ]
    return "\n".join(lines + [f"- Warning: {w}" for w in bars["warnings"]])


def render_markdown(rows: Sequence[dict], meta: dict, reference: str = "baseline") -> str:
    """The whole report: run settings, the table, the ratios, the bars and the notes."""
    price = meta.get("price_per_hour", 1.0)
    parts = ["# Benchmark results", ""]
    parts += [f"- {k}: {v}" for k, v in meta.items() if k != "notes"]
    parts += ["", format_table(rows, price)]
    ratios = ratio_rows(rows, reference)
    if ratios:
        parts += ["", f"Ratios (target / {reference}; above 1 is better for req/s and tok/s, below 1 for latencies):",
                  "", format_table(ratios, price, ratios=True)]
    bars = check_bars(rows, reference=reference) if reference == "baseline" else None
    if bars:
        parts += ["", "## Issue 4 bars", "", format_bars(bars)]
    notes = list(meta.get("notes") or [])
    lagging = [r for r in rows if r.get("max_send_lag_s", 0.0) > 0.1]
    if lagging:
        worst = max(lagging, key=lambda r: r["max_send_lag_s"])
        notes.append(f"the client fell behind its schedule by up to {worst['max_send_lag_s']:.2f} s "
                     f"({worst['target']} at load {worst['load']:g}): it shares the CPUs with the server")
    if notes:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


def plot_latency_vs_throughput(rows: Sequence[dict], path: str | Path) -> None:
    """PNG: E2E and TTFT (p50 solid, p95 dashed) against output tokens/s, one line per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    for ax, name, title in ((axes[0], "e2e", "End-to-end latency"), (axes[1], "ttft", "Time to first token")):
        for i, target in enumerate(targets):
            pts = sorted((r for r in rows if r["target"] == target), key=lambda r: r["load"])
            xs = [r["output_tokens_per_s"] for r in pts]
            color = f"C{i}"
            for q, style, marker in ((50, "-", "o"), (95, "--", "s")):
                ys = [r[f"{name}_p{q}_s"] for r in pts]
                ax.plot(xs, [math.nan if y is None else y for y in ys], style, marker=marker, color=color,
                        label=f"{target} p{q}")
            for r in pts:
                y = r[f"{name}_p95_s"]
                if y is not None:
                    ax.annotate(f"{r['load']:g}", (r["output_tokens_per_s"], y), textcoords="offset points",
                                xytext=(3, 3), fontsize=7, color=color)
        ax.set_title(f"{title} (labels: {'rate' if rows and rows[0]['mode'] == 'open' else 'concurrency'})")
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel("seconds")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_results(out_dir: str | Path, rows: Sequence[dict], meta: dict, runs: Sequence[RunResult] = (),
                 reference: str = "baseline") -> dict[str, Path]:
    """Write results.md, results.json (rows, ratios, bars, settings, per-request records) and the PNG."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "results.md", "json": out / "results.json", "plot": out / "latency_vs_throughput.png"}
    paths["markdown"].write_text(render_markdown(rows, meta, reference), encoding="utf-8")
    doc = {"meta": meta, "rows": list(rows), "ratios": ratio_rows(rows, reference),
           "bars": check_bars(rows, reference=reference) if reference == "baseline" else None,
           "requests": [{"target": run.target, "load": run.load, **vars(r)} for run in runs for r in run.results]}
    paths["json"].write_text(json.dumps(doc, indent=1), encoding="utf-8")
    plot_latency_vs_throughput(rows, paths["plot"])
    return paths
