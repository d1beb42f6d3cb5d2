"""The HTML report and the parent MLflow run: candidates, Pareto plots, search trace, layer sensitivity."""

from __future__ import annotations

import base64
import html
import re
import subprocess
import sys

import pytest

from kfopt.html_report import pareto_plots, render_html

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRICKY = "quantize(mode=<int8>&co)"  # HTML special characters in a recipe label


def search_result() -> dict:
    """A two-round search as kfopt.recipe_search.search writes it: a winner, one over budget, a failure, an unrun trial."""

    def ok(recipe, round, why, accuracy, val_drop, gzip, latency, fmt="tflite", **extra):
        return {
            "recipe": recipe,
            "status": "ok",
            "reason": None,
            "format": fmt,
            "round": round,
            "why": why,
            "accuracy": accuracy,
            "accuracy_drop": 0.96 - accuracy,
            "val_accuracy": 0.97 - val_drop,
            "val_accuracy_drop": val_drop,
            "metric_name": "accuracy",
            "metric": accuracy,
            "metric_drop": 0.96 - accuracy,
            "val_metric": 0.97 - val_drop,
            "val_metric_drop": val_drop,
            "gzip_bytes": gzip,
            "compression_ratio": 300_000 / gzip,
            "latency_p50_ms": latency,
            "speedup": 0.4 / latency,
            **extra,
        }

    why2 = "bisect prune sparsity up from 'prune(target_sparsity=0.5)' (val drop +0.20 pt < budget): try 0.75"
    candidates = [
        ok(
            "prune(target_sparsity=0.5)",
            1,
            "round 1: from the search space",
            0.955,
            0.002,
            150_000,
            0.41,
            "keras",
            within_budget=True,
            not_selected_because="larger than the winner",
        ),
        ok(
            TRICKY,
            1,
            "round 1: from the search space",
            0.90,
            0.04,
            40_000,
            0.01,
            within_budget=False,
            not_selected_because="accuracy drop 0.0600 is over the budget 0.0100",
        ),
        {
            "recipe": "distill(width=0.5)",
            "status": "failed",
            "reason": "technique 'distill' failed: OSError: <no file>",
            "round": 1,
            "why": "round 1: from the search space",
            "within_budget": False,
            "not_selected_because": "failed: technique 'distill' failed",
        },
        ok("prune(target_sparsity=0.75)", 2, why2, 0.952, 0.006, 90_000, 0.40, "keras", within_budget=True),
    ]
    trace = [
        {
            "round": c["round"],
            "recipe": c["recipe"],
            "why": c["why"],
            "status": c["status"],
            "val_accuracy_drop": c.get("val_accuracy_drop"),
            "val_metric_drop": c.get("val_metric_drop"),
            "gzip_bytes": c.get("gzip_bytes"),
        }
        for c in candidates
    ]
    trace.append(
        {
            "round": 2,
            "recipe": "prune(target_sparsity=0.9)",
            "why": "a <guess> & a hope",
            "status": "not run: time budget of 60 s spent",
        }
    )
    return {
        "model": "demo:mlp",
        "data": "digits",
        "seed": 0,
        "baseline": {
            "format": "keras",
            "accuracy": 0.96,
            "accuracy_drop": 0.0,
            "val_accuracy": 0.97,
            "val_accuracy_drop": 0.0,
            "gzip_bytes": 300_000,
            "latency_p50_ms": 0.4,
            "compression_ratio": 1.0,
        },
        "candidates": candidates,
        "winner": "prune(target_sparsity=0.75)",
        "pareto": ["prune(target_sparsity=0.75)", TRICKY],
        "registered_model": None,
        "selection": {
            "objective": "size",
            "metric": "gzip_bytes",
            "max_accuracy_drop": 0.01,
            "within_budget": ["prune(target_sparsity=0.5)", "prune(target_sparsity=0.75)"],
        },
        "search": {
            "rounds": 1,
            "max_trials": 2,
            "max_time": 60.0,
            "objective": "size",
            "max_accuracy_drop": 0.01,
            "target": None,
            "stop_when_met": False,
            "choices_use": "validation split (val_metric_drop)",
            "final_check_uses": "test split",
            "stopped": "time budget of 60 s spent",
            "target_met_by": None,
            "seconds": 61.2,
        },
        "search_trace": trace,
        "layer_sensitivity": [
            {
                "layer": "dense_2",
                "params": 2560,
                "sparsity": 0.9,
                "metric": "accuracy",
                "val_metric": 0.91,
                "val_metric_drop": 0.06,
                "kept_after_fine_tune": 0.125,
            },
            {
                "layer": "dense_1",
                "params": 65536,
                "sparsity": 0.9,
                "metric": "accuracy",
                "val_metric": 0.97,
                "val_metric_drop": 0.0,
            },  # fmt: skip
        ],
    }


