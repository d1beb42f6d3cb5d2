"""Choosing the winner: the accuracy budget, the objective, ties, the Pareto front, nothing eligible."""

import random

import pytest

from kfopt.errors import KfoptError
from kfopt.result import RunResult
from kfopt.select import pareto_front, select


def ok(label, accuracy, drop, gzip, latency=1.0):
    return {
        "recipe": label,
        "status": "ok",
        "reason": None,
        "accuracy": accuracy,
        "accuracy_drop": drop,
        "gzip_bytes": gzip,
        "latency_p50_ms": latency,
    }


def failed(label, status="failed", reason="technique 'x' failed: ValueError: boom"):
    return {"recipe": label, "status": status, "reason": reason}


CANDIDATES = [
    ok("int8", 0.970, 0.002, 90_000, latency=0.020),
    ok("prune80>int8", 0.968, 0.004, 35_000, latency=0.025),
    ok("distill25>int8", 0.940, 0.032, 11_000, latency=0.010),  # smallest, but over the budget
    ok("xla", 0.972, 0.000, 320_000, latency=0.300),
    failed("qat"),
    failed("mixed_precision", "skipped", "accelerate: mixed precision needs a GPU"),
]


def test_smallest_candidate_within_the_budget_wins():
    selection = select(CANDIDATES, max_accuracy_drop=0.01, objective="size")
    assert selection.winner == "prune80>int8"
    assert selection.within_budget == ["int8", "prune80>int8", "xla"]
    assert "over the budget" in selection.reasons["distill25>int8"]
    assert selection.reasons["qat"].startswith("failed: technique 'x' failed")
    assert selection.reasons["mixed_precision"].startswith("skipped: accelerate")


def test_a_larger_budget_lets_the_smallest_win():
    assert select(CANDIDATES, max_accuracy_drop=0.05, objective="size").winner == "distill25>int8"


def test_latency_objective_picks_the_fastest_within_the_budget():
    assert select(CANDIDATES, max_accuracy_drop=0.01, objective="latency").winner == "int8"
    assert select(CANDIDATES, max_accuracy_drop=0.05, objective="latency").winner == "distill25>int8"


def test_a_drop_equal_to_the_budget_is_within_it():
    # 0.97 - 0.96 is 0.010000000000000009 in floating point.
    candidate = ok("edge", 0.96, 0.97 - 0.96, 10)
    assert select([candidate], max_accuracy_drop=0.01).winner == "edge"


def test_ties_go_to_accuracy_then_label_whatever_the_order():
    tied = [ok("b", 0.95, 0.01, 100), ok("a", 0.95, 0.01, 100), ok("c", 0.96, 0.0, 100), ok("d", 0.99, 0.0, 101)]
    for _ in range(5):
        random.shuffle(tied)
        assert select(tied, max_accuracy_drop=0.02).winner == "c"
    same = [ok("b", 0.95, 0.0, 100), ok("a", 0.95, 0.0, 100)]
    assert select(same).winner == select(list(reversed(same))).winner == "a"


def test_all_failed_means_no_winner_and_a_reason_for_each():
    selection = select([failed("a"), failed("b", "skipped", "no TensorRT")], max_accuracy_drop=0.01)
    assert selection.winner is None and selection.pareto == [] and selection.within_budget == []
    assert set(selection.reasons) == {"a", "b"}


def test_no_candidates_at_all():
    selection = select([], max_accuracy_drop=0.01)
    assert selection.winner is None and selection.pareto == []


def test_all_over_the_budget_means_no_winner_but_still_a_front():
    selection = select([ok("a", 0.5, 0.4, 10), ok("b", 0.6, 0.3, 20)], max_accuracy_drop=0.01)
    assert selection.winner is None
    assert selection.pareto == ["a", "b"]


def test_pareto_front_drops_dominated_keeps_ties_and_ignores_failed():
    candidates = CANDIDATES + [ok("dominated", 0.960, 0.012, 95_000), ok("twin", 0.968, 0.004, 35_000)]
    front = pareto_front(candidates, "gzip_bytes")
    # Sorted by size; int8 stays (more accurate than the smaller ones), xla stays (most accurate).
    assert front == ["distill25>int8", "prune80>int8", "twin", "int8", "xla"]
    assert "dominated" not in front and "qat" not in front
    assert pareto_front(candidates, "latency_p50_ms")[0] == "distill25>int8"


def test_a_candidate_missing_the_objective_metric_is_not_eligible():
    candidate = ok("no-latency", 0.97, 0.0, 10)
    candidate["latency_p50_ms"] = None
    selection = select([candidate], objective="latency")
    assert selection.winner is None and "has no latency_p50_ms" in selection.reasons["no-latency"]


