"""Tables a person reads: techniques, the baseline beside its candidates, a search and its layer sensitivity, model versions."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table


def techniques_table(registry) -> Table:
    table = Table(title="kfopt techniques", show_lines=True)
    for column in ("technique", "kind", "formats", "package", "config keys (defaults)"):
        table.add_column(column, overflow="fold")
    for technique in registry:
        keys = "\n".join(f"{k}={_default(f)}" for k, f in technique.Config.model_fields.items())
        formats = f"{'|'.join(sorted(technique.accepts))} ->\n{_produces(technique)}"
        table.add_row(technique.name, technique.kind, formats, registry.owners[technique.name], keys)
    return table


def techniques_json(registry) -> list[dict]:
    return [
        {
            "name": t.name,
            "kind": t.kind,
            "accepts": sorted(t.accepts),
            "produces": _produces(t),
            "package": registry.owners[t.name],
            "config_schema": t.Config.model_json_schema(),
        }
        for t in registry
    ]


def _produces(technique) -> str:
    """What a technique returns; per option when it depends on the config."""
    formats = set()
    for name, field in technique.Config.model_fields.items():
        choices = getattr(field.annotation, "__args__", None)
        if choices and all(isinstance(c, str) for c in choices):
            try:
                formats = {c: technique.produces_for(technique.Config(**{name: c})) for c in choices}
            except Exception:
                continue
            if len(set(formats.values())) > 1:
                return "\n".join(f"{v} ({name}={k})" for k, v in formats.items())
    return technique.produces


def _default(field) -> str:
    return "required" if field.is_required() else str(field.default)


COLUMNS = (
    ("accuracy", "accuracy", "{:.4f}"),
    ("accuracy_drop", "drop", "{:+.4f}"),
    ("agreement", "agree", "{:.3f}"),
    ("gzip_bytes", "gzip KB", "{:,.1f}"),
    ("compression_ratio", "ratio", "{:.1f}x"),
    ("sparsity", "sparsity", "{:.2f}"),
    ("params", "params", "{:,}"),
    # Multiply-accumulates for one input: what channel pruning cuts (zeros in a dense kernel do not).
    ("flops", "flops", "{:,}"),
    ("latency_p50_ms", "p50 ms", "{:.4f}"),
    ("speedup", "speedup", "{:.2f}x"),
)


def speedup_cell(record) -> str:
    """``speedup`` with its interval, "2.41x [2.30–2.53]" (the interval is not symmetric: it is of a ratio),
    or "-" when not measured."""
    speedup = record.get("speedup")
    if speedup is None:
        return "-"
    low, high = record.get("speedup_low"), record.get("speedup_high")
    spread = f" [{low:.2f}–{high:.2f}]" if low is not None and high is not None and high > low else ""
    return f"{speedup:.2f}x{spread}"


def budgeted_metric(result: dict) -> str:
    """The name of the metric the run budgeted (``accuracy`` for records from before metrics had names)."""
    baseline = result.get("baseline") or {}
    selection = result.get("selection") or {}
    return baseline.get("metric_name") or selection.get("budget_metric") or "accuracy"


def columns_for(result: dict) -> list[tuple[str, str, str]]:
    """:data:`COLUMNS`, led by the budgeted metric and its drop when that is not accuracy (headers name it).

    A regression run has no accuracy, agreement or per-class columns (they are None there).
    """
    name = budgeted_metric(result)
    if name == "accuracy":
        return list(COLUMNS)
    classifier = (result.get("baseline") or {}).get("accuracy") is not None
    quality = [("metric", name, "{:.4f}"), ("metric_drop", f"{name} drop", "{:+.4f}")]
    if classifier:
        quality += [("accuracy", "accuracy", "{:.4f}"), ("accuracy_drop", "acc drop", "{:+.4f}")]
        quality += [("agreement", "agree", "{:.3f}")]
    return quality + [c for c in COLUMNS if c[0] not in ("accuracy", "accuracy_drop", "agreement")]


#: How the table names the baseline converted to another format, which that format's candidates are compared with.
REFERENCE_NAMES = {"tflite": "fp32 TFLite", "saved_model": "SavedModel"}


def results_table(result: dict) -> Table:
    """Baseline and candidates, one row each; ratios are against the baseline in the candidate's format."""
    table = Table(title=f"kfopt: {result.get('model')} on {result.get('data')} (test split)")
    table.add_column("model")
    table.add_column("format")
    table.add_column("status")
    columns = columns_for(result)
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    rows = [("baseline", {**result["baseline"], "status": "ok"})]
    used = {c.get("format") for c in result["candidates"] if c.get("status") == "ok"}
    for fmt, reference in (result["baseline"].get("references") or {}).items():
        if fmt in used and fmt != result["baseline"].get("format", "keras"):  # what that format's ratios divide by
            rows.append(
                (
                    f"baseline as {REFERENCE_NAMES.get(fmt, fmt)}",
                    {**reference, "compression_ratio": 1.0, "speedup": 1.0, "status": "reference"},
                )
            )
    rows += [(c["recipe"], c) for c in result["candidates"]]
    for label, row in rows:
        status = row["status"] if row["status"] in ("ok", "reference") else f"{row['status']}: {row.get('reason')}"
        table.add_row(escape(label), row.get("format", "-"), escape(status), *metric_cells(row, columns))
    return table


def metric_cells(row: dict, columns) -> list[str]:
    """The metric cells of one table row (``columns`` from :func:`columns_for`): the terminal and Markdown tables'."""
    cells = []
    for key, _, fmt in columns:
        value = row.get(key)
        if value is None:
            cells.append("-")
        elif key == "speedup":
            cells.append(speedup_cell(row))
        else:
            cells.append(fmt.format(value / 1024 if key == "gzip_bytes" else value))
    return cells