def text_of(page: str) -> str:
    """The page as a reader sees it: tags and embedded images dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"data:image/png;base64,[^']+", "", page)))


def table_after(page: str, heading: str) -> str:
    return page.split(f"<h2>{heading}", 1)[1].split("</table>", 1)[0]


def test_report_shows_every_candidate_trace_sensitivity_and_splits():
    result = search_result()
    page = render_html(result)
    text = text_of(page)
    candidates = table_after(page, "Candidates")
    for candidate in result["candidates"]:
        assert html.escape(candidate["recipe"]) in candidates
    assert "OSError: &lt;no file&gt;" in candidates and "winner" in candidates
    assert candidates.count("<tr") == 1 + 1 + len(result["candidates"])  # header, baseline, candidates
    assert ">round<" in candidates and ">val drop<" in candidates
    assert "+0.0060" in candidates and "87.9" in candidates  # round 2's val drop; its size in KB

    trace = table_after(page, "Search trace")
    for entry in result["search_trace"]:
        assert html.escape(entry["why"]) in trace and html.escape(entry["recipe"]) in trace
    assert "not run: time budget of 60 s spent" in trace

    sensitivity = table_after(page, "Layer sensitivity")
    assert "dense_2" in sensitivity and "65,536" in sensitivity and "90%" in sensitivity
    assert "kept after fine tune" in sensitivity and "0.125" in sensitivity  # an unknown key, shown as it is

    # Which split every number comes from.
    assert "validation split (val_metric_drop)" in text and "test split" in text
    assert "Stopped: time budget of 60 s spent after 61.2 s" in " ".join(text.split())
    assert re.search(r"accuracy\s*test split", text_of(candidates)) and re.search(
        r"val drop\s*validation split", text_of(candidates)
    )
    assert "Layer sensitivity (validation split)" in text and "Trade-offs (test split)" in text


def test_report_escapes_html_everywhere():
    page = render_html(search_result())
    assert "<int8>" not in page and "<guess>" not in page and "<no file>" not in page
    assert "quantize(mode=&lt;int8&gt;&amp;co)" in page and "a &lt;guess&gt; &amp; a hope" in page
    assert "<script" not in render_html({**search_result(), "model": "<script>alert(1)</script>"})


def test_pareto_plots_are_png_files_the_page_embeds():
    result = search_result()
    plots = pareto_plots(result)
    assert set(plots) == {"pareto_size.png", "pareto_latency.png"}
    assert all(png.startswith(PNG_MAGIC) and len(png) > 5000 for png in plots.values())
    page = render_html(result, plots)
    embedded = re.findall(r"data:image/png;base64,([^']+)", page)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(plots.values())


def test_report_of_a_run_without_search_or_sensitivity():
    result = search_result()
    for key in ("search", "search_trace", "layer_sensitivity"):
        del result[key]
    for candidate in result["candidates"]:
        for key in ("round", "why", "val_accuracy", "val_accuracy_drop", "val_metric", "val_metric_drop"):
            candidate.pop(key, None)
    page = render_html(result)
    assert "Search trace" not in page and "Layer sensitivity" not in page and "Stopped" not in page
    assert ">round<" not in page and ">val drop<" not in page and "test split" in page
    assert page.count("data:image/png;base64,") == 2


def test_plots_use_agg_without_touching_the_global_backend():
    code = (
        "import matplotlib; matplotlib.use('svg'); from kfopt.html_report import pareto_plots; "
        "p = pareto_plots({'model': 'm', 'data': 'd', 'baseline': {'accuracy': 0.9, 'gzip_bytes': 9, 'latency_p50_ms': 1}, 'candidates': []}); "
        f"print(matplotlib.get_backend(), all(v.startswith({PNG_MAGIC!r}) for v in p.values()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["svg", "True"]


# -- the parent MLflow run --------------------------------------------------------
@pytest.mark.slow
def test_parent_run_carries_report_plots_trace_and_sensitivity(mlflow_server, tmp_path, monkeypatch):
    import json

    from mlflow import MlflowClient

    from kfopt.tracking import RunLogger

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, result = mlflow_server.uri, search_result()
    for _ in range(2):  # a second attempt (promote --from) logs nothing twice
        RunLogger(tmp_path, uri, "kfopt-report").log_result(result)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("kfopt-report").experiment_id
    parents = client.search_runs([experiment], f"tags.`kfopt.out` = '{tmp_path.resolve()}'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["kfopt.search_stopped"] == "time budget of 60 s spent"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "report.html",
        "pareto_size.png",
        "pareto_latency.png",
        "search_trace.json",
        "layer_sensitivity.json",
        "metrics.json",
        "baseline.json",
    }
    folder = tmp_path / "downloaded"
    folder.mkdir()
    client.download_artifacts(parent.info.run_id, "", str(folder))
    assert (folder / "pareto_size.png").read_bytes().startswith(PNG_MAGIC)
    assert "Search trace" in (folder / "report.html").read_text()
    assert json.loads((folder / "search_trace.json").read_text()) == result["search_trace"]
    assert json.loads((folder / "layer_sensitivity.json").read_text()) == result["layer_sensitivity"]

    # A run without a search: the same report, no trace or sensitivity files, no stop tag.
    plain = {k: v for k, v in result.items() if k not in ("search", "search_trace", "layer_sensitivity")}
    plain["seed"] = 1  # another run
    (tmp_path / "plain").mkdir()
    RunLogger(tmp_path / "plain", uri, "kfopt-report").log_result(plain)
    [run] = client.search_runs([experiment], f"tags.`kfopt.out` = '{(tmp_path / 'plain').resolve()}'")
    assert "kfopt.search_stopped" not in run.data.tags
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "pareto_size.png", "pareto_latency.png"} <= paths
    assert not paths & {"search_trace.json", "layer_sensitivity.json"}


def test_plot_points_carry_short_recipe_names_that_never_overlap():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from kfopt.html_report import _label_points
    from kfopt.recipe import parse_recipe

    assert parse_recipe("prune(target_sparsity=0.8)>quantize(mode=int8)").short == "prune .8>int8"
    assert parse_recipe("distill(width=0.25)>prune(keep_dense=[a,b])>quantize(mode=qat)").short == (
        "distill .25>prune 2 dense>qat"
    )
    figure = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    # Twelve points crowded in one corner and a few apart: labels must not be drawn over each other.
    points = [((1 + i * 0.01, 0.9 + (i % 3) * 0.001), f"{i} prune .{i}>int8") for i in range(12)]
    points += [((5, 0.5), "13 xla"), ((9, 0.7), "14 distill .25>int8")]
    ax.scatter([x for (x, _), _ in points], [y for (_, y), _ in points])
    drawn = _label_points(figure, ax, points)
    renderer = figure.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in drawn]
    assert all(not a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    texts = {label.get_text() for label in drawn}
    assert {"13 xla", "14 distill .25>int8", "0 prune .0>int8"} <= texts and len(drawn) < len(points)


def test_sensitivity_tables_speak_the_runs_metric():
    """A regression run's sensitivity is in mae, never shown as accuracy or in points."""
    from rich.console import Console

    from kfopt.report import sensitivity_table

    rows = [{"layer": "dense", "params": 640, "sparsity": 0.9, "metric": "mae", "val_metric": 0.41,
             "val_metric_drop": 0.03, "int8_val_metric_drop": 0.001}]  # fmt: skip
    console = Console(width=200, record=True)
    console.print(sensitivity_table(rows))
    text = console.export_text()
    assert "val mae" in text and "+0.0300" in text and "drops in mae" in text
    assert "accuracy" not in text and " pt" not in text
    page = render_html({**search_result(), "layer_sensitivity": rows})
    section = text_of(table_after(page, "Layer sensitivity"))
    assert "0.41" in section and "+0.0300" in section and "val_accuracy" not in section