def test_unknown_objective_is_a_user_error():
    with pytest.raises(KfoptError, match="Unknown objective 'sise'. Did you mean 'size'"):
        select(CANDIDATES, objective="sise")


def test_a_selection_is_written_into_the_run_record_as_metrics_json_fields():
    result = RunResult(model="m", data="d", baseline={"accuracy": 0.97}, candidates=[dict(c) for c in CANDIDATES])
    result.apply(select(result.candidates, max_accuracy_drop=0.01, objective="size"))
    assert result.winning_candidate.recipe == "prune80>int8"
    saved = result.to_dict()
    assert saved["winner"] == "prune80>int8" and saved["registered_model"] is None
    assert result["winner"] == "prune80>int8"
    assert result["pareto"] == ["distill25>int8", "prune80>int8", "int8", "xla"]
    assert result["selection"] == {
        "objective": "size",
        "metric": "gzip_bytes",
        "max_accuracy_drop": 0.01,
        "within_budget": ["int8", "prune80>int8", "xla"],
        "pareto_fronts": {"gzip_bytes": result["pareto"], "latency_p50_ms": ["distill25>int8", "int8", "xla"]},
    }
    by_label = {c["recipe"]: c for c in saved["candidates"]}
    assert by_label["int8"]["within_budget"] is True and "not_selected_because" not in by_label["int8"]
    assert by_label["distill25>int8"]["within_budget"] is False
    assert "over the budget" in by_label["distill25>int8"]["not_selected_because"]


def test_a_weighted_mix_trades_size_against_latency():
    small_slow = ok("small-slow", 0.97, 0.0, 10_000, latency=0.100)
    big_fast = ok("big-fast", 0.97, 0.0, 100_000, latency=0.010)
    balanced = ok("balanced", 0.97, 0.0, 20_000, latency=0.020)  # 20k*0.02 < 10k*0.1 = 100k*0.01
    candidates = [small_slow, big_fast, balanced]
    assert select(candidates, objective="size").winner == "small-slow"
    assert select(candidates, objective="latency").winner == "big-fast"
    mixed = select(candidates, objective="mix")
    assert mixed.winner == "balanced" and mixed.metric == "gzip_bytes^0.5 * latency_p50_ms^0.5"
    assert select(candidates, objective="mix:0.95").winner == "small-slow"
    assert select(candidates, objective="mix:0.05").winner == "big-fast"
    # Fronts on both metrics, whatever the objective: every candidate here is best on something.
    assert set(mixed.fronts) == {"gzip_bytes", "latency_p50_ms"}
    assert mixed.fronts["gzip_bytes"][0] == "small-slow" and mixed.fronts["latency_p50_ms"][0] == "big-fast"
    from kfopt.recipe_search import target_met
    from kfopt.select import objective_ratio

    ratios = {"compression_ratio": 16.0, "speedup": 4.0, "val_accuracy_drop": 0.0}
    assert objective_ratio(ratios, "mix") == ("compression_ratio^0.5 * speedup^0.5", 8.0)
    assert (
        target_met([{**balanced, **ratios}], max_accuracy_drop=0.01, objective="mix", target=8)["recipe"] == "balanced"
    )
    assert target_met([{**balanced, **ratios}], max_accuracy_drop=0.01, objective="mix", target=9) is None
    for bad in ("mix:1.5", "mix:x", "mixed"):
        with pytest.raises(KfoptError, match="mix"):
            select(candidates, objective=bad)


def test_the_gate_compares_a_mix_like_the_selection():
    from kfopt.promotion import gate

    champion = ok("champion", 0.97, 0.0, 10_000, latency=0.100)
    challenger = ok("challenger", 0.97, 0.0, 20_000, latency=0.020)
    assert gate(challenger, champion, max_accuracy_drop=0.01, objective="size")[0] is False
    promoted, reason = gate(challenger, champion, max_accuracy_drop=0.01, objective="mix")
    assert promoted and "gzip_bytes^0.5 * latency_p50_ms^0.5" in reason


def test_a_winner_is_within_the_budget_on_both_splits():
    lucky = {**ok("lucky-on-test", 0.97, 0.005, 5_000), "val_accuracy_drop": 0.03}
    steady = {**ok("steady", 0.97, 0.004, 9_000), "val_accuracy_drop": 0.007}
    selection = select([lucky, steady], max_accuracy_drop=0.01)
    assert selection.winner == "steady"
    assert "on the validation split is over the budget" in selection.reasons["lucky-on-test"]


