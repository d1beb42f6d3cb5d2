"""Accuracy-aware search: refinement proposals (synthetic records) and a tiny real two-round search."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from pydantic import Field

from kfopt.cli import main
from kfopt.plugins.manager import registry
from kfopt.plugins.prune import Prune
from kfopt.recipe import parse_recipe, plan
from kfopt.recipe_search import best_feasible, layer_sensitivity, next_round, propose, target_met
from kfopt.recipe_search.proposals import round_gain

BUDGET = 0.01


@pytest.fixture(scope="module")
def techniques():
    return registry()


def record(techniques, label, val_drop, test_drop, gzip, status="ok", **extra):
    steps = [p.as_dict() for p in plan(parse_recipe([label]), techniques)]
    return {
        "recipe": label,
        "steps": steps,
        "status": status,
        "val_accuracy_drop": val_drop,
        "accuracy_drop": test_drop,
        "accuracy": 0.95 - test_drop,
        "gzip_bytes": gzip,
        "latency_p50_ms": 0.01,
        "compression_ratio": 100000 / gzip,
        "speedup": 1.0,
        **extra,
    }


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
    assert (
        recipes[0].endswith(">quantize(mode=int8)") and "epochs=20" in recipes[0]
    )  # screened at 3, proposed at the default
    assert "fine-tuning for the default epochs (prune 20)" in prune.why
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
    # Never proposes a recipe already tried.
    again = propose(records, max_accuracy_drop=BUDGET, tried=[p.recipe for p in proposals], techniques=techniques)
    assert not {p.recipe for p in again} & {p.recipe for p in proposals}


def test_when_everything_tried_is_over_budget_the_search_retreats_instead_of_stopping(techniques):
    # A model with little redundancy: round 1's prune and student lose far more than the budget.
    over = [
        record(techniques, "prune(target_sparsity=0.8)>quantize(mode=int8)", 0.35, 0.35, 6000),
        record(techniques, "distill(width=0.25)>quantize(mode=int8)", 0.30, 0.30, 5000),
        record(techniques, "quantize(mode=int8)", 0.0, 0.0, 20000),
    ]
    proposals = propose(over, max_accuracy_drop=BUDGET, max_trials=4, techniques=techniques)
    recipes = {p.recipe.split(">")[0].split("(")[0]: p for p in proposals}
    assert sparsity_of(recipes["prune"].recipe) == pytest.approx(0.4) and "retreat" in recipes["prune"].why
    assert width_of(recipes["distill"].recipe) == pytest.approx(0.5) and "retreat" in recipes["distill"].why
    # Once the retreat fits the budget, the bisection climbs from it again, between it and what was over.
    fits = record(techniques, "prune(target_sparsity=0.4)>quantize(mode=int8)", 0.004, 0.004, 12000)
    up = propose([*over, fits], max_accuracy_drop=BUDGET, max_trials=1, techniques=techniques)[0]
    assert sparsity_of(up.recipe) == pytest.approx(0.6) and "bisect prune sparsity up" in up.why
    # Nothing below the floor: pruning 10% saves too little to be worth a trial.
    low = [record(techniques, "prune(target_sparsity=0.3)", 0.35, 0.35, 6000)]
    assert propose(low, max_accuracy_drop=BUDGET, techniques=techniques) == []


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
        "prune(target_sparsity=0.8)"
    )  # 0.9 reaches 20x but is not within budget on validation


#: Layer sensitivity of a demo:cnn-like model: two small sensitive layers, a mid-sized one, a big robust one.
CNN_ROWS = [
    {
        "layer": "dense_1",
        "params": 640,
        "sparsity": 0.9,
        "val_accuracy": 0.35,
        "val_accuracy_drop": 0.63,
        "int8_val_accuracy_drop": 0.0,
    },
    {
        "layer": "conv2d",
        "params": 144,
        "sparsity": 0.9,
        "val_accuracy": 0.74,
        "val_accuracy_drop": 0.24,
        "int8_val_accuracy_drop": 0.0,
    },
    {
        "layer": "conv2d_1",
        "params": 4608,
        "sparsity": 0.9,
        "val_accuracy": 0.78,
        "val_accuracy_drop": 0.20,
        "int8_val_accuracy_drop": 0.0,
    },
    {
        "layer": "dense",
        "params": 51200,
        "sparsity": 0.9,
        "val_accuracy": 0.99,
        "val_accuracy_drop": 0.0,
        "int8_val_accuracy_drop": 0.0,
    },
]


def test_sensitivity_keeps_the_small_sensitive_layers_dense_and_prunes_the_rest_harder(techniques):
    records = [
        record(techniques, "quantize(mode=int8)", 0.0, 0.0, 20000),
        record(techniques, "prune(target_sparsity=0.8,epochs=3)>quantize(mode=int8)", 0.005, 0.004, 6000),
        record(techniques, "prune(target_sparsity=0.9,epochs=3)>quantize(mode=int8)", 0.03, 0.03, 5000),
    ]
    plain = propose(records, max_accuracy_drop=BUDGET, max_trials=4, techniques=techniques)
    assert plain and not any("keep_dense" in p.recipe for p in plain)  # no sensitivity, no keep_dense

    proposals = propose(records, max_accuracy_drop=BUDGET, max_trials=4, sensitivity=CNN_ROWS, techniques=techniques)
    first = proposals[0]
    (prune, quantize) = plan(parse_recipe([first.recipe]), techniques)  # a valid inline recipe, list included
    # The two small sensitive layers (1.4% of the params) stay dense; conv2d_1 (8%) would cost more than it saves.
    assert prune.config.keep_dense == ["conv2d", "dense_1"]
    assert prune.config.target_sparsity == pytest.approx(0.9)  # the sparsity that was over budget, now for the rest
    assert (prune.config.epochs, quantize.config.mode) == (20, "int8")
    assert "dense_1 (640 params, val drop +63.00 pt" in first.why and "conv2d (144 params" in first.why
    assert "conv2d_1" not in first.why
    assert any("bisect prune sparsity up from" in p.why and "keep_dense" not in p.recipe for p in proposals)

    # Over budget too: the next round bisects within that keep_dense set and does not propose it again.
    records.append(record(techniques, first.recipe, 0.02, 0.02, 3000))
    again = propose(records, max_accuracy_drop=BUDGET, max_trials=4, sensitivity=CNN_ROWS, techniques=techniques)
    kept = [p for p in again if "keep_dense" in p.recipe and "fine-tune longer" not in p.why]
    assert len(kept) == 1 and sparsity_of(kept[0].recipe) == pytest.approx(0.85)
    assert "bisect prune sparsity up with keep_dense=[conv2d,dense_1]" in kept[0].why


def test_int8_sensitive_layers_stay_float_under_qat(techniques):
    rows = [dict(row, int8_val_accuracy_drop=0.05 if row["layer"] == "dense_1" else 0.0) for row in CNN_ROWS]
    records = [record(techniques, "prune(target_sparsity=0.8)>quantize(mode=int8)", 0.04, 0.04, 6000)]
    proposals = propose(records, max_accuracy_drop=BUDGET, sensitivity=rows, techniques=techniques)
    (recipe,) = [p.recipe for p in proposals if "float_layers" in p.recipe]
    assert recipe.endswith(">quantize(mode=qat,float_layers=[dense_1])")
    assert plan(parse_recipe([recipe]), techniques)[-1].config.float_layers == ["dense_1"]
    assert not any(
        "float_layers" in p.recipe
        for p in propose(records, max_accuracy_drop=BUDGET, sensitivity=CNN_ROWS, techniques=techniques)
    )


def test_a_chain_a_little_over_budget_is_retried_with_longer_fine_tuning(techniques):
    records = [
        record(techniques, "prune(target_sparsity=0.8,epochs=3)>quantize(mode=int8)", 0.015, 0.01, 6000),
        record(
            techniques, "distill(width=0.25,epochs=6)>quantize(mode=int8)", 0.05, 0.05, 3000
        ),  # far over: not retried
    ]
    proposals = propose(records, max_accuracy_drop=BUDGET, techniques=techniques)
    (longer,) = [p for p in proposals if "fine-tune longer" in p.why]
    assert longer.recipe == "prune(method=magnitude,target_sparsity=0.8,epochs=20)>quantize(mode=int8)"
    # The same round already bisects up from it (provisionally feasible), at the default epochs; the far one: nothing.
    (bisect,) = [p for p in proposals if p.why.startswith("bisect prune sparsity up")]
    assert sparsity_of(bisect.recipe) == pytest.approx(0.89) and "epochs=20" in bisect.recipe
    assert "provisional start" in bisect.why
    # The far one is not fine-tuned longer at its width: a wider student is tried instead.
    (student,) = [p for p in proposals if p.recipe.startswith("distill(")]
    assert width_of(student.recipe) == pytest.approx(0.5) and "retreat" in student.why


def test_two_round_search_on_digits_finds_a_more_aggressive_recipe(tmp_path):
    out = tmp_path / "search"
    args = [
        "search",
        "--model",
        "demo:mlp",
        "--data",
        "digits",
        "--epochs",
        "8",
        "--out",
        str(out),
        "--recipe",
        "prune(target_sparsity=0.5,epochs=2)>quantize(mode=int8)",
        "--rounds",
        "1",
        "--max-trials",
        "1",
        "--max-accuracy-drop",
        "0.05",
    ]
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
    assert [t["round"] for t in trace] == [1, 2]
    # Pushed up along the prune bisection, or beyond it with the sensitive layers dense.
    assert trace[1]["why"].startswith(("bisect prune sparsity up", "keep the most sensitive layers dense"))
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
    assert all(abs(r["int8_val_accuracy_drop"]) <= 0.03 for r in rows)  # int8 weights of one layer barely matter
    assert all(np.array_equal(a, b) for a, b in zip(before, mlp.get_weights()))


def test_latency_proposes_a_dense_student_once_a_width_scaled_student_distils(techniques):
    records = [
        record(techniques, "quantize(mode=int8)", 0.0, 0.0, 20000),
        record(techniques, "prune(target_sparsity=0.8,epochs=3)>quantize(mode=int8)", 0.005, 0.004, 6000),
        record(techniques, "distill(width=0.25,epochs=6)>quantize(mode=int8)", 0.004, 0.006, 8000),
    ]
    first = propose(records, max_accuracy_drop=BUDGET, objective="latency", max_trials=4, techniques=techniques)[0]
    assert first.recipe == "distill(architecture=dense,width=1)>quantize(mode=int8)"  # default epochs
    assert "dense student" in first.why and "per-op overhead" in first.why
    (step, quantize) = plan(parse_recipe([first.recipe]), techniques)
    assert (step.config.architecture, quantize.config.mode) == ("dense", "int8")
    # For size it comes after the prune and distill refinements.
    size = [
        p.recipe
        for p in propose(records, max_accuracy_drop=BUDGET, objective="size", max_trials=10, techniques=techniques)
    ]
    assert size[-1] == first.recipe and len(size) > 1
    # Only once.
    tried = records + [record(techniques, first.recipe, 0.05, 0.05, 5000)]
    assert not any(
        "architecture=dense" in p.recipe
        for p in propose(tried, max_accuracy_drop=BUDGET, objective="latency", techniques=techniques)
    )

    def dense_proposed(records, objective):
        return any(
            "architecture=dense" in p.recipe
            for p in propose(
                records, max_accuracy_drop=BUDGET, objective=objective, max_trials=10, techniques=techniques
            )
        )

    # Width-scaled students all over budget: still worth a trial for latency, not for size; none tried: neither.
    over = [dict(r, val_accuracy_drop=0.05) if r["recipe"].startswith("distill") else r for r in records]
    assert dense_proposed(over, "latency") and not dense_proposed(over, "size")
    no_students = [r for r in records if not r["recipe"].startswith("distill")]
    assert not dense_proposed(no_students, "latency") and not dense_proposed(no_students, "size")


def test_dense_and_same_architecture_widths_bisect_separately(techniques):
    records = [
        record(techniques, "distill(width=0.5)>quantize(mode=int8)", 0.002, 0.002, 8000, latency_p50_ms=0.008),
        record(techniques, "distill(width=0.25)>quantize(mode=int8)", 0.05, 0.05, 4000, latency_p50_ms=0.0077),
        record(
            techniques,
            "distill(architecture=dense,width=1)>quantize(mode=int8)",
            0.004,
            0.003,
            9000,
            latency_p50_ms=0.0014,
        ),
        record(
            techniques,
            "distill(architecture=dense,width=0.125)>quantize(mode=int8)",
            0.04,
            0.04,
            2000,
            latency_p50_ms=0.0009,
        ),
    ]
    proposals = propose(records, max_accuracy_drop=BUDGET, objective="latency", max_trials=2, techniques=techniques)
    dense, same = proposals
    # The dense family has the faster feasible student, so its bisection comes first; each within its own bracket.
    assert "architecture=dense" in dense.recipe and dense.recipe.endswith(">quantize(mode=int8)")
    assert width_of(dense.recipe) == pytest.approx(math.sqrt(0.125 * 1), abs=1e-3)
    assert (
        "bisect distill width of dense students down" in dense.why and "widest student over budget 0.125" in dense.why
    )
    assert "architecture" not in same.recipe
    assert width_of(same.recipe) == pytest.approx(math.sqrt(0.25 * 0.5), abs=1e-3)
    assert "widest student over budget 0.25" in same.why
    # Dense students no faster than the best width-scaled one (an MLP teacher): not narrowed further.
    slow = [dict(r, latency_p50_ms=0.009) if "architecture=dense" in r["recipe"] else r for r in records]
    assert not any(
        "architecture=dense" in p.recipe
        for p in propose(slow, max_accuracy_drop=BUDGET, objective="latency", techniques=techniques)
    )
    # Without the over-budget dense student the dense bracket's floor is the default, not the same family's 0.25.
    (dense_only,) = [
        p
        for p in propose(records[:3], max_accuracy_drop=BUDGET, objective="latency", techniques=techniques)
        if "architecture=dense" in p.recipe
    ]
    assert width_of(dense_only.recipe) == pytest.approx(0.25) and "floor 0.0625" in dense_only.why


class Prune70(Prune):
    """prune with another default target_sparsity: the search must read it from here, not assume 0.8."""

    class Config(Prune.Config):
        target_sparsity: float = Field(0.7, gt=0, lt=1)


class WithPrune70:
    """A registry where 'prune' is Prune70."""

    def __init__(self, techniques):
        self.techniques = techniques

    def get(self, name):
        return Prune70() if name == "prune" else self.techniques.get(name)


@pytest.mark.parametrize("registry_of", [lambda t: t, WithPrune70], ids=["prune", "prune70"])
def test_a_step_that_does_not_record_a_key_ran_with_its_technique_config_default(techniques, registry_of):
    chosen = registry_of(techniques)
    default = chosen.get("prune").Config.model_fields["target_sparsity"].default
    # A hand-written record: its prune step leaves target_sparsity (and method) to the defaults.
    written = {
        **record(techniques, "quantize(mode=int8)", 0.002, 0.002, 5000),
        "recipe": "prune(epochs=20)>quantize(mode=int8)",
        "steps": [
            {"technique": "prune", "config": {"epochs": 20}},
            {"technique": "quantize", "config": {"mode": "int8"}},
        ],
    }
    proposals = propose([written], max_accuracy_drop=BUDGET, max_trials=10, techniques=chosen)
    bisect = next(p for p in proposals if "bisect prune sparsity up" in p.why)
    assert f"(sparsity {default:g}," in bisect.why
    assert sparsity_of(bisect.recipe) == pytest.approx(round((default + 0.98) / 2, 3))
    qat = next(p for p in proposals if p.why.startswith("chain prune -> qat"))
    assert qat.recipe == f"prune(method=magnitude,target_sparsity={default:g},epochs=20)>quantize(mode=qat)"
    for proposal in proposals:  # the label the pipeline passes on parses back to what the search plans
        assert parse_recipe([proposal.recipe]).steps == proposal.steps


def test_a_copied_structured_prune_keeps_its_pattern_and_takes_no_target_sparsity(techniques):
    records = [
        record(techniques, "prune(method=structured,m_by_n=1:4,epochs=3)>quantize(mode=int8)", 0.015, 0.015, 5000),
        record(techniques, "prune(method=structured,epochs=3)>quantize(mode=int8)", 0.015, 0.015, 4000),
    ]
    recipes = [p.recipe for p in propose(records, max_accuracy_drop=BUDGET, techniques=techniques)]
    assert recipes == [
        "prune(method=structured,epochs=20)>quantize(mode=int8)",
        "prune(method=structured,m_by_n=1:4,epochs=20)>quantize(mode=int8)",
    ]
    for recipe in recipes:
        plan(parse_recipe([recipe]), techniques)  # would raise if target_sparsity came along


def searched(techniques, label, val_drop, gzip, round_number):
    return {**record(techniques, label, val_drop, val_drop, gzip), "round": round_number}


def test_without_rounds_a_round_that_does_not_improve_the_best_stops_the_search(techniques):
    records = [
        searched(techniques, "quantize(mode=int8)", 0.0, 20000, 1),
        searched(techniques, "prune(target_sparsity=0.8)>quantize(mode=int8)", 0.005, 6000, 1),
        searched(techniques, "prune(target_sparsity=0.89)>quantize(mode=int8)", 0.005, 4000, 2),
    ]
    bounds = {"max_accuracy_drop": BUDGET, "objective": "size", "techniques": techniques, "until_no_gain": True}
    # Round 2 made the best 50% smaller: round 3 is proposed.
    assert round_gain(records, 2, max_accuracy_drop=BUDGET, objective="size") == pytest.approx(0.5)
    proposals, stop = next_round(records, 3, **bounds)
    assert proposals and stop is None
    # Round 3 only found a candidate 2% smaller (or one over budget): the search stops, saying why.
    third = records + [
        searched(techniques, "prune(target_sparsity=0.9)>quantize(mode=int8)", 0.005, 3920, 3),
        searched(techniques, "prune(target_sparsity=0.95)>quantize(mode=int8)", 0.03, 2000, 3),
    ]
    proposals, stop = next_round(third, 4, **bounds)
    assert proposals == [] and stop.startswith("round 3 improved the best candidate within budget by 2.0%")
    # With a number of rounds (until_no_gain off) the same evidence refines on.
    assert next_round(third, 4, **{**bounds, "until_no_gain": False})[0]


def test_the_time_estimate_scales_with_fine_tuning_epochs(techniques):
    from kfopt.recipe_search.driver import estimated_seconds
    from kfopt.result import Candidate

    def ran(label, seconds):
        return Candidate(recipe=label, steps=record(techniques, label, 0, 0, 1)["steps"], seconds=seconds)

    done = [ran("prune(target_sparsity=0.8,epochs=2)>quantize(mode=int8)", 4.0), ran("quantize(mode=int8)", 1.0)]

    def planned(label):
        return [p.as_dict() for p in plan(parse_recipe([label]), techniques)]

    assert estimated_seconds(planned("prune(target_sparsity=0.9,epochs=20)>quantize(mode=int8)"), done) == 40
    assert estimated_seconds(planned("distill(width=0.3,epochs=30)"), done) == 4.0  # unlike anything: the slowest
    # A candidate that fine-tuned as long is the estimate (conversion and measuring do not scale with epochs).
    done.append(ran("prune(target_sparsity=0.98,epochs=20)>quantize(mode=int8)", 12.0))
    assert estimated_seconds(planned("prune(target_sparsity=0.9,epochs=20)>quantize(mode=int8)"), done) == 12


def test_a_tiny_time_budget_stops_refinement_before_it_is_exceeded(mlp, digits_flat, tmp_path):
    from kfopt.plugins import ModelHandle
    from kfopt.recipe_search import search

    result = search(
        "demo:mlp",
        "digits",
        tmp_path / "search",
        recipes=["prune(target_sparsity=0.5,epochs=1)>quantize(mode=dynamic)"],
        max_accuracy_drop=0.05,
        time_budget=0.5,
        baseline=(ModelHandle.from_keras(mlp), digits_flat),
        latency_runs=20,
    )
    assert [c.round for c in result.candidates] == [1]  # round 1 always runs; nothing after it started
    assert result.search["until_no_gain"] and result.search["time_budget"] == 0.5
    assert result.search["stopped"].startswith("time budget of 0.5 s:") and "would take" in result.search["stopped"]
    skipped = [t for t in result.search_trace if t["round"] == 2]
    assert skipped and all(t["status"].startswith("not run: time budget") for t in skipped)
    assert result.best_same_architecture == result.winner  # pruning keeps the architecture


def conv_rows():
    return [dict(row, type="Dense" if row["layer"].startswith("dense") else "Conv2D") for row in CNN_ROWS]


def test_latency_on_a_conv_model_proposes_channel_pruning_and_bisects_it(techniques):
    records = [
        record(techniques, "quantize(mode=int8)", 0.0, 0.0, 20000),
        record(techniques, "prune(target_sparsity=0.8,epochs=3)>quantize(mode=int8)", 0.005, 0.004, 6000),
    ]
    channels = [
        p
        for p in propose(
            records, max_accuracy_drop=BUDGET, objective="latency", sensitivity=conv_rows(), techniques=techniques
        )
        if "method=channels" in p.recipe
    ]
    assert len(channels) == 1 and channels[0].recipe.endswith(">quantize(mode=int8)")
    assert sparsity_of(channels[0].recipe) == pytest.approx(0.5) and "keeps its architecture" in channels[0].why
    mlp_rows = [dict(row, type="Dense") for row in CNN_ROWS]
    for objective, rows in (("latency", mlp_rows), ("size", conv_rows())):  # an MLP, or size: no channels
        assert not any(
            "method=channels" in p.recipe
            for p in propose(
                records,
                max_accuracy_drop=BUDGET,
                objective=objective,
                sensitivity=rows,
                max_trials=10,
                techniques=techniques,
            )
        )
    # Channel sparsity has its own bracket (ceiling 0.9), apart from magnitude sparsity.
    tried = records + [
        record(
            techniques, "prune(method=channels,target_sparsity=0.5,epochs=20)>quantize(mode=int8)", 0.004, 0.004, 9000
        )
    ]
    for objective in ("latency", "mix"):
        proposals = propose(
            tried,
            max_accuracy_drop=BUDGET,
            objective=objective,
            sensitivity=conv_rows(),
            max_trials=10,
            techniques=techniques,
        )
        (bisect,) = [p for p in proposals if "method=channels" in p.recipe]
        assert sparsity_of(bisect.recipe) == pytest.approx(0.7) and bisect.why.startswith("bisect channel sparsity up")
        assert proposals[0] == bisect  # channels first for a conv model's latency
        sparse = [p for p in proposals if "method=magnitude" in p.recipe]
        if objective == "latency":  # zeros in dense kernels are no faster: no magnitude pruning for latency
            assert sparse == []
        else:  # for mix they still shrink the size, in a bracket of their own
            magnitude = [p for p in sparse if p.why.startswith("bisect prune sparsity up")]
            assert [sparsity_of(p.recipe) for p in magnitude] == [pytest.approx(0.89)]


def test_round_one_gets_channel_pruning_only_for_a_conv_model_and_latency(techniques):
    from kfopt._tf import keras
    from kfopt.recipe_search.driver import best_same_architecture, channel_recipes, keeps_architecture
    from kfopt.select import select

    k = keras()
    conv = k.Sequential([k.Input((8, 8, 1)), k.layers.Conv2D(4, 3), k.layers.Flatten(), k.layers.Dense(10)])
    dense = k.Sequential([k.Input((64,)), k.layers.Dense(16), k.layers.Dense(10)])
    (proposal,) = channel_recipes(conv, "latency", techniques)
    assert proposal.recipe.startswith("prune(method=channels,target_sparsity=0.5")
    assert channel_recipes(conv, "mix", techniques) and not channel_recipes(conv, "size", techniques)
    assert not channel_recipes(dense, "latency", techniques)
    # The dense student wins on latency; the best candidate that keeps the architecture is named beside it.
    from kfopt.result import Candidate

    def ran(label, latency):
        r = record(techniques, label, 0.0, 0.0, 5000, latency_p50_ms=latency)
        return Candidate(**{k: v for k, v in r.items() if k != "val_accuracy_drop"}, val_accuracy_drop=0.0)

    candidates = [
        ran("distill(architecture=dense,width=1)>quantize(mode=int8)", 0.002),
        ran("prune(method=channels,target_sparsity=0.5)>quantize(mode=int8)", 0.006),
        ran("quantize(mode=int8)", 0.008),
    ]
    assert not keeps_architecture(candidates[0], techniques) and keeps_architecture(candidates[1], techniques)
    assert best_same_architecture(candidates, max_accuracy_drop=BUDGET, objective="latency", techniques=techniques) == (
        "prune(method=channels,target_sparsity=0.5)>quantize(mode=int8)"
    )
    # When the winner itself keeps the architecture, it is the one named (never a second model beside it).
    kept = candidates[1:]
    assert best_same_architecture(kept, max_accuracy_drop=BUDGET, objective="latency", techniques=techniques) == (
        select(kept, max_accuracy_drop=BUDGET, objective="latency").winner
    )


def test_sensitivity_uses_the_task_metric_for_regression_and_binary_models(tmp_path):
    from kfopt._tf import keras
    from kfopt.data import load_data

    k = keras()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    target = (x @ rng.normal(size=8) + 0.1 * rng.normal(size=600)).astype(np.float32)
    for kind, y, activation, loss in (
        ("regression", target, None, "mse"),
        ("binary", (target > 0).astype(np.int64), "sigmoid", "binary_crossentropy"),
    ):
        k.utils.set_random_seed(0)
        model = k.Sequential(
            [
                k.Input((8,)),
                k.layers.Dense(32, activation="relu", name="hidden"),
                k.layers.Dense(1, activation=activation, name="out"),
            ]
        )
        model.compile(k.optimizers.Adam(1e-2), loss)
        model.fit(x[:400], y[:400], epochs=30, verbose=0)
        data = load_data((x[:400], y[:400], x[400:], y[400:]), input_shape=(8,))
        rows = layer_sensitivity(model, data, sparsity=0.95)
        assert {r["metric"] for r in rows} == {"mae" if kind == "regression" else "binary_accuracy"}, kind
        # Removing most of a layer hurts: mae rises (a positive drop), binary accuracy falls.
        assert rows[0]["val_metric_drop"] > (0.2 if kind == "regression" else 0.05), (kind, rows)
        assert rows == sorted(rows, key=lambda r: -r["val_metric_drop"])
        assert {r["type"] for r in rows} == {"Dense"}


def test_the_best_chain_is_pushed_and_a_narrower_student_is_pruned_like_the_chain(techniques):
    records = [
        record(techniques, "prune(target_sparsity=0.89,epochs=20)>quantize(mode=int8)", 0.0, 0.0, 8000),
        record(techniques, "distill(width=0.125,epochs=30)>quantize(mode=int8)", 0.0, 0.01, 1700),
        record(
            techniques,
            "distill(width=0.25,epochs=30)>prune(target_sparsity=0.8,epochs=20)>quantize(mode=int8)",
            0.0,
            0.008,
            1800,
        ),
    ]
    proposals = propose(records, max_accuracy_drop=BUDGET, max_trials=10, techniques=techniques)
    (push,) = [p for p in proposals if p.why.startswith("push the best chain further")]
    assert push.recipe.startswith("distill(width=0.25,") and sparsity_of(push.recipe) == pytest.approx(0.89)
    (combined,) = [p for p in proposals if p.why.startswith("combine families")]
    # The 0.125 student is pruned like the feasible 0.25 chain (0.8), not like the teacher (0.89).
    assert width_of(combined.recipe) == pytest.approx(0.125) and sparsity_of(combined.recipe) == pytest.approx(0.8)
