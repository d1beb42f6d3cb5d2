"""What the KFP UI and downstream steps get: typed promote outputs, a Markdown summary, described parameters, retries."""

import json
import re
from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl

from kfopt.components import steps
from kfopt.components.ops import build_components
from kfopt.errors import KfoptError
from kfopt.pipelines.optimize_and_promote import STEP_RETRIES, build_pipeline, compile_pipeline
from kfopt.pipelines.placement import load_placement
from kfopt.result import Baseline, Candidate, RunResult

SEARCH = ["quantize(mode=dynamic)", "prune(target_sparsity=0.5,epochs=1)>quantize(mode=int8)"]


def _compiled(tmp_path, **options):
    path = compile_pipeline(tmp_path / "p.yaml", SEARCH, **options)
    return yaml.safe_load(Path(path).read_text().split("\n---\n")[0])


def test_promote_has_typed_outputs_a_deploy_step_can_be_gated_on(tmp_path):
    pipeline = _compiled(tmp_path, rounds=0)
    promote = pipeline["components"]["comp-promote"]["outputDefinitions"]["parameters"]
    assert {name: spec["parameterType"] for name, spec in promote.items()} == {
        "registered_model": "STRING",
        "version": "STRING",
        "promoted": "BOOLEAN",
        "alias": "STRING",
    }
    outputs = pipeline["root"]["outputDefinitions"]
    assert outputs["parameters"]["promoted"]["parameterType"] == "BOOLEAN"
    assert set(outputs["artifacts"]) == {"results", "report", "summary"}

    # A user's pipeline deploys only what was promoted, with dsl.If on the typed output.
    @dsl.component(base_image="python:3.11")
    def deploy(version: str, alias: str):
        print(version, alias)

    ops = build_components()

    @dsl.pipeline(name="gate")
    def gate(results_uri: str = "gs://bucket/results"):
        results = dsl.importer(artifact_uri=results_uri, artifact_class=dsl.Artifact)
        promote = ops.promote(
            registered_model="digits",
            tracking_uri="",
            max_accuracy_drop="1%",
            objective="size",
            experiment="kfopt",
            results=results.output,
        )
        with dsl.If(promote.outputs["promoted"] == True):  # noqa: E712 (a KFP condition, not Python)
            deploy(version=promote.outputs["version"], alias=promote.outputs["alias"])

    compiler.Compiler().compile(gate, str(tmp_path / "gate.yaml"))
    tasks = yaml.safe_load((tmp_path / "gate.yaml").read_text())["root"]["dag"]["tasks"]
    condition = next(t for t in tasks.values() if "triggerPolicy" in t)["triggerPolicy"]["condition"]
    assert condition == "inputs.parameter_values['pipelinechannel--promote-promoted'] == true"


def test_every_pipeline_parameter_has_a_description(tmp_path):
    parameters = _compiled(tmp_path, rounds=1)["root"]["inputDefinitions"]["parameters"]
    missing = [name for name, spec in parameters.items() if not spec.get("description")]
    assert not missing
    assert "'1%'" in parameters["max_accuracy_drop"]["description"]


def test_optimize_and_evaluate_steps_retry_with_backoff_and_compile_sets_the_count(tmp_path):
    def retries(pipeline):
        found = {}
        for component in pipeline["components"].values():
            for name, task in (component.get("dag") or {}).get("tasks", {}).items():
                if name.startswith(("optimize", "evaluate")):
                    found[name] = task.get("retryPolicy")
        return found

    placed = _compiled(tmp_path, rounds=1, placement=load_placement("gke"))
    policies = retries(placed)
    # Fine-tuning optimize and its evaluate, post-training group, round 2's optimize and evaluate.
    assert {"optimize", "evaluate", "optimize-group", "optimize-2", "evaluate-2"} <= set(policies)
    for name, policy in policies.items():
        assert policy["maxRetryCount"] == STEP_RETRIES == 2, name
        assert policy["backoffDuration"] == "60s" and policy["backoffFactor"] == 2.0, name
    assert "retryPolicy" not in placed["root"]["dag"]["tasks"]["prepare"]  # a bad input fails at once
    assert all(p["maxRetryCount"] == 5 for p in retries(_compiled(tmp_path, rounds=0, step_retries=5)).values())
    assert all(p is None for p in retries(_compiled(tmp_path, rounds=0, step_retries=0)).values())
    with pytest.raises(KfoptError, match="negative"):
        build_pipeline(SEARCH, step_retries=-1)

    from kfopt.pipelines.runners import compile_for_cluster

    summary = compile_for_cluster(tmp_path / "c.yaml", search=None, rounds=0, step_retries=4)
    assert "retried up to 4 times" in summary["description"]
    tasks = retries(yaml.safe_load((tmp_path / "c.yaml").read_text().split("\n---\n")[0]))
    assert tasks and all(p["maxRetryCount"] == 4 for p in tasks.values())