# -- latency: steady ranking, ties within the resolution ------------------------------------------
def timed(label, gzip, latency, speedup, low, high, drop=0.0, baseline=None, fmt="tflite"):
    """A candidate whose speedup was measured interleaved with its baseline (``baseline`` ms in that window,
    by default latency * speedup: a window without drift), with its interval."""
    return {
        **ok(label, 0.97 - drop, drop, gzip, latency=latency),
        "val_accuracy_drop": drop,
        "format": fmt,
        "speedup": speedup,
        "speedup_low": low,
        "speedup_high": high,
        "compared_with": {"format": fmt, "latency_p50_ms": latency * speedup if baseline is None else baseline},
    }


def bare(record):
    """The same record without its spread (as records from before it was measured)."""
    return {k: v for k, v in record.items() if k not in ("speedup_low", "speedup_high")}


def test_latency_differences_within_the_resolution_are_ties_broken_by_drop_then_size():
    fast_big = timed("fast-big", 90_000, 0.0100, 2.00, 1.90, 2.10)
    slower_small = timed("slower-small", 30_000, 0.0103, 1.94, 1.85, 2.03)  # 3% slower: within 5%
    slow_tiny = timed("slow-tiny", 10_000, 0.0200, 1.00, 0.95, 1.05)  # clearly slower: no tie
    candidates = [fast_big, slower_small, slow_tiny]
    for _ in range(3):
        random.shuffle(candidates)
        selection = select(candidates, objective="latency")
        assert selection.winner == "slower-small"
        assert selection.ties == ["fast-big", "slower-small"]
        assert selection.as_dict()["ties_within_noise"] == ["fast-big", "slower-small"]
    # Bare numbers (no spread) decide as before: the fastest.
    assert select([bare(c) for c in candidates], objective="latency").winner == "fast-big"
    # 7% apart is more than the resolution counted once: no tie, the fastest...
    apart = [fast_big, timed("slower-small", 30_000, 0.0107, 1.87, 1.78, 1.96)]
    selection = select(apart, objective="latency")
    assert selection.winner == "fast-big" and selection.ties == []
    assert "ties_within_noise" not in selection.as_dict()
    # ...unless a candidate's own interval is wider than that (±10% here).
    wide = [fast_big, timed("slower-small", 30_000, 0.0107, 1.87, 1.70, 2.06)]
    assert select(wide, objective="latency").winner == "slower-small"


def test_a_slower_less_accurate_candidate_never_wins_a_latency_tie_on_one_byte():
    """The reviewer's repro: overlapping ±5% intervals used to tie a 10% difference, and size broke it."""
    a = timed("a", 30_001, 1.00, 2.0, 2.0 / 1.05, 2.0 * 1.05, drop=0.0)
    b = timed("b", 30_000, 1.10, 2.0 / 1.1, 2.0 / 1.1 / 1.05, 2.0 / 1.1 * 1.05, drop=0.009)
    selection = select([a, b], objective="latency")
    assert selection.winner == "a" and selection.ties == []
    # Within the resolution they tie, and the smaller drop goes before a much smaller size.
    c = timed("c", 10_000, 1.03, 2.0 / 1.03, 2.0 / 1.03 / 1.05, 2.0 / 1.03 * 1.05, drop=0.009)
    selection = select([a, c], objective="latency")
    assert selection.winner == "a" and selection.ties == ["a", "c"]


def test_a_latency_tie_goes_to_the_smaller_metric_drop_and_the_budget_still_rules():
    faster = timed("faster", 30_000, 0.0100, 2.00, 1.90, 2.10, drop=0.004)
    better = timed("better", 30_000, 0.0102, 1.96, 1.86, 2.06, drop=0.001)
    assert select([faster, better], objective="latency").winner == "better"
    # A tied candidate over the budget is not eligible, however small.
    over = timed("over", 1_000, 0.0101, 1.98, 1.88, 2.08, drop=0.05)
    selection = select([faster, over], objective="latency", max_accuracy_drop=0.01)
    assert selection.winner == "faster" and "over the budget" in selection.reasons["over"]


