"""The HTML report of a pipeline run: the candidates table and the trade-off plots.

One self-contained page (plots embedded as PNG), rendered from a
``metrics.json``-shaped result, so it opens from a KFP UI, an MLflow run or a
laptop alike.
"""

from __future__ import annotations

import base64
import html
import io

from .report import COLUMNS as METRIC_COLUMNS
from .select import OBJECTIVES, pareto_front

#: (key, header, format) of the table's columns: the terminal table's metrics, after the format.
COLUMNS = (("format", "format", "{}"), *METRIC_COLUMNS)

#: (metric, axis label) of the plots: accuracy against each objective metric.
PLOTS = (("gzip_bytes", "deployable size, gzip bytes (log scale)"), ("latency_p50_ms", "latency p50, ms, batch 1 (log scale)"))

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
tr.winner { background: #e6f4ea; font-weight: 600; }
tr.failed td, tr.skipped td { color: #888; }
.plots img { max-width: 48%; margin-right: 1%; }
.note { color: #555; font-size: 0.9em; }
"""


def render_html(result: dict) -> str:
    """The whole report page for ``result`` (baseline, candidates, winner, pareto, selection)."""
    selection = result.get("selection", {})
    objective = selection.get("objective", "size")
    budget = selection.get("max_accuracy_drop")
    winner = result.get("winner")
    title = f"kfopt: {result.get('model')} on {result.get('data')}"
    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        "<p>",
        f"Objective: <b>{_e(objective)}</b> (lowest {_e(OBJECTIVES.get(objective, '?'))})",
        f"; accuracy budget: at most <b>{budget:.4f}</b> below the baseline" if budget is not None else "",
        f"; winner: <b>{_e(winner)}</b>." if winner else "; <b>no candidate is within the budget</b>.",
        "</p>",
        _table(result),
        "<p class='note'>Ratios (ratio, speedup) compare each candidate with the baseline in the candidate's own "
        "format, run in the same runtime. &#9733; = on the Pareto front of accuracy against the objective. Points in the "
        "plots carry the row number (#) of the table.</p>",
        "<h2>Trade-offs</h2><div class='plots'>",
        *(_plot_img(result, metric, label) for metric, label in PLOTS),
        "</div></body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _table(result: dict) -> str:
    pareto = set(result.get("pareto") or [])
    header = "".join(f"<th>{_e(h)}</th>" for h in ("#", "model", "status", *(c[1] for c in COLUMNS), "in budget", "notes"))
    rows = [_row("", "baseline", {**result["baseline"], "status": "ok"}, "", "", "")]
    for number, candidate in enumerate(result.get("candidates", []), start=1):
        label = candidate["recipe"]
        css = "winner" if label == result.get("winner") else candidate.get("status", "")
        mark = " &#9733;" if label in pareto else ""
        in_budget = {True: "yes", False: "no"}.get(candidate.get("within_budget"), "")
        notes = candidate.get("reason") or candidate.get("not_selected_because") or ""
        if label == result.get("winner"):
            notes = "winner"
        rows.append(_row(number, label, candidate, css, in_budget, notes, mark))
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _row(number, label, record, css, in_budget, notes, mark="") -> str:
    cells = [f"<td>{_e(number)}</td>", f"<td class='text'>{_e(label)}{mark}</td>",
             f"<td class='text'>{_e(record.get('status', ''))}</td>"]
    for key, _, fmt in COLUMNS:
        value = record.get(key)
        if value is None:
            text = "-"
        else:
            text = fmt.format(value / 1024 if key == "gzip_bytes" else value)
        cells.append(f"<td>{_e(text)}</td>")
    cells.append(f"<td>{_e(in_budget)}</td><td class='text'>{_e(notes)}</td>")
    return f"<tr class='{_e(css)}'>{''.join(cells)}</tr>"


def _plot_img(result: dict, metric: str, label: str) -> str:
    png = plot_png(result, metric, label)
    alt = f"accuracy against {metric}"
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def plot_png(result: dict, metric: str, label: str) -> bytes:
    """A PNG scatter plot of accuracy against ``metric``: candidates, Pareto front, winner, baseline, budget."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a pipeline node or CI
    from matplotlib.figure import Figure

    # Points are labelled with their row number in the table: recipe labels are too long for a plot.
    numbered = [(n, c) for n, c in enumerate(result.get("candidates", []), start=1)
                if c.get("status") == "ok" and c.get(metric) is not None]
    candidates = [c for _, c in numbered]
    figure = Figure(figsize=(6.4, 4.4), dpi=100)
    ax = figure.add_subplot()
    front = set(pareto_front(candidates, metric))
    for number, candidate in numbered:
        on_front = candidate["recipe"] in front
        ax.scatter(candidate[metric], candidate["accuracy"], s=40 if on_front else 25,
                   color="tab:blue" if on_front else "tab:gray", zorder=3)
        ax.annotate(str(number), (candidate[metric], candidate["accuracy"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    line = sorted((c for c in candidates if c["recipe"] in front), key=lambda c: c[metric])
    if line:
        ax.plot([c[metric] for c in line], [c["accuracy"] for c in line], color="tab:blue", lw=1, label="Pareto front")
    winner = next((c for c in candidates if c["recipe"] == result.get("winner")), None)
    if winner:
        ax.scatter(winner[metric], winner["accuracy"], marker="*", s=220, color="tab:green", zorder=4, label="winner")
    baseline = result.get("baseline", {})
    if baseline.get(metric) is not None and baseline.get("accuracy") is not None:
        ax.scatter(baseline[metric], baseline["accuracy"], marker="X", s=80, color="black", zorder=4,
                   label=f"baseline ({baseline.get('format', 'keras')})")
    budget = result.get("selection", {}).get("max_accuracy_drop")
    if budget is not None and baseline.get("accuracy") is not None:
        ax.axhline(baseline["accuracy"] - budget, color="tab:red", ls="--", lw=1, label="accuracy budget")
    if candidates or baseline.get(metric):
        ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("accuracy (test split)")
    ax.set_title(f"accuracy vs {metric}")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _e(value) -> str:
    return html.escape(str(value), quote=True)