def history_table(name: str, rows: list[dict]) -> Table:
    """Versions of a registered model, newest first: aliases, metrics, and each promotion decision."""
    from rich import box

    table = Table(title=f"{name}: versions, newest first", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in ("ver", "aliases", "accuracy", "gzip KB", "p50 ms", "decision"):
        table.add_column(column, no_wrap=True, justify="left" if column in ("aliases", "decision") else "right")
    table.add_column("recipe, reason, when and by whom", ratio=1, overflow="fold")
    for row in rows:

        def number(key, fmt, scale=1.0, row=row):
            return "-" if row.get(key) is None else fmt.format(row[key] / scale)

        details = [row.get("recipe") or "-"]
        if row.get("decision"):
            when = (row.get("decided_at") or "-").replace("T", " ")[:16]
            details += [row.get("reason") or "-", f"{when} UTC by {row.get('decided_by') or '-'}"]
        table.add_row(
            str(row["version"]),
            "\n".join(row["aliases"]) or "-",
            number("accuracy", "{:.4f}"),
            number("gzip_bytes", "{:,.1f}", 1024),
            number("latency_p50_ms", "{:.3f}"),
            row.get("decision") or "-",
            "\n".join(details),
        )
    return table


def search_table(result: dict) -> Table:
    """The baseline and the candidates of every round, with their round and validation drop, as a rich Table.

    Recipes are shown whole (folded over lines, never cut) and escaped, so a
    printed recipe can be copied back into a command line.
    """
    name = budgeted_metric(result)
    # Accuracy drops read as points (x100); another metric's drops in its own units.
    points = name == "accuracy"
    value_key, drop_key, val_key = (
        ("accuracy", "accuracy_drop", "val_accuracy_drop")
        if points
        else (
            "metric",
            "metric_drop",
            "val_metric_drop",
        )
    )
    table = Table(
        title=f"kfopt: {result.get('model')} on {result.get('data')} (drops in "
        f"{'accuracy points' if points else name}; the "
        f"search chose on the validation split, the winner * is checked on the test split)"
    )
    table.add_column("round", justify="right")
    table.add_column("recipe", overflow="fold", ratio=1, min_width=28)
    table.add_column("status", overflow="fold", max_width=24, min_width=8)
    test_value = "test acc" if points else f"test {name}"
    for col in ("val drop", "test drop", test_value, "KB gz", "compression", "p50 ms", "speedup", "secs"):
        table.add_column(col, justify="right")
    scale, fmt = (100, "{:+.2f}") if points else (1, "{:+.4f}")
    base = result.get("baseline") or {}
    if base.get(value_key) is not None:
        table.add_row(
            "",
            "baseline",
            base.get("format", ""),
            "",
            "",
            f"{base[value_key]:.4f}",
            f"{base['gzip_bytes'] / 1024:,.1f}" if base.get("gzip_bytes") else "",
            "1.0x",
            f"{base['latency_p50_ms']:.4f}" if base.get("latency_p50_ms") else "",
            "1.00x",
            "",
        )
    for c in result["candidates"]:
        if c["status"] != "ok":
            table.add_row(
                str(c.get("round", "")),
                escape(c["recipe"]),
                escape(f"{c['status']}: {c.get('reason') or ''}"),
                *[""] * 7,
                f"{c.get('seconds', 0):.0f}",
            )
            continue
        mark = "*" if c["recipe"] == result.get("winner") else ""
        val, drop, value = c.get(val_key), c.get(drop_key), c.get(value_key)
        table.add_row(
            str(c.get("round", "")),
            mark + escape(c["recipe"]),
            "ok" if c.get("within_budget") else "over budget",
            "-" if val is None else fmt.format(val * scale),
            "-" if drop is None else fmt.format(drop * scale),
            "-" if value is None else f"{value:.4f}",
            f"{c['gzip_bytes'] / 1024:,.1f}",
            f"{c['compression_ratio']:.1f}x",
            f"{c['latency_p50_ms']:.4f}",
            speedup_cell(c),
            f"{c.get('seconds', 0):.0f}",
        )
    return table


def sensitivity_table(rows: list[dict]) -> Table:
    """Layer sensitivity rows as a rich Table, in the run's budgeted metric (accuracy drops in points)."""
    sparsity = rows[0]["sparsity"] if rows else 0
    # Rows name their metric; rows written before metrics were pluggable hold accuracy only.
    name = (rows[0].get("metric") if rows else None) or "accuracy"
    points = name == "accuracy"
    table = Table(
        title=f"Layer sensitivity: one layer pruned to {sparsity:.0%} or its weights int8, "
        f"no fine-tuning (validation split; drops in {'accuracy points' if points else name})"
    )
    for col in ("layer", "kernel params", f"val {name}", "val drop", "int8 weights val drop"):
        table.add_column(col, justify="left" if col == "layer" else "right")

    def drop(value) -> str:
        return "-" if value is None else f"{value * 100:+.2f} pt" if points else f"{value:+.4f}"

    for row in rows:
        value = row.get("val_metric", row.get("val_accuracy"))
        table.add_row(
            row["layer"],
            f"{row['params']:,}",
            "-" if value is None else f"{value:.4f}",
            drop(row.get("val_metric_drop", row.get("val_accuracy_drop"))),
            drop(row.get("int8_val_metric_drop", row.get("int8_val_accuracy_drop"))),
        )
    return table