def test_the_load_during_a_candidates_own_window_does_not_pick_the_winner():
    """Raw p50s come from different windows (or pipeline nodes); the paired speedup over one baseline does not."""
    from kfopt.recipe_search import best_feasible, round_gain, target_met
    from kfopt.select import latency_baselines, steady_objective

    # 'loaded' was timed while the machine was 3x slower: its baseline read 0.060 ms beside it.
    loaded = {**timed("loaded", 30_000, 0.0200, 3.00, 2.85, 3.15, baseline=0.060), "round": 1}
    quiet = {**timed("quiet", 30_000, 0.0100, 1.25, 1.19, 1.31, baseline=0.0125), "round": 1}
    other = {**timed("other", 30_000, 0.0200, 1.00, 0.95, 1.05, baseline=0.020), "round": 2}
    records = [loaded, quiet, other]
    assert latency_baselines(records) == {"tflite": 0.020}
    steady = steady_objective(records, "latency")
    assert steady(loaded) == pytest.approx(0.020 / 3) and steady(quiet) == pytest.approx(0.020 / 1.25)
    assert min(records, key=lambda r: r["latency_p50_ms"])["recipe"] == "quiet"  # what raw p50s would pick
    for objective in ("latency", "mix"):
        assert select(records, objective=objective).winner == "loaded"
        # The search picks and measures its progress the same way.
        assert best_feasible(records, 0.01, objective)["recipe"] == "loaded"
    assert round_gain(records, 2, max_accuracy_drop=0.01, objective="latency") == pytest.approx(0.0)
    hit = target_met(records, max_accuracy_drop=0.01, objective="latency", target=1.2)
    assert hit["recipe"] == "loaded"
    # The raw p50 stays in the record, for display.
    assert loaded["latency_p50_ms"] == 0.0200
    # Formats keep their own baselines; a record without a paired speedup falls back to its raw p50.
    keras = timed("keras", 30_000, 0.5, 1.0, 0.95, 1.05, fmt="keras")
    assert latency_baselines([*records, keras]) == {"tflite": 0.020, "keras": 0.5}
    old = ok("old", 0.97, 0.0, 30_000, latency=0.004)
    assert steady_objective([*records, old], "latency")(old) == 0.004


def test_a_mix_ties_within_the_resolution_of_its_latency_share():
    quick = timed("quick", 40_000, 0.0100, 2.00, 1.80, 2.20)  # sqrt(40k * 0.0100) = 20.0
    small = timed("small", 36_000, 0.0115, 1.74, 1.60, 1.90)  # sqrt(36k * 0.0115) = 20.3: within (1.1)^0.5
    assert select([quick, small], objective="mix").winner == "small"
    assert select([bare(quick), bare(small)], objective="mix").winner == "quick"
    # Size alone is exact: no ties there.
    assert select([quick, small], objective="size").ties == []


def test_one_sample_of_a_small_validation_split_is_not_over_the_budget_but_the_test_split_stays_exact():
    """72 validation samples cannot show a 1 pt budget (one sample is 1.39 pt): that drop is noise, not a loss."""
    from kfopt.select import why_not_eligible

    one = 1 / 72
    base = {"status": "ok", "metric_name": "accuracy", "metric": 0.97, "gzip_bytes": 100, "latency_p50_ms": 1.0}
    within = {**base, "metric_drop": 0.0, "val_metric_drop": one, "val_resolution": one}
    assert why_not_eligible(within, max_accuracy_drop=0.01, objective="size") is None
    assert why_not_eligible({**within, "val_resolution": None}, max_accuracy_drop=0.01, objective="size")
    two = {**within, "val_metric_drop": 2 * one}
    assert "on the validation split is over the budget" in why_not_eligible(
        two, max_accuracy_drop=0.01, objective="size"
    )
    on_test = {**within, "metric_drop": one}
    assert "over the budget" in why_not_eligible(on_test, max_accuracy_drop=0.01, objective="size")
    assert why_not_eligible(within, max_accuracy_drop="1%", objective="size") is None


def test_the_evaluator_gives_the_validation_resolution_of_counted_metrics_only(tmp_path):
    from kfopt.data import load_data
    from kfopt.evaluate import Evaluator
    from kfopt.models import build_demo
    from kfopt.plugins import ModelHandle

    handle = ModelHandle.from_keras(build_demo("demo:mlp"))
    data = load_data("digits", input_shape=(64,), validation_from="test")
    evaluator = Evaluator(data, handle, tmp_path, latency_runs=2)
    assert evaluator.val_resolution == pytest.approx(1 / len(data.validation.y))
    assert Evaluator(data, handle, tmp_path, latency_runs=2, metric="macro_f1").val_resolution is None


def test_a_noisy_measurement_ties_no_wider_than_twice_the_resolution():
    """A candidate timed under load (1.2x, interval 0.6-2.4) must not tie with, and beat, a 2x one."""
    fast = timed("fast", 30_000, 0.0100, 2.0, 2.0 / 1.05, 2.0 * 1.05, drop=0.002)
    noisy = timed("noisy", 30_000, 0.0167, 1.2, 0.6, 2.4, drop=0.0)
    selection = select([fast, noisy], objective="latency")
    assert selection.winner == "fast"
    assert not selection.ties