def test_markdown_summary_lists_every_candidate_and_marks_the_winner():
    result = RunResult(
        model="demo:mlp",
        data="digits",
        baseline=Baseline(format="keras", accuracy=0.97, gzip_bytes=300_000, latency_p50_ms=0.4),
        candidates=[
            Candidate(
                recipe="quantize(mode=int8)",
                status="ok",
                format="tflite",
                accuracy=0.965,
                accuracy_drop=0.005,
                gzip_bytes=30_000,
                latency_p50_ms=0.1,
                speedup=4.0,
            ),
            Candidate.failed("distill|odd", "technique 'distill' failed: OSError: bad | file"),
        ],
        winner="quantize(mode=int8)",
        pareto=["quantize(mode=int8)"],
        selection={"objective": "size", "metric": "gzip_bytes", "max_accuracy_drop": "1%"},
    )
    text = steps.markdown_summary(result)
    lines = text.splitlines()
    assert "Winner: **quantize(mode=int8)**" in lines[0] and "budget 1%" in lines[0]
    assert lines[3].startswith("| --- |")
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| --- ")]
    assert len(table) == 1 + 1 + 2  # header, baseline, two candidates

    def columns(line):
        return len(re.findall(r"(?<!\\)\|", line))

    assert columns(table[0]) == columns(table[1]) == columns(table[2]) == columns(table[3])
    assert table[2].startswith("| **quantize(mode=int8)** \u2605 | tflite | ok | 0.9650")
    assert "29.3" in table[2] and "4.00x" in table[2]
    assert "distill\\|odd" in table[3] and "bad \\| file" in table[3]  # pipes escaped: the row keeps its columns
    assert "keeps the model's architecture" not in text  # the winner keeps it: nothing more to say

    # A dense student won: the summary names the best candidate that keeps the architecture, as kfopt search does.
    result.winner, result.best_same_architecture = "distill(architecture=dense)", "quantize(mode=int8)"
    same = [line for line in steps.markdown_summary(result).splitlines() if "keeps the model's architecture" in line]
    assert same == ["Best that keeps the model's architecture (no student of another kind): **quantize(mode=int8)**."]


@pytest.mark.slow
def test_promote_returns_the_version_whether_it_was_promoted_and_the_alias(tmp_path):
    from kfp.dsl import Artifact, ClassificationMetrics

    from kfopt.components.ops import promote
    from kfopt.components.status import StepStatus

    root = tmp_path / "prepared"
    prepared = steps.prepare_step("demo:mlp", "digits", root / "baseline", root / "data", epochs=3)
    steps.optimize_step("quantize(mode=dynamic)", root / "baseline", root / "data", tmp_path / "c", position=0)
    steps.select_step(root / "baseline", [tmp_path / "c"], tmp_path / "results", max_accuracy_drop=0.05)

    def artifact(path, kind=Artifact):
        made = kind()
        made.path = str(path)
        return made

    confusion = artifact(tmp_path / "confusion", ClassificationMetrics)
    outputs = promote(
        registered_model="digits-ui",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        max_accuracy_drop="0.05",
        objective="size",
        experiment="kfopt",
        results=artifact(tmp_path / "results"),
        confusion=confusion,
        status=artifact(tmp_path / "status"),
        baseline=artifact(root / "baseline"),
        dataset=artifact(root / "data"),
    )
    assert (outputs.version, outputs.promoted, outputs.alias) == ("1", True, "champion")  # the first champion
    assert json.loads(outputs.registered_model)["version"] == 1
    assert StepStatus.load(tmp_path / "status").status == "ok"
    # The winner's confusion matrix, for the KFP UI: every test sample counted once, rows the true classes.
    matrix = confusion.metadata["confusionMatrix"]
    assert confusion.metadata["recipe"] == "quantize(mode=dynamic)"
    assert [c["displayName"] for c in matrix["annotationSpecs"]] == [str(c) for c in range(10)]
    assert sum(sum(r["row"]) for r in matrix["rows"]) == prepared["splits"]["test"]
    assert json.loads((tmp_path / "confusion").read_text())["recipe"] == "quantize(mode=dynamic)"