def test_the_report_names_the_best_candidate_that_keeps_the_architecture():
    result = search_result()
    same = "prune(target_sparsity=0.5)"
    page = text_of(render_html({**result, "best_same_architecture": same}))
    assert f"Best that keeps your architecture: {same} (2.0x smaller, 0.98x faster)." in " ".join(page.split())
    assert "Best that keeps your architecture" not in render_html(
        {**result, "best_same_architecture": result["winner"]}
    )


def test_the_table_shows_the_baseline_each_formats_ratios_divide_by():
    from rich.console import Console

    from kfopt.report import results_table
    from kfopt.result import Baseline, Candidate, RunResult

    reference = {"format": "tflite", "size_bytes": 12_000, "gzip_bytes": 11_439, "latency_p50_ms": 0.02}
    result = RunResult(
        model="m",
        data="d",
        baseline=Baseline(format="keras", gzip_bytes=12_083, accuracy=0.95, references={"tflite": reference}),
        candidates=[
            Candidate(recipe="quantize(mode=int8)", format="tflite", gzip_bytes=4_878, compression_ratio=11_439 / 4_878)
        ],
    )
    console = Console(width=250, record=True)
    console.print(results_table(result))
    rows = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if line.count("│") > 3}
    assert set(rows) == {"baseline", "baseline as fp32 TFLite", "quantize(mode=int8)"}
    assert "11.2" in rows["baseline as fp32 TFLite"] and "reference" in rows["baseline as fp32 TFLite"]
    assert "2.3x" in rows["quantize(mode=int8)"]  # 11,439 / 4,878: the row above, not the Keras baseline's 11.8 KB