def test_a_latency_tie_is_broken_on_the_validation_split_not_on_test():
    """Choosing on test is what the validation split is there to avoid: within a tie, validation decides."""
    better_on_val = {**timed("val-better", 30_000, 0.0100, 2.0, 1.9, 2.1, drop=0.004), "val_accuracy_drop": 0.0}
    better_on_test = {**timed("test-better", 30_000, 0.0101, 1.98, 1.88, 2.08, drop=0.0), "val_accuracy_drop": 0.006}
    assert select([better_on_val, better_on_test], objective="latency").winner == "val-better"


def test_the_gate_wants_a_latency_gain_beyond_the_noise_between_runs():
    from kfopt.promotion import gate

    champion = ok("champion", 0.97, 0.0, 10_000, latency=0.100)
    for objective in ("latency", "mix"):
        promoted, reason = gate(
            ok("a-bit-faster", 0.97, 0.0, 10_000, latency=0.097), champion, max_accuracy_drop=0.01, objective=objective
        )
        assert not promoted and "not clearly below" in reason and "10%" in reason
    assert gate(ok("faster", 0.97, 0.0, 10_000, latency=0.080), champion, max_accuracy_drop=0.01, objective="latency")[
        0
    ]
    # Sizes are exact: one byte less is a gain.
    assert gate(ok("smaller", 0.97, 0.0, 9_999, latency=0.2), champion, max_accuracy_drop=0.01, objective="size")[0]


def test_the_baseline_shows_the_latency_it_had_beside_the_candidates_not_a_lone_timing():
    from kfopt.result import Baseline, Candidate, RunResult

    # A lone timing of the baseline in a loaded moment: 5.98 ms, while beside each candidate it took ~0.33 ms.
    candidates = [
        Candidate(**timed(f"c{i}", 30_000, 0.33, 1.0, 0.95, 1.05, baseline=p50, fmt=fmt))
        for i, (p50, fmt) in enumerate([(0.32, "keras"), (0.33, "keras"), (0.34, "keras"), (0.02, "tflite")])
    ]
    baseline = Baseline(
        format="keras",
        latency_p50_ms=5.98,
        latency_p95_ms=7.0,
        references={"tflite": {"format": "tflite", "latency_p50_ms": 0.2}, "saved_model": {"latency_p50_ms": 0.9}},
    )
    result = RunResult(model="m", data="d", seed=0, baseline=baseline, candidates=candidates)
    result.settle_baseline_latency()
    assert result.baseline.latency_p50_ms == pytest.approx(0.33)
    assert result.baseline.references["tflite"]["latency_p50_ms"] == pytest.approx(0.02)
    assert result.baseline.references["saved_model"]["latency_p50_ms"] == 0.9  # no candidate timed beside it


def test_the_gate_never_compares_with_a_champion_measured_on_other_test_data():
    import numpy as np

    from kfopt.data import load_data
    from kfopt.promotion import gate

    x, y = np.random.default_rng(0).normal(size=(100, 4)).astype("float32"), np.arange(100) % 3
    digest = load_data((x, y, x, y)).splits.test_digest
    assert len(digest) == 16 and load_data((x, y, x, y)).splits.test_digest == digest
    easier = y.copy()
    easier[0] = 1
    other = load_data((x, y, x, easier)).splits.test_digest
    assert other != digest
    # A small model scored 1.0 on test rows it gets right: against a champion measured on the real test split.
    champion = {**ok("champion", 0.97, 0.0, 10_000), "test_digest": digest}
    lucky = {**ok("lucky", 1.0, 0.0, 2_000), "test_digest": other}
    promoted, reason = gate(lucky, champion, max_accuracy_drop=0.01, objective="size", champion_version="1")
    assert not promoted and "measured on other test data" in reason
    assert gate({**lucky, "test_digest": digest}, champion, max_accuracy_drop=0.01, objective="size")[0]


def test_a_budget_larger_than_the_metric_can_lose_is_refused_but_an_error_budget_is_not():
    from kfopt.plugins.manager import registry
    from kfopt.select import check_budget

    metrics = registry().metrics
    for name in ("accuracy", "binary_accuracy", "auc", "macro_f1"):
        with pytest.raises(KfoptError, match="0.05 for 5 points"):
            check_budget(5, metrics[name])
        check_budget(0.05, metrics[name])
        check_budget("5%", metrics[name])
    check_budget(5, metrics["mae"])  # an error in the target's units: 5 may be a fine budget
