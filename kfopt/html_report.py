"""The HTML report of a run: candidates, trade-off plots, search trace and layer sensitivity.

One self-contained page (plots embedded as PNG), rendered from a
``metrics.json``-shaped result, so it opens from a KFP UI, an MLflow run or a
laptop alike. :func:`pareto_plots` gives the same plots as PNG files (MLflow
logs them beside the page). Every accuracy number says its split: the test
split measures and checks candidates, the validation split is what the search
chose recipes by.
"""

from __future__ import annotations

import base64
import html
import io

from .report import COLUMNS as METRIC_COLUMNS
from .report import budgeted_metric, columns_for, speedup_cell
from .result import RunResult
from .select import OBJECTIVES, objective_metric, pareto_front

#: (key, header, format) of the candidates table: the terminal table's metrics, after the format.
#: A format of None means: shown as it is (numbers compactly).
COLUMNS = (("format", "format", None), *METRIC_COLUMNS)
#: The validation-split drop, shown before the test drop when candidates carry it (a search run).
VAL_DROP = ("val_metric_drop", "val drop", "{:+.4f}")
#: Which split a column's number comes from; other columns do not depend on the data split.
SPLITS = {
    "metric": "test",
    "metric_drop": "test",
    "val_metric_drop": "validation",
    "accuracy": "test",
    "accuracy_drop": "test",
    "agreement": "test",
    "val_accuracy": "validation",
    "val_accuracy_drop": "validation",
    "int8_val_accuracy_drop": "validation",
    "val_metric": "validation",
    "int8_val_metric_drop": "validation",
}
#: Columns of the search trace before the objective metric; other keys of its entries follow it.
TRACE_COLUMNS = (
    ("round", "round", None),
    ("recipe", "recipe", None),
    ("why", "why", None),
    ("status", "status", None),
    VAL_DROP,
)
#: Columns of the layer sensitivity table; other keys of its rows follow them.
SENSITIVITY_COLUMNS = (
    ("layer", "layer", None),
    ("params", "kernel params", "{:,}"),
    ("sparsity", "pruned to", "{:.0%}"),
    ("val_metric", "val metric", "{:.4f}"),
    VAL_DROP,
    ("int8_val_metric_drop", "val drop, its weights int8", "{:+.4f}"),
)
#: objective -> (metric, x-axis label) of the plots: accuracy against each objective metric.
PLOTS = {
    "size": ("gzip_bytes", "deployable size, gzip bytes (log scale)"),
    "latency": ("latency_p50_ms", "latency p50, ms, batch 1 (log scale)"),
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin-bottom: 0.5em; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right; vertical-align: top; }
th:first-child, td:first-child, td.text { text-align: left; }
th .split { display: block; font-weight: normal; font-size: 0.8em; color: #666; }
tr.winner { background: #e6f4ea; font-weight: 600; }
tr.failed td, tr.skipped td { color: #888; }
.plots img { max-width: 48%; margin-right: 1%; }
.note { color: #555; font-size: 0.9em; }
"""


def render_html(result: RunResult | dict, plots: dict[str, bytes] | None = None) -> str:
    """The whole report page for ``result``; ``plots`` are :func:`pareto_plots` of it, if already drawn."""
    result = RunResult.of(result)
    plots = pareto_plots(result) if plots is None else plots
    selection = result.get("selection", {})
    objective = selection.get("objective", "size")
    budget = selection.get("max_accuracy_drop")
    winner = result.get("winner")
    title = f"kfopt: {result.get('model')} on {result.get('data')}"
    metric = budgeted_metric(result)
    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        "<p>",
        f"Objective: <b>{_e(objective)}</b> (lowest {_e(objective_metric(objective))})",
        _budget_text(metric, budget, result.get("baseline") or {}) if budget is not None else "",
        f"; winner: <b>{_e(winner)}</b>." if winner else "; <b>no candidate is within the budget</b>.",
        _same_architecture_text(result),
        "</p>",
        _search_summary(result.get("search")),
        "<h2>Candidates</h2>",
        candidates_table(result),
        f"<p class='note'>{_candidates_note(result)}</p>",
        "<h2>Trade-offs (test split)</h2><div class='plots'>",
        *(
            f"<img alt='{_e(name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            for name, png in plots.items()
        ),
        "</div>",
        _trace_section(result),
        _sensitivity_section(result.get("layer_sensitivity")),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


# -- sections -------------------------------------------------------------------
def _search_summary(search: dict | None) -> str:
    """How the search was bounded, how it stopped, and which split chose and which checked."""
    if not search:
        return ""
    bounds = f"round 1 (the search space) and up to {search.get('rounds', '?')} refinement round(s)"
    if search.get("max_trials") is not None:
        bounds += f" of at most {search['max_trials']} recipes"
    if search.get("max_time") is not None:
        bounds += f", a time budget of {search['max_time']:g} s"
    if search.get("target") is not None:
        met = f"met by {search['target_met_by']}" if search.get("target_met_by") else "not met"
        bounds += f", target {search['target']:g}x ({met})"
    stopped = search.get("stopped") or "?"
    if search.get("seconds") is not None:
        stopped += f" after {search['seconds']:g} s"
    chose = search.get("choices_use", "validation split (val_metric_drop)")
    checked = search.get("final_check_uses", "test split")
    return (
        f"<p>Search: {_e(bounds)}. Stopped: <b>{_e(stopped)}</b>. "
        f"Refinement chose recipes on the <b>{_e(chose)}</b>; the winner was picked and checked against the "
        f"budget on the <b>{_e(checked)}</b>.</p>"
    )


def _budget_text(metric: str, budget, baseline: dict) -> str:
    if metric == "accuracy" and not isinstance(budget, str):
        return f"; accuracy budget: at most <b>{budget:.4f}</b> below the baseline on the test split"
    task = f" ({_e(baseline['task'])} task)" if baseline.get("task") else ""
    shown = budget if isinstance(budget, str) else f"{budget:.4g}"
    of = " of the baseline's value" if isinstance(budget, str) else ""
    return f"; budget: a <b>{_e(metric)}</b>{task} drop of at most <b>{_e(shown)}</b>{of} on the test split"


def candidates_table(result: dict) -> str:
    candidates = result.get("candidates", [])
    pareto = set(result.get("pareto") or [])
    name = budgeted_metric(result)
    metrics = [("format", "format", None), *columns_for(result)]
    val_drop = VAL_DROP if name == "accuracy" else ("val_metric_drop", f"val {name} drop", "{:+.4f}")
    drop_key = "accuracy_drop" if name == "accuracy" else "metric_drop"
    if any(c.get(val_drop[0]) is not None for c in candidates):
        metrics.insert(next(i for i, c in enumerate(metrics) if c[0] == drop_key), val_drop)
    rounds = [("round", "round", None)] if any("round" in c for c in candidates) else []
    columns = [
        ("#", "#", None),
        *rounds,
        ("model", "model", None),
        ("status", "status", None),
        *metrics,
        ("in_budget", "in budget", None),
        ("notes", "notes", None),
    ]
    rows = [
        _tr(
            "",
            {
                **result["baseline"],
                "#": "",
                "round": "",
                "model": "baseline",
                "status": "ok",
                "in_budget": "",
                "notes": "",
            },
            columns,
        )
    ]
    for number, candidate in enumerate(candidates, start=1):
        label = candidate["recipe"]
        is_winner = label == result.get("winner")
        notes = "winner" if is_winner else candidate.get("reason") or candidate.get("not_selected_because") or ""
        notes = "; ".join([notes, *(candidate.get("notes") or [])]).strip("; ")
        row = {
            **candidate,
            "#": number,
            "model": label + (" \u2605" if label in pareto else ""),
            "notes": notes,
            "in_budget": candidate.get("within_budget", ""),
        }
        rows.append(_tr("winner" if is_winner else candidate.get("status", ""), row, columns))
    return _table(columns, rows)


def _candidates_note(result: dict) -> str:
    candidates = result.get("candidates", [])
    name = budgeted_metric(result)
    note = (
        "accuracy, drop and agree are measured on the <b>test split</b>, as are the plots; "
        "drop and the budget are against the baseline's test accuracy."
        if name == "accuracy"
        else f"{_e(name)} (the budgeted metric) and its drop are measured on the <b>test split</b>, as are the "
        f"plots; a drop is how much worse than the baseline the candidate is (positive: worse), and the "
        "budget bounds it."
    )
    if any(c.get("val_metric_drop") is not None for c in candidates):
        note += (
            " val drop is on the <b>validation split</b>: what the search chose recipes by, "
            "so no refinement decision looks at the test split."
        )
    if any("round" in c for c in candidates):
        note += " round: the search round that proposed the recipe (1 = the search space)."
    return note + (
        " Ratios (ratio, speedup) compare each candidate with the baseline in the candidate's own format, "
        "run in the same runtime. &#9733; = on the Pareto front of accuracy against the objective. "
        "Points in the plots carry the row number (#) of the table."
    )


def _trace_section(result: dict) -> str:
    trace = result.get("search_trace") or []
    if not trace:
        return ""
    (result.get("search") or {}).get("objective") or result.get("selection", {}).get("objective", "size")
    # Both objective metrics (a mix objective weighs the two).
    known = [*TRACE_COLUMNS, *(c for c in METRIC_COLUMNS if c[0] in OBJECTIVES.values())]
    columns = _with_extra_columns(trace, known)
    rows = []
    for entry in trace:
        css = {"ok": "", "failed": "failed"}.get(entry.get("status"), "skipped")  # skipped, not run: ...
        if entry.get("recipe") == result.get("winner"):
            css = "winner"
        rows.append(_tr(css, entry, columns))
    return (
        "<h2>Search trace</h2><p class='note'>Which round proposed which recipe, and why. "
        "val drop is on the <b>validation split</b>, the split the search decides on.</p>" + _table(columns, rows)
    )


def _sensitivity_section(rows: list[dict] | None) -> str:
    if not rows:
        return ""
    columns = _with_extra_columns(rows, SENSITIVITY_COLUMNS)
    return (
        "<h2>Layer sensitivity (validation split)</h2><p class='note'>Each layer's kernel pruned alone to the "
        "given sparsity, then its weights alone rounded to int8, with no fine-tuning; each drop is the baseline's "
        "<b>validation-split</b> accuracy minus the changed model's. The most prune-sensitive layers come first; "
        "refinement keeps the small sensitive ones dense (or float under QAT).</p>"
        + _table(columns, [_tr("", row, columns) for row in rows])
    )


# -- plots ----------------------------------------------------------------------
def pareto_plots(result: RunResult | dict) -> dict[str, bytes]:
    """The trade-off plots as PNG files: ``pareto_size.png`` and ``pareto_latency.png`` (accuracy on the test split)."""
    result = RunResult.of(result)
    return {f"pareto_{objective}.png": plot_png(result, metric, label) for objective, (metric, label) in PLOTS.items()}


def plot_png(result: RunResult, metric: str, label: str) -> bytes:
    """A PNG scatter plot of the budgeted metric (accuracy, mae, ...) against ``metric``: candidates, Pareto front,
    winner, baseline, budget."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    name = budgeted_metric(result)
    y = "accuracy" if name == "accuracy" else "metric"

    # Rows of the table, for the points' labels.
    numbered = [
        (n, c)
        for n, c in enumerate(result.get("candidates", []), start=1)
        if c.get("status") == "ok" and c.get(metric) is not None and c.get(y) is not None
    ]
    candidates = [c for _, c in numbered]
    figure = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(figure)  # Agg, whatever backend pyplot uses: no display on a pipeline node or CI
    ax = figure.add_subplot()
    front = set(pareto_front(candidates, metric))
    for candidate in candidates:
        on_front = candidate["recipe"] in front
        ax.scatter(
            candidate[metric],
            candidate[y],
            s=40 if on_front else 25,
            color="tab:blue" if on_front else "tab:gray",
            zorder=3,
        )
    line = sorted((c for c in candidates if c["recipe"] in front), key=lambda c: c[metric])
    if line:
        ax.plot([c[metric] for c in line], [c[y] for c in line], color="tab:blue", lw=1, label="Pareto front")
    winner = result.winning_candidate
    if winner and winner.get(y) is not None:
        ax.scatter(winner[metric], winner[y], marker="*", s=220, color="tab:green", zorder=4, label="winner")
    baseline = result.get("baseline", {})
    if baseline.get(metric) is not None and baseline.get(y) is not None:
        ax.scatter(
            baseline[metric],
            baseline[y],
            marker="X",
            s=80,
            color="black",
            zorder=4,
            label=f"baseline ({baseline.get('format', 'keras')})",
        )
        # The same baseline converted to each candidate format (what ratios and speedups compare with).
        for marker, (fmt, reference) in zip("PDs", sorted((baseline.get("references") or {}).items())):
            if reference.get(metric) is not None:
                ax.scatter(
                    reference[metric],
                    baseline[y],
                    marker=marker,
                    s=60,
                    facecolors="none",
                    edgecolors="black",
                    zorder=4,
                    label=f"baseline as {fmt}",
                )
    budget = result.get("selection", {}).get("max_accuracy_drop")
    line_at = _budget_line(result, y, budget)
    if line_at is not None:
        ax.axhline(line_at, color="tab:red", ls="--", lw=1, label=f"{name} budget")
    if candidates or baseline.get(metric):
        ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel(f"{name} (test split)")
    ax.set_title(f"{name} vs {metric}")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    # The Pareto front is labelled first: where labels crowd, the points that matter keep theirs.
    ranked = sorted(numbered, key=lambda item: item[1]["recipe"] not in front)
    _label_points(figure, ax, [((c[metric], c[y]), f"{n} {_short(c['recipe'])}") for n, c in ranked])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _same_architecture_text(result) -> str:
    """The best candidate that keeps the user's architecture, when the winner is a model of another kind."""
    same, winner = result.get("best_same_architecture"), result.get("winner")
    if not same or same == winner:
        return ""
    kept = next((c for c in result.get("candidates", []) if c.get("recipe") == same), {})
    numbers = []
    if kept.get("compression_ratio") is not None:
        numbers.append(f"{kept['compression_ratio']:.1f}x smaller")
    if kept.get("speedup") is not None:
        numbers.append(f"{kept['speedup']:.2f}x faster")
    numbers = ", ".join(numbers)
    return f" Best that keeps your architecture: <b>{_e(same)}</b>" + (f" ({_e(numbers)})." if numbers else ".")


def _short(recipe: str) -> str:
    from .recipe import parse_recipe

    try:
        return parse_recipe(recipe).short
    except Exception:  # a recipe name from a YAML file, or a label kfopt no longer parses: keep it
        return recipe


#: Where a point's label may go, in points from the point: right, left, above, below, then the diagonals.
_LABEL_OFFSETS = [(5, -3), (-5, -3), (0, 6), (0, -11), (5, 5), (-5, 5), (5, -11), (-5, -11), (12, 10), (-12, 10)]


def _label_points(figure, ax, points: list[tuple[tuple[float, float], str]]) -> list:
    """Label each point with its text where it overlaps no label placed before it (else it is left out).

    Labels are tried at a few offsets around their point, in order; a label that fits
    nowhere is dropped rather than drawn over another (the table lists every row by number).
    Returns the labels drawn.
    """
    figure.canvas.draw()  # settles the axes' limits and layout: label boxes are measured where they will be
    renderer = figure.canvas.get_renderer()
    area = ax.get_window_extent(renderer)
    taken, drawn = [], []
    for (x, y), text in points:
        for dx, dy in _LABEL_OFFSETS:
            label = ax.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=6.5,
                ha="left" if dx > 0 else "right" if dx < 0 else "center",
            )
            box = label.get_window_extent(renderer).expanded(1.05, 1.1)
            inside = area.contains(box.x0, box.y0) and area.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(other) for other in taken):
                taken.append(box)
                drawn.append(label)
                break
            label.remove()
    return drawn


def _budget_line(result, y: str, budget) -> float | None:
    """Where the budget puts the worst allowed value of the plotted metric (None when it cannot be drawn)."""
    from .select import Budget

    baseline = result.get("baseline", {})
    base = baseline.get(y)
    if budget is None or base is None:
        return None
    allowed = Budget.parse(budget)
    limit = allowed.drop * abs(base) if allowed.relative else allowed.drop
    if y == "accuracy":
        return base - limit
    # Which way is worse: a candidate's value and its drop say it (metric = baseline - drop, or + drop for errors).
    for candidate in result.get("candidates", []):
        value, drop = candidate.get("metric"), candidate.get("metric_drop")
        if value is not None and drop:
            return base - limit if abs(value - (base - drop)) < abs(value - (base + drop)) else base + limit
    return None


# -- HTML helpers ---------------------------------------------------------------
def _with_extra_columns(rows: list[dict], known) -> list[tuple]:
    """``known`` columns, then one per other key found in ``rows`` (first seen first), shown as they are."""
    columns = list(known)
    for row in rows:
        for key in row:
            if all(key != c[0] for c in columns):
                columns.append((key, key.replace("_", " "), None))
    return columns


def _table(columns, rows: list[str]) -> str:
    """A table with a header per ``(key, header, format)`` column, saying the split where a column has one."""
    headers = []
    for key, header, _ in columns:
        split = f"<span class='split'>{_e(SPLITS[key])} split</span>" if key in SPLITS else ""
        headers.append(f"<th>{_e(header)}{split}</th>")
    return f"<table><thead><tr>{''.join(headers)}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _tr(css: str, row: dict, columns) -> str:
    """One table row of ``row``'s values in ``columns``: numbers right-aligned, text left-aligned."""
    cells = []
    for key, _, fmt in columns:
        value = row.get(key)
        align = "" if _is_number(value) else " class='text'"
        text = speedup_cell(row) if key == "speedup" else _text(key, value, fmt)  # with its interval
        cells.append(f"<td{align}>{_e(text)}</td>")
    return f"<tr class='{_e(css)}'>{''.join(cells)}</tr>"


def _text(key: str, value, fmt: str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not _is_number(value):
        return str(value)
    if key == "gzip_bytes":  # shown in KB
        value = value / 1024
    if fmt is not None:
        return fmt.format(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _e(value) -> str:
    return html.escape(str(value), quote=True)
