"""Accuracy-aware search: refinement proposals (synthetic records) and a tiny real two-round search."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from kfopt.cli import main
from kfopt.plugins.manager import registry
from kfopt.recipe import parse_recipe, plan
from kfopt.refine import best_feasible, layer_sensitivity, propose, target_met

BUDGET = 0.01


@pytest.fixture(scope="module")
def techniques():
    return registry()


def record(techniques, label, val_drop, test_drop, gzip, status="ok", **extra):
    steps = [p.as_dict() for p in plan(parse_recipe([label]), techniques)]
    return {"recipe": label, "steps": steps, "status": status, "val_accuracy_drop": val_drop, "accuracy_drop": test_drop,
            "accuracy": 0.95 - test_drop, "gzip_bytes": gzip, "latency_p50_ms": 0.01, "compression_ratio": 100000 / gzip,
            "speedup": 1.0, **extra}


def sparsity_of(recipe):
    return next(s.config["target_sparsity"] for s in parse_recipe([recipe]).steps if s.technique == "prune")


def width_of(recipe):
    return next(s.config["width"] for s in parse_recipe([recipe]).steps if s.technique == "distill")


def test_refinement_pushes_prune_up_and_distill_width_down(techniques):
    records = [
        record(techniques, "quantize(mode=int8)", 0.0, 0.0, 20000),
        record(techniques, "prune(target_sparsity=0.8,epochs=3)>quantize(mode=int8)", 0.005, 0.004, 6000),
        record(techniques, "distill(width=0.5,epochs=6)>quantize(mode=int8)", 0.004, 0.006, 8000),
    ]
    proposals = propose(records, max_accuracy_drop=BUDGET, objective="size", max_trials=4, techniques=techniques)
    recipes = [p.recipe for p in proposals]
    assert len(proposals) == 4 and all(p.why for p in proposals)
    prune = proposals[0]
    assert recipes[0].endswith(">quantize(mode=int8)") and "epochs=3" in recipes[0]
    assert 0.8 < sparsity_of(prune.recipe) < 0.98
    assert "bisect prune sparsity up" in prune.why
    assert width_of(recipes[1]) < 0.5
    assert any(r.startswith("distill(") and ">prune(" in r for r in recipes)  # distill -> prune -> int8
    assert any(r.endswith("quantize(mode=qat)") and r.startswith("prune(") for r in recipes)  # prune -> qat
    # Bounded by max_trials; the latency objective tries narrower students first.
    assert len(propose(records, max_accuracy_drop=BUDGET, max_trials=1, techniques=techniques)) == 1
    latency = propose(records, max_accuracy_drop=BUDGET, objective="latency", max_trials=1, techniques=techniques)
    assert latency[0].recipe.startswith("distill(")


def test_bisection_narrows_between_feasible_and_over_budget(techniques):
    records = [
        record(techniques, "prune(target_sparsity=0.8)", 0.005, 0.005, 6000),
        record(techniques, "prune(target_sparsity=0.9)", 0.03, 0.03, 5000),
        record(techniques, "distill(width=0.25)", 0.002, 0.002, 5000),
        record(techniques, "distill(width=0.125)", 0.05, 0.05, 3000),
    ]
    # A distilled student pruned further does not move the bounds of the pure prune or distill bisections.
    chained = record(techniques, "distill(width=0.25)>prune(target_sparsity=0.95)>quantize(mode=int8)", 0.0, 0.0, 1000)
    proposals = propose(records + [chained], max_accuracy_drop=BUDGET, max_trials=2, techniques=techniques)
    assert sparsity_of(proposals[0].recipe) == pytest.approx(0.85)
    assert not proposals[0].recipe.startswith("distill")
    assert 0.125 < width_of(proposals[1].recipe) < 0.25
    # Never proposes a recipe already tried; nothing feasible -> nothing to refine.
    again = propose(records, max_accuracy_drop=BUDGET, tried=[p.recipe for p in proposals], techniques=techniques)
    assert not {p.recipe for p in again} & {p.recipe for p in proposals}
    assert propose([r for r in records if r["val_accuracy_drop"] > BUDGET], max_accuracy_drop=BUDGET,
                   techniques=techniques) == []


def test_refinement_chooses_on_validation_not_test(techniques):
    # Val and test disagree: 0.9 looks fine on test but is over budget on validation, and vice versa for 0.8.
    records = [
        record(techniques, "prune(target_sparsity=0.8)>quantize(mode=int8)", 0.005, 0.03, 6000),
        record(techniques, "prune(target_sparsity=0.9)>quantize(mode=int8)", 0.02, 0.0, 5000),
    ]
    first = propose(records, max_accuracy_drop=BUDGET, max_trials=1, techniques=techniques)[0]
    assert sparsity_of(first.recipe) == pytest.approx(0.85)  # from 0.8 (val-feasible) toward 0.9, not above 0.9
    assert "sparsity 0.8" in first.why
    assert best_feasible(records, BUDGET, "size")["recipe"].startswith("prune(target_sparsity=0.8)")
    assert target_met(records, max_accuracy_drop=BUDGET, objective="size", target=16)["recipe"].startswith(
        "prune(target_sparsity=0.8)")  # 0.9 reaches 20x but is not within budget on validation


def test_two_round_search_on_digits_finds_a_more_aggressive_recipe(tmp_path):
    out = tmp_path / "search"
    args = ["search", "--model", "demo:mlp", "--data", "digits", "--epochs", "8", "--out", str(out),
            "--recipe", "prune(target_sparsity=0.5,epochs=2)>quantize(mode=int8)",
            "--rounds", "1", "--max-trials", "1", "--max-accuracy-drop", "0.05"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "round" in result.output and "Winner" in result.output
    saved = json.loads((out / "metrics.json").read_text())
    rounds = [c["round"] for c in saved["candidates"]]
    assert rounds == [1, 2], saved["search_trace"]
    first, second = saved["candidates"]
    assert first["val_accuracy"] is not None and first["val_accuracy_drop"] <= 0.05
    assert sparsity_of(second["recipe"]) > 0.5
    assert second["sparsity"] > first["sparsity"] + 0.1  # really more aggressive, measured
    trace = saved["search_trace"]
    assert [t["round"] for t in trace] == [1, 2] and "bisect prune sparsity up" in trace[1]["why"]
    assert saved["winner"] in {c["recipe"] for c in saved["candidates"]}
    assert "Layer sensitivity" in result.output and saved["layer_sensitivity"]


def test_layer_sensitivity_prunes_one_layer_at_a_time_without_touching_the_model(mlp, digits_flat):
    before = [w.copy() for w in mlp.get_weights()]
    rows = layer_sensitivity(mlp, digits_flat, sparsity=0.99)
    kernels = [layer for layer in mlp.layers if any(len(w.shape) >= 2 for w in layer.trainable_weights)]
    assert sorted(r["layer"] for r in rows) == sorted(layer.name for layer in kernels)
    assert all(r["val_accuracy"] is not None and -1 <= r["val_accuracy_drop"] <= 1 for r in rows)
    assert rows[0]["val_accuracy_drop"] > 0.05  # 99% of one layer's weights gone hurts somewhere
    assert rows == sorted(rows, key=lambda r: -r["val_accuracy_drop"])
    assert all(np.array_equal(a, b) for a, b in zip(before, mlp.get_weights()))
