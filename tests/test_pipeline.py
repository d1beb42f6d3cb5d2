"""The Kubeflow pipeline: compiled IR (placement, retries, fan-out), the step functions, and a real kfp.local run."""

import html
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import baseline_record

from kfopt.cli import main
from kfopt.components import steps
from kfopt.components.status import STATUS_OUTPUT, StepStatus, read_statuses, step_status
from kfopt.errors import KfoptError
from kfopt.pipelines.optimize_and_promote import compile_pipeline
from kfopt.pipelines.placement import Placement, load_placement
from kfopt.recipe_search import load_search, search_settings, split_by_pool
from kfopt.result import Baseline, RunResult

SEARCH = [
    "quantize(mode=dynamic)",
    "prune(target_sparsity=0.5,epochs=1)>quantize(mode=int8)",
    "accelerate(backend=tflite)",
    "distill(width=0.5,epochs=1)>quantize(mode=int8)",
]
TRAINING = {SEARCH[1], SEARCH[3]}


def compiled(tmp_path, recipes=SEARCH, **options):
    options.setdefault("rounds", 0)
    path = compile_pipeline(tmp_path / "pipeline.yaml", recipes, **options)
    pipeline, *platform = list(yaml.safe_load_all(Path(path).read_text()))
    return pipeline, platform[0]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if platform else {}


def loops(pipeline):
    """{loop display name: (items, loop component, loop task)} of the root DAG's ParallelFors.

    An item is a recipe label, or the list of labels of a grouped step.
    """

    def label(item):
        return [label(i) for i in item] if isinstance(item, list) else item["recipe"]["name"]

    found = {}
    tasks = pipeline["root"]["dag"]["tasks"]
    for task in tasks.values():
        if "parameterIterator" in task:
            given = task["parameterIterator"]["items"]
            if "raw" in given:
                raw = json.loads(given["raw"])
            elif given["inputParameter"] == "pipelinechannel--plan-search-Output":  # the search space's, from the plan
                raw = tasks["plan-search"]["inputs"]["parameters"]["items"]["runtimeValue"]["constant"]
            else:  # a refinement round's: proposed at run time
                raw = []
            items = [label(json.loads(i)) for i in raw]
            found[task["taskInfo"]["name"]] = (items, pipeline["components"][task["componentRef"]["name"]], task)
    return found


def executor_of(pipeline, component):
    return pipeline["components"][component]["executorLabel"]


def test_compiled_pipeline_places_fine_tuning_on_the_accelerator_pool(tmp_path):
    pipeline, k8s = compiled(
        tmp_path,
        image="registry.example/kfopt:1",
        accelerator_image="registry.example/kfopt:1-gpu",
        placement=load_placement("gke"),
        parallelism=3,
    )
    containers = pipeline["deploymentSpec"]["executors"]
    found = loops(pipeline)
    assert {name for name in found} == {"fine-tuning-recipes", "post-training-recipes"}
    assert set(found["fine-tuning-recipes"][0]) == TRAINING
    assert found["post-training-recipes"][0] == [[SEARCH[0], SEARCH[2]]]  # cheap recipes share a step
    for _, _, task in found.values():
        assert task["iteratorPolicy"]["parallelismLimit"] == 3

    training_tasks = found["fine-tuning-recipes"][1]["dag"]["tasks"]
    assert set(training_tasks) == {"optimize", "evaluate"}  # measured apart, on the CPU pool
    gpu_executor = executor_of(pipeline, training_tasks["optimize"]["componentRef"]["name"])
    gpu = containers[gpu_executor]["container"]
    assert gpu["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert gpu["resources"]["accelerator"]["resourceCount"] == "1"
    assert gpu["image"] == "registry.example/kfopt:1-gpu"
    assert k8s[gpu_executor]["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert k8s[gpu_executor]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert training_tasks["optimize"]["inputs"]["parameters"]["measure"]["runtimeValue"]["constant"] is False

    # Only the fine-tuning optimize step gets accelerators, node selectors and tolerations.
    assert set(k8s) == {gpu_executor}
    for name, executor in containers.items():
        container = executor["container"]
        assert "pip install" not in " ".join(container["command"])  # the image holds everything
        if name == gpu_executor:
            continue
        assert "accelerator" not in container["resources"], name
        assert container["resources"]["resourceCpuRequest"] == "2", name
        assert container["resources"]["resourceMemoryRequest"] == "8Gi", name
        assert container["image"] == "registry.example/kfopt:1", name


def test_compiled_pipeline_retries_promotion_and_caches_the_deterministic_steps(tmp_path):
    pipeline, _ = compiled(tmp_path, placement=load_placement("gke"))
    tasks = pipeline["root"]["dag"]["tasks"]
    assert tasks["promote"]["retryPolicy"]["maxRetryCount"] == 3
    assert tasks["promote"]["cachingOptions"] == {}  # registering a version is a side effect: never cached
    for name in ("prepare", "select", "report"):
        assert tasks[name]["cachingOptions"] == {"enableCache": True}, name
        assert "retryPolicy" not in tasks[name]
    assert tasks["prepare"]["taskInfo"]["name"] == "prepare baseline"
    assert tasks["promote"]["taskInfo"]["name"] == "register and promote (MLflow)"
    # select fans in both loops; models travel as artifacts, never parameters.
    select_inputs = tasks["select"]["inputs"]
    assert set(select_inputs["artifacts"]) == {"baseline", "accelerator_candidates", "cpu_candidates"}
    assert set(select_inputs["parameters"]) == {"max_accuracy_drop", "objective", "number"}
    assert set(pipeline["root"]["inputDefinitions"]["parameters"]) == {
        "model",
        "data",
        "max_accuracy_drop",
        "objective",
        "metric",
        "output",
        "registered_model",
        "tracking_uri",
        "experiment",
        "seed",
        "epochs",
        "unsafe",
        "max_trials",
        "max_time",
        "target",
        "stop_when_met",
        "sensitivity",
    }


def test_search_rounds_propose_recipes_at_run_time_and_merge_every_round(tmp_path):
    pipeline, k8s = compiled(tmp_path, rounds=2, placement=load_placement("gke"))
    tasks = pipeline["root"]["dag"]["tasks"]
    assert {"plan-search", "layer-sensitivity", "propose", "propose-2", "select", "select-2", "select-3"} <= set(tasks)
    # Each refinement round loops over what its propose step returned (KFP has no recursion).
    for propose, loop in (("propose", "round-2-recipes"), ("propose-2", "round-3-recipes")):
        task = next(t for t in tasks.values() if t["taskInfo"]["name"] == loop)
        assert task["parameterIterator"]["items"]["inputParameter"].endswith(f"{propose}-Output")
        assert propose in task["dependentTasks"]
        inner = pipeline["components"][task["componentRef"]["name"]]["dag"]["tasks"]
        # Refinements fine-tune: optimized on the accelerator pool, measured on the CPU pool.
        assert sorted(name.split("-")[0] for name in inner) == ["evaluate", "optimize"]
        optimize = next(t for name, t in inner.items() if name.startswith("optimize"))
        assert executor_of(pipeline, optimize["componentRef"]["name"]) in k8s
    # Round n's select merges the previous round's results; the last one feeds the report and promotion.
    for select, previous in (("select-2", "select"), ("select-3", "select-2")):
        artifacts = tasks[select]["inputs"]["artifacts"]
        assert artifacts["previous"]["taskOutputArtifact"]["producerTask"] == previous
        assert artifacts["search"]["taskOutputArtifact"]["producerTask"] == "layer-sensitivity"
    assert tasks["propose-2"]["inputs"]["artifacts"]["results"]["taskOutputArtifact"]["producerTask"] == "select-2"
    for final in ("report", "promote"):
        assert tasks[final]["inputs"]["artifacts"]["results"]["taskOutputArtifact"]["producerTask"] == "select-3"
    assert tasks["select-3"]["taskInfo"]["name"] == "select winner (round 3)"
    assert tasks["plan-search"]["inputs"]["parameters"]["rounds"]["runtimeValue"]["constant"] == 2
    with pytest.raises(KfoptError, match="rounds=-1"):
        compiled(tmp_path, rounds=-1)


def _candidate(directory, recipe, steps_, val_drop, gzip_bytes, **extra):
    """A measured candidate as an optimize step writes it (the model file is opaque bytes here)."""
    directory.mkdir(parents=True)
    (directory / "model.tflite").write_bytes(b"tflite " + recipe.encode())
    record = {
        "recipe": recipe,
        "steps": steps_,
        "status": "ok",
        "artifact": "/elsewhere/model.tflite",
        "format": "tflite",
        "accuracy": 0.97 - val_drop,
        "accuracy_drop": val_drop,
        "val_accuracy_drop": val_drop,
        "gzip_bytes": gzip_bytes,
        "compression_ratio": 80000 / gzip_bytes,
        "latency_p50_ms": 0.01,
        "speedup": 2.0,
        "seconds": 10.0,
        **extra,
    }
    (directory / steps.CANDIDATE_FILE).write_text(json.dumps(record))
    return directory


def test_round_steps_propose_from_validation_and_merge_rounds_into_one_results_folder(tmp_path):
    baseline = baseline_record(tmp_path / "baseline")
    plan = tmp_path / "plan"
    plan.mkdir()
    (plan / steps.SEARCH_FILE).write_text(
        json.dumps(
            {
                "settings": {
                    "rounds": 2,
                    "max_trials": 1,
                    "max_time": None,
                    "objective": "size",
                    "max_accuracy_drop": 0.01,
                    "target": None,
                    "stop_when_met": False,
                },
                "layer_sensitivity": [
                    {"layer": "dense", "params": 10, "sparsity": 0.9, "val_accuracy": 0.9, "val_accuracy_drop": 0.07}
                ],
            }
        )
    )
    prune = [
        {"technique": "prune", "config": {"method": "magnitude", "target_sparsity": 0.5, "epochs": 1}},
        {"technique": "quantize", "config": {"mode": "int8"}},
    ]
    first = [
        _candidate(tmp_path / "c1", "prune-0.5", prune, 0.0, 20000, position=0),
        _candidate(tmp_path / "c2", "int8", prune[1:], 0.0, 23000, position=1),
    ]
    round1 = steps.select_step(baseline, first, tmp_path / "r1", max_accuracy_drop=0.01, number=1, search_dir=plan)
    assert [t["round"] for t in round1["search_trace"]] == [1, 1] and round1["search"]["stopped"] is None
    assert round1["layer_sensitivity"][0]["layer"] == "dense"

    items = [json.loads(i) for i in steps.propose_step(tmp_path / "r1", plan, 2)]
    assert len(items) == 1 and items[0]["round"] == 2  # max_trials 1
    assert "bisect prune sparsity up" in items[0]["why"] and "target_sparsity=0.74" in items[0]["recipe"]

    proposed = _candidate(
        tmp_path / "c3", items[0]["recipe"], prune, 0.005, 12000, position=0, round=2, why=items[0]["why"]
    )
    round2 = steps.select_step(
        baseline,
        [proposed],
        tmp_path / "r2",
        max_accuracy_drop=0.01,
        number=2,
        previous_dir=tmp_path / "r1",
        search_dir=plan,
    )
    assert [c["recipe"] for c in round2["candidates"]] == ["prune-0.5", "int8", items[0]["recipe"]]
    assert round2["winner"] == items[0]["recipe"]
    assert [t["round"] for t in round2["search_trace"]] == [1, 1, 2] and round2["search_trace"][2]["why"] == items[0][
        "why"
    ]
    assert round2["search"]["stopped"] is None and round2["search"]["seconds"] == 30.0
    for candidate in round2["candidates"]:  # every round's models are copied: the folder is self-contained
        assert candidate["artifact"].startswith(str(tmp_path / "r2")) and Path(candidate["artifact"]).is_file()

    # A target met on validation stops the search: the round's one loop item is a no-op with the reason.
    settings = json.loads((plan / steps.SEARCH_FILE).read_text())
    settings["settings"].update(target=3.0, stop_when_met=True)
    (plan / steps.SEARCH_FILE).write_text(json.dumps(settings))
    (stop,) = [json.loads(i) for i in steps.propose_step(tmp_path / "r2", plan, 3)]
    assert stop["round"] == 3 and "target 3x met on the validation split by" in stop[steps.STOPPED]
    steps.stopped_step(tmp_path / "c4", 3, stop[steps.STOPPED])
    round3 = steps.select_step(
        baseline,
        [tmp_path / "c4"],
        tmp_path / "r3",
        max_accuracy_drop=0.01,
        number=3,
        previous_dir=tmp_path / "r2",
        search_dir=plan,
    )
    assert len(round3["candidates"]) == 3 and round3["search"]["stopped"] == stop[steps.STOPPED]
    assert round3["search"]["target_met_by"] == items[0]["recipe"]


def test_tpu_placement_uses_the_gke_tpu_labels(tmp_path):
    pipeline, k8s = compiled(tmp_path, placement=load_placement("gke-tpu"))
    [executor] = k8s
    assert k8s[executor]["nodeSelector"]["labels"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "2x2",
    }
    accelerator = pipeline["deploymentSpec"]["executors"][executor]["container"]["resources"]["accelerator"]
    assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("google.com/tpu", "4")


def test_without_an_accelerator_pool_everything_runs_on_cpu(tmp_path):
    pipeline, k8s = compiled(tmp_path, placement=Placement(**{"cpu": {"cpu": "1", "node_selector": {"pool": "cpu"}}}))
    assert "evaluate" not in loops(pipeline)["fine-tuning-recipes"][1]["dag"]["tasks"]
    for executor in pipeline["deploymentSpec"]["executors"].values():
        assert "accelerator" not in executor["container"]["resources"]
    assert all(spec["nodeSelector"]["labels"] == {"pool": "cpu"} for spec in k8s.values())


def test_a_search_of_post_training_recipes_only_has_one_loop(tmp_path):
    pipeline, k8s = compiled(tmp_path, recipes=["quantize(mode=int8)"], placement=load_placement("gke"))
    assert list(loops(pipeline)) == ["post-training-recipes"]
    select = set(pipeline["root"]["dag"]["tasks"]["select"]["inputs"]["artifacts"])
    assert select == {"baseline", "cpu_candidates"}
    assert k8s == {}


def test_placement_file_errors_say_what_to_fix(tmp_path):
    bad = tmp_path / "placement.yaml"
    bad.write_text("pools:\n  accelerator:\n    accelerator: {type: nvidia.com/gpu, count: 0}\n  cpu: {cpus: 2}\n")
    with pytest.raises(KfoptError) as error:
        load_placement(bad)
    assert "pools.accelerator.accelerator.count" in str(error.value) and "pools.cpu.cpus" in str(error.value)
    with pytest.raises(KfoptError, match="one of: gke, gke-tpu"):
        load_placement(tmp_path / "missing.yaml")


def test_default_search_covers_the_techniques_and_splits_by_pool():
    search = load_search()
    labels = [r.label for r in search]
    assert {
        "quantize(mode=dynamic)",
        "quantize(mode=float16)",
        "quantize(mode=int8)",
        "quantize(mode=qat)",
        "accelerate(backend=xla)",
        "accelerate(backend=tflite)",
        "accelerate(backend=mixed_precision)",
    } <= set(labels)
    assert any(line_.startswith("prune(method=magnitude") for line_ in labels) and any(
        line_.startswith("prune(method=structured") for line_ in labels
    )
    assert sum(line_.startswith("distill(") for line_ in labels) == 2
    training, post_training = split_by_pool(search)
    assert {r.label for r in post_training} == {
        "quantize(mode=dynamic)",
        "quantize(mode=float16)",
        "quantize(mode=int8)",
        "accelerate(backend=xla)",
        "accelerate(backend=tflite)",
    }
    assert "quantize(mode=qat)" in {r.label for r in training} and "accelerate(backend=mixed_precision)" in {
        r.label for r in training
    }


def test_search_file_errors_name_the_recipe(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text("- quantize(mode=int8)\n- prune(sparsity=0.5)\n")
    with pytest.raises(
        KfoptError, match=r"recipe 2 \('prune\(sparsity=0.5\)'\): Step 'prune': unknown config key 'sparsity'"
    ):
        load_search(path)
    path.write_text("- quantize(mode=int8)\n- name: quantize(mode=int8)\n  steps: [quantize: {mode: dynamic}]\n")
    with pytest.raises(KfoptError, match="recipes 1 and 2 are both called"):
        load_search(path)
    path.write_text("{quantize: int8}\n")
    with pytest.raises(KfoptError, match="must be a non-empty YAML list"):
        load_search(path)


def test_cli_compile_and_argument_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["compile", "--output", str(tmp_path / "p.yaml"), "--placement", "gke-tpu"])
    assert result.exit_code == 0, result.output
    assert (
        "6 fine-tuning on the accelerator pool (4 x google.com/tpu)" in result.output
        and (tmp_path / "p.yaml").is_file()
    )
    for args, message in [
        (["submit", "--host", "kubeflow.local"], "--host 'kubeflow.local' is not an http(s) URL"),
        (
            ["compile", "--output", str(tmp_path / "p.yaml"), "--placement", "aks"],
            "Placement file 'aks' does not exist",
        ),
        (["run", "--search", str(tmp_path / "none.yaml")], "Search file"),
        (["run", "--model", str(tmp_path / "none.keras")], "does not exist"),
    ]:
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert [
            line_ for line_ in result.output.splitlines() if line_.startswith("error:")
        ] and message in result.output, result.output
    assert runner.invoke(main, ["run", "--objective", "speed"]).exit_code == 2


def test_importing_the_pipeline_packages_does_not_import_tensorflow():
    code = (
        "import sys, kfopt.components, kfopt.pipelines, kfopt.pipelines.placement, kfopt.recipe_search, kfopt.select, "
        "kfopt.html_report; print('tensorflow' in sys.modules)"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_a_recipe_that_cannot_be_planned_is_a_failed_candidate(tmp_path):
    record = steps.optimize_step(
        "quantize(mode=int4)", tmp_path / "baseline", tmp_path / "data", tmp_path / "candidate"
    )
    assert record["status"] == "failed" and "mode=" in record["reason"]
    assert json.loads((tmp_path / "candidate" / steps.CANDIDATE_FILE).read_text())["status"] == "failed"


def test_promote_skips_cleanly_when_mlflow_registration_is_not_installed(tmp_path, monkeypatch):
    RunResult(model="demo:mlp", data="digits", baseline=Baseline(accuracy=0.97)).save(tmp_path)
    monkeypatch.setitem(sys.modules, "kfopt.promotion", None)  # makes `from kfopt.promotion import ...` fail
    outcome = steps.promote_step(tmp_path)
    assert outcome.registered_model is None and outcome.tracking.status == "skipped"
    assert "not available" in outcome.tracking.error


def test_a_step_records_how_it_went_also_when_it_raises(tmp_path):
    with step_status("prepare", tmp_path / "ok" / STATUS_OUTPUT) as status:
        status.recipe = "quantize(mode=int8)"
    with pytest.raises(KfoptError), step_status("select", tmp_path / "user" / STATUS_OUTPUT):
        raise KfoptError("Unknown objective 'speed'.", "pass --objective size or latency.")
    with pytest.raises(RuntimeError), step_status("report", tmp_path / "bug" / STATUS_OUTPUT):
        raise RuntimeError("a bug")
    ok, user, bug = read_statuses(tmp_path)
    assert (ok.step, ok.status, ok.recipe, ok.error) == ("prepare", "ok", "quantize(mode=int8)", None)
    assert (user.step, user.status, user.user_error) == ("select", "failed", True)
    assert (user.error, user.fix) == ("Unknown objective 'speed'.", "pass --objective size or latency.")
    assert (bug.status, bug.user_error, bug.error, bug.fix) == ("failed", False, "RuntimeError: a bug", None)


def test_promote_records_an_unreachable_mlflow_in_its_status_and_the_run_record(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    RunResult(model="demo:mlp", data="digits", baseline=Baseline(accuracy=0.97)).save(tmp_path)
    with (
        pytest.raises(KfoptError, match="MLflow tracking at http://127.0.0.1:9 failed") as error,
        step_status("promote", tmp_path / STATUS_OUTPUT) as status,
    ):
        steps.promote_step(tmp_path, registered_model="digits", tracking_uri="http://127.0.0.1:9", status=status)
    recorded = StepStatus.load(tmp_path / STATUS_OUTPUT)
    assert recorded.status == "failed" and recorded.user_error and recorded.fix == error.value.fix
    tracking = recorded.tracking
    assert (
        tracking.status == "failed" and tracking.uri == "http://127.0.0.1:9" and tracking.registered_model == "digits"
    )
    assert "http://127.0.0.1:9" not in tracking.error and "Fix:" not in tracking.error  # the reason only
    assert RunResult.load(tmp_path).tracking == tracking  # `kfopt promote --from` finds the settings there


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ("succeeded.set()", 0),  # the step's outputs are written: no teardown, status 0
        ("succeeded.set()\nraise RuntimeError('writing the outputs failed')", 1),  # after the body: still a failure
        ("sys.exit(3)", 3),  # a body that did not succeed exits the ordinary way, with its own status
    ],
)
def test_a_step_process_skips_the_interpreter_teardown_only_after_success(body, status):
    from kfopt.components import status as step_status_module

    code = (
        "import atexit, sys\n"
        "from kfopt.components.status import _skip_teardown_after_success\n"
        "succeeded = _skip_teardown_after_success()\n"
        # Registered later, as MLflow's and TensorFlow's are: it runs first, and still runs.
        "atexit.register(lambda: print('later handler ran', flush=True))\n"
        # Freed by the interpreter's teardown only.
        "class Module:\n    def __del__(self):\n        print('torn down', flush=True)\n"
        "module = Module()\n" + body + "\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == status, done.stderr
    assert "later handler ran" in done.stdout
    assert ("torn down" in done.stdout) == (status == 3), done.stdout
    assert not step_status_module._in_kfp_step_process()  # never armed in pytest's (or the CLI's) own process


def test_a_bad_sensitivity_fails_before_any_step_runs(tmp_path):
    from kfopt.pipelines.runners import run_local

    with pytest.raises(KfoptError, match=r"sensitivity=1.5 is not a sparsity in \[0, 1\)"):
        run_local(["quantize(mode=dynamic)"], out=tmp_path / "run", rounds=1, sensitivity=1.5)
    assert not (tmp_path / "run").exists()  # its step runs beside round 1: checked before the pipeline starts


def test_default_registered_model_names():
    assert steps.default_registered_model("demo:mlp") == "kfopt-demo-mlp"
    assert steps.default_registered_model("/models/My_Model.keras") == "kfopt-my-model"
    assert steps.default_registered_model("gs://bucket/models/resnet/") == "kfopt-resnet"


def test_html_report_lists_every_candidate_and_embeds_both_plots():
    from kfopt.html_report import render_html

    result = {
        "model": "demo:mlp",
        "data": "digits",
        "baseline": {
            "format": "keras",
            "accuracy": 0.97,
            "accuracy_drop": 0.0,
            "gzip_bytes": 300_000,
            "latency_p50_ms": 0.4,
        },
        "candidates": [
            {
                "recipe": "a<b>",
                "status": "ok",
                "format": "tflite",
                "accuracy": 0.96,
                "accuracy_drop": 0.01,
                "gzip_bytes": 30_000,
                "latency_p50_ms": 0.002,
                "within_budget": True,
            },
            {"recipe": "broken", "status": "failed", "reason": "technique 'distill' failed: OSError: bad file"},
        ],
        "winner": "a<b>",
        "pareto": ["a<b>"],
        "selection": {"objective": "size", "metric": "gzip_bytes", "max_accuracy_drop": 0.01},
    }
    page = render_html(result)
    assert "a&lt;b&gt;" in page and "a<b>" not in page
    assert "broken" in page and "OSError: bad file" in page
    assert page.count("data:image/png;base64,") == 2


# -- real TensorFlow, real kfp.local --------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A demo:mlp baseline trained briefly, as the prepare step stores it."""
    root = tmp_path_factory.mktemp("prepared")
    record = steps.prepare_step("demo:mlp", "digits", root / "baseline", root / "data", epochs=5)
    return root, record


@pytest.mark.slow
def test_steps_measure_a_candidate_optimized_on_another_pool_like_any_other(prepared, tmp_path):
    root, baseline = prepared
    assert baseline["metrics"]["accuracy"] > 0.8 and (root / "baseline" / "model.keras").is_file()
    recipe = {
        "name": "prune-int8",
        "steps": [{"prune": {"target_sparsity": 0.5, "epochs": 1}}, {"quantize": {"mode": "int8"}}],
    }
    unmeasured = steps.optimize_step(
        recipe, root / "baseline", root / "data", tmp_path / "gpu", measure=False, position=1
    )
    assert unmeasured["status"] == "ok" and unmeasured["measured"] is False and "accuracy" not in unmeasured
    measured = steps.evaluate_step(tmp_path / "gpu", root / "baseline", root / "data", tmp_path / "cpu")
    assert measured["measured"] is True and measured["format"] == "tflite"
    assert measured["sparsity"] == pytest.approx(0.5, abs=0.05)  # facts of the source model survive the hop
    assert measured["compared_with"]["format"] == "tflite"
    steps.optimize_step("quantize(mode=dynamic)", root / "baseline", root / "data", tmp_path / "direct", position=0)
    result = steps.select_step(
        root / "baseline",
        [tmp_path / "cpu", tmp_path / "direct"],
        tmp_path / "results",
        max_accuracy_drop=0.2,
        objective="size",
    )
    assert [c["recipe"] for c in result["candidates"]] == ["quantize(mode=dynamic)", "prune-int8"]  # search order
    assert result["winner"] == min(result["candidates"], key=lambda c: c["gzip_bytes"])["recipe"]
    for candidate in result["candidates"]:  # the results folder is self-contained
        assert candidate["artifact"].startswith(str(tmp_path / "results"))


@pytest.mark.slow
def test_steps_read_the_prepared_digits_splits_without_scikit_learn(prepared):
    import numpy as np

    from kfopt.data import load_data

    root, baseline = prepared
    stored = steps.load_step_data(root / "data", baseline["input_shape"])
    loaded = load_data("digits", input_shape=tuple(baseline["input_shape"]), validation_from="train")
    for split in ("train", "validation", "test"):  # the very splits prepare used, as this model reads them
        ours, theirs = getattr(stored, split), getattr(loaded, split)
        assert np.array_equal(ours.x, theirs.x) and ours.x.dtype == theirs.x.dtype, split
        assert np.array_equal(ours.y, theirs.y), split
    code = (
        "import sys\nfrom kfopt.components import steps\n"
        f"steps.load_step_data({str(root / 'data')!r}, {baseline['input_shape']!r})\n"
        "print('sklearn' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split()[-1] == "False"


@pytest.mark.slow
def test_kfp_local_run_picks_a_winner_and_survives_a_failing_recipe(tmp_path):
    from kfopt.pipelines.runners import run_local

    corrupt = tmp_path / "student.keras"
    corrupt.write_bytes(b"not a model")
    search = [
        "quantize(mode=dynamic)",
        "quantize(mode=int8)",
        "prune(target_sparsity=0.5,epochs=1)>quantize(mode=int8)",
        f"distill(student={corrupt},epochs=1)",
    ]
    lines = []
    result = run_local(
        search,
        out=tmp_path / "run",
        epochs=5,
        max_accuracy_drop=0.05,
        rounds=1,
        max_trials=1,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        registered_model="digits-test",
        progress=lines.append,
    )
    by_label = {c["recipe"]: c for c in result["candidates"]}
    *first, refined = by_label
    assert first == search  # every recipe is a candidate, in the search's order
    # Round 2 ran what the propose step chose from round 1 (on validation): a higher sparsity.
    refined = by_label[refined]
    assert refined["round"] == 2 and refined["status"] == "ok" and "bisect prune sparsity up" in refined["why"]
    assert refined["sparsity"] > by_label[search[2]]["sparsity"] + 0.1
    assert any(line.startswith("round 2: proposing prune(") for line in lines), lines
    assert [t["round"] for t in result["search_trace"]] == [1, 1, 1, 1, 2]
    assert result["search"]["stopped"] == "all rounds done" and result["layer_sensitivity"]
    failed = by_label[search[3]]
    assert failed["status"] == "failed" and "is not a readable Keras model" in failed["reason"]
    assert all(by_label[label]["status"] == "ok" for label in search[:3])
    eligible = [c for c in result["candidates"] if c["status"] == "ok" and c["accuracy_drop"] <= 0.05]
    assert result["winner"] == min(eligible, key=lambda c: (c["gzip_bytes"], -c["accuracy"]))["recipe"]
    assert result["winner"] in result["pareto"]
    page = Path(result["report"]).read_text()
    for label in by_label:
        assert html.escape(label, quote=True) in page
    assert (tmp_path / "run" / "metrics.json").is_file() and "prepare: success" in lines
    assert result["registered_model"]["name"] == "digits-test" and result["registered_model"]["version"] is not None
    # What the promote step recorded in its status file: the MLflow parent run the CLI points at.
    assert (
        result.tracking.status == "ok" and result.tracking.run_id and result.tracking.registered_model == "digits-test"
    )


@pytest.mark.slow
def test_kfp_local_run_raises_the_error_and_fix_a_failed_step_recorded(tmp_path):
    from kfopt.pipelines.runners import run_local

    missing = tmp_path / "missing.npz"
    with pytest.raises(KfoptError) as error:
        run_local(["quantize(mode=dynamic)"], data=str(missing), out=tmp_path / "run", rounds=0, epochs=1)
    # The prepare step's own KfoptError, from its status file: message and fix as the step raised them.
    assert (
        error.value.message == f"Data file '{missing}' does not exist." and error.value.fix == "check the path or URI."
    )
    [prepare] = [s for s in read_statuses(tmp_path / "run" / "pipeline-root") if s.step == "prepare"]
    assert prepare.failed and prepare.user_error


# -- post-training recipes grouped into a few steps --------------------------------------------------
def test_post_training_recipes_share_a_few_steps_sized_by_the_pool_parallelism():
    from kfopt.pipelines.optimize_and_promote import RECIPES_PER_STEP, post_training_groups

    five = list("abcde")
    assert RECIPES_PER_STEP == 3
    assert post_training_groups(five, 2) == [["a", "c", "e"], ["b", "d"]]  # no more steps than run at once
    assert post_training_groups(five, 1) == [five]
    assert post_training_groups(five, 0) == [["a", "c", "e"], ["b", "d"]]  # no limit: 3 recipes a step
    assert post_training_groups(list("abcdefghijk"), 0) == [list("aei"), list("bfj"), list("cgk"), list("dh")]
    assert post_training_groups(five[:2], 8) == [five[:2]]  # two cheap recipes are not worth two steps
    assert post_training_groups([], 2) == []


def test_compiled_pipeline_has_fewer_optimize_tasks_with_cheap_recipes_grouped(tmp_path):
    search = load_search()
    training, post_training = split_by_pool(search)
    gke = load_placement("gke")
    grouped, _ = compiled(tmp_path, recipes=search, parallelism=2, placement=gke)
    single, _ = compiled(tmp_path, recipes=search, parallelism=2, placement=gke, group_post_training=False)
    (cheap_items, cheap_loop, _), (tuned_items, _, _) = (
        loops(grouped)["post-training-recipes"],
        loops(grouped)["fine-tuning-recipes"],
    )
    # Two steps for the post-training recipes, each a list; every recipe in exactly one of them.
    assert len(cheap_items) == 2 and sorted(sum(cheap_items, [])) == sorted(r.label for r in post_training)
    assert list(cheap_loop["dag"]["tasks"]) == ["optimize-group"]
    assert len(loops(single)["post-training-recipes"][0]) == len(post_training) == 5
    # Fine-tuning recipes stay one per step.
    assert tuned_items == loops(single)["fine-tuning-recipes"][0] == [r.label for r in training]
    select = grouped["root"]["dag"]["tasks"]["select"]["inputs"]["artifacts"]["cpu_candidates"]
    assert select["taskOutputArtifact"]["outputArtifactKey"] == "pipelinechannel--optimize-group-candidates"


@pytest.mark.slow
def test_a_failing_recipe_in_a_group_is_a_failed_candidate_and_the_others_still_run(prepared, tmp_path):
    from kfopt.plugins import Technique, hookimpl
    from kfopt.plugins.manager import registry

    class Broken(Technique):
        name = "broken"
        kind = "quantize"
        accepts = {"keras"}
        produces = "tflite"

        def apply(self, model, config, ctx):
            raise RuntimeError("this technique always breaks")

    class Plugin:
        @hookimpl
        def kfopt_register_techniques(self, register):
            register(Broken())

    root, _ = prepared
    items = [
        {"position": 4, "recipe": "quantize(mode=dynamic)"},
        {"position": 5, "recipe": {"name": "broken", "steps": [{"broken": {}}]}},
        {"position": 6, "recipe": "quantize(mode=float16)"},
    ]
    found = steps.optimize_group_step(
        items, root / "baseline", root / "data", tmp_path / "group", registry=registry([Plugin()])
    )
    assert [(c.recipe, c.status) for c in found] == [
        ("quantize(mode=dynamic)", "ok"),
        ("broken", "failed"),
        ("quantize(mode=float16)", "ok"),
    ]
    assert "this technique always breaks" in found[1].reason
    # select reads every recipe of the group as a candidate of its own, in the search's order.
    single = steps.optimize_step("quantize(mode=int8)", root / "baseline", root / "data", tmp_path / "one", position=0)
    result = steps.select_step(root / "baseline", [tmp_path / "group", tmp_path / "one"], tmp_path / "results")
    assert [(c.recipe, c.status, c.position) for c in result.candidates] == [
        ("quantize(mode=int8)", "ok", 0),
        ("quantize(mode=dynamic)", "ok", 4),
        ("broken", "failed", 5),
        ("quantize(mode=float16)", "ok", 6),
    ]
    assert single.status == "ok" and all(Path(c.artifact).is_file() for c in result.candidates if c.ok)
    # A group whose step died before a recipe finished still names that recipe.
    (tmp_path / "group" / "01" / steps.CANDIDATE_FILE).unlink()
    again = steps.select_step(root / "baseline", [tmp_path / "group"], tmp_path / "results-2")
    assert [(c.recipe, c.status) for c in again.candidates][1] == ("broken", "failed")


@pytest.mark.slow
def test_grouped_steps_in_kfp_local_give_the_same_candidates_as_one_step_per_recipe(tmp_path):
    from kfopt.pipelines.runners import run_local

    search = [
        "quantize(mode=dynamic)",
        "quantize(mode=float16)",
        "accelerate(backend=tensorrt)",  # no TensorRT here: skipped, inside a group like anywhere else
        "quantize(mode=int8)",
    ]
    runs = {}
    for grouped in (True, False):
        out = tmp_path / ("grouped" if grouped else "single")
        runs[grouped] = run_local(
            search,
            out=out,
            epochs=3,
            rounds=0,
            max_accuracy_drop="5%",
            group_post_training=grouped,
            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        )
        optimize_steps = [s.step for s in read_statuses(out / "pipeline-root") if s.step.startswith("optimize")]
        assert optimize_steps == (["optimize-group"] * 2 if grouped else ["optimize"] * 4)
    grouped, single = runs[True], runs[False]
    assert [(c.recipe, c.status) for c in grouped.candidates] == [(c.recipe, c.status) for c in single.candidates]
    assert [c.recipe for c in grouped.candidates] == search
    assert [c.status for c in grouped.candidates] == ["ok", "ok", "skipped", "ok"]
    for ours, theirs in zip(grouped.candidates, single.candidates):
        if ours.ok:
            assert ours.format == theirs.format
            assert ours.accuracy == pytest.approx(theirs.accuracy, abs=0.01), ours.recipe
            assert ours.gzip_bytes == pytest.approx(theirs.gzip_bytes, rel=0.02), ours.recipe
    assert grouped.winner == single.winner and grouped.selection["max_accuracy_drop"] == "5%"


def test_without_placement_one_loop_runs_fine_tuning_recipes_alone_and_the_cheap_ones_grouped(tmp_path):
    pipeline, _ = compiled(tmp_path, recipes=SEARCH, parallelism=3)
    found = loops(pipeline)
    assert list(found) == ["recipes"]  # kfp.local: one machine, one loop sharing its parallelism
    items, loop, task = found["recipes"]
    assert items == [[SEARCH[1]], [SEARCH[3]], [SEARCH[0], SEARCH[2]]]
    assert list(loop["dag"]["tasks"]) == ["optimize-group"] and task["iteratorPolicy"]["parallelismLimit"] == 3
    select = pipeline["root"]["dag"]["tasks"]["select"]["inputs"]["artifacts"]
    assert set(select) == {"baseline", "cpu_candidates"}


def test_without_a_free_slot_cheap_recipes_ride_along_with_fine_tuning_ones_instead_of_a_step_of_their_own():
    from kfopt.pipelines.optimize_and_promote import one_pool_steps

    # The built-in space on kfp.local (parallelism 2): 6 fine-tuning recipes fill both slots, so the 5
    # post-training ones join the first steps (each still holds one fine-tuning recipe) and no 7th step starts.
    assert one_pool_steps(list("ABCDEF"), list("abcde"), 2) == [
        ["A", "a"],
        ["B", "b"],
        ["C", "c"],
        ["D", "d"],
        ["E", "e"],
        ["F"],
    ]
    assert one_pool_steps(list("AB"), list("abcde"), 3) == [["A"], ["B"], list("abcde")]  # a free slot: grouped
    assert one_pool_steps(list("AB"), list("abcde"), 0) == [["A"], ["B"], list("ace"), list("bd")]
    assert one_pool_steps([], list("abcde"), 2) == [list("ace"), list("bd")]
    assert one_pool_steps(list("AB"), [], 2) == [["A"], ["B"]]


def test_propose_stops_when_the_last_round_did_not_gain_and_until_no_gain(tmp_path):
    baseline = baseline_record(tmp_path / "baseline")
    prune = [
        {"technique": "prune", "config": {"method": "magnitude", "target_sparsity": 0.5, "epochs": 1}},
        {"technique": "quantize", "config": {"mode": "int8"}},
    ]
    for until_no_gain in (False, True):
        root = tmp_path / str(until_no_gain)
        plan = root / "plan"
        plan.mkdir(parents=True)
        settings = search_settings(
            rounds=3,
            max_trials=1,
            max_time=None,
            objective="size",
            max_accuracy_drop=0.01,
            target=None,
            stop_when_met=False,
            until_no_gain=until_no_gain,
        )
        (plan / steps.SEARCH_FILE).write_text(json.dumps({"settings": settings, "layer_sensitivity": []}))
        first = [_candidate(root / "c1", "prune-0.5", prune, 0.0, 20000, position=0)]
        steps.select_step(baseline, first, root / "r1", max_accuracy_drop=0.01, number=1, search_dir=plan)
        # Round 2 gained nothing (its one candidate is no smaller): round 3 is not worth running.
        same = _candidate(root / "c2", "prune-0.6", prune, 0.0, 20000, position=0, round=2, why="bisect")
        steps.select_step(
            baseline,
            [same],
            root / "r2",
            max_accuracy_drop=0.01,
            number=2,
            previous_dir=root / "r1",
            search_dir=plan,
        )
        items = [json.loads(i) for i in steps.propose_step(root / "r2", plan, 3)]
        if until_no_gain:
            (stop,) = items
            assert stop["round"] == 3 and "round 2 improved the best candidate" in stop[steps.STOPPED]
        else:
            assert items and steps.STOPPED not in items[0] and items[0]["round"] == 3


def _plan_items(tasks) -> list:
    """The round-1 items the compiled plan step hands its loop (a constant list of JSON strings)."""
    return [json.loads(i) for i in tasks["plan-search"]["inputs"]["parameters"]["items"]["runtimeValue"]["constant"]]


@pytest.mark.parametrize("rounds", [0, 1])
def test_the_built_in_search_adds_round_one_channel_pruning_with_or_without_refinement_rounds(tmp_path, rounds):
    built_in = yaml.safe_load(Path(compile_pipeline(tmp_path / "b.yaml", None, rounds=rounds)).read_text())
    tasks = built_in["root"]["dag"]["tasks"]
    plan = tasks["plan-search"]["inputs"]["parameters"]
    assert plan["channels_at"]["runtimeValue"]["constant"] == len(load_search())
    assert plan["objective"]["componentInputParameter"] == "objective"  # decided at run time, on the run's model
    # The round-1 loop runs over the plan step's items: the search space's own, then any channel recipe.
    (loop,) = [task for task in tasks.values() if task["taskInfo"]["name"] == "recipes"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--plan-search-Output"
    assert sorted(i["recipe"]["name"] for group in _plan_items(tasks) for i in group) == sorted(
        r.label for r in load_search()
    )
    assert ("layer-sensitivity" in tasks) == bool(rounds)
    custom = yaml.safe_load(
        Path(compile_pipeline(tmp_path / "c.yaml", ["quantize(mode=int8)"], rounds=rounds)).read_text()
    )
    tasks = custom["root"]["dag"]["tasks"]
    assert ("plan-search" in tasks) == bool(rounds)
    if rounds:
        assert tasks["plan-search"]["inputs"]["parameters"]["channels_at"]["runtimeValue"]["constant"] == -1
    (loop,) = [task for task in tasks.values() if task["taskInfo"]["name"] == "recipes"]
    assert "raw" in loop["parameterIterator"]["items"]  # a custom space's round 1 is fixed when compiled


@pytest.mark.parametrize("rounds", [0, 2])
def test_no_loop_starts_a_no_op_pod_on_the_accelerator_pool(tmp_path, rounds):
    pipeline, k8s = compiled(tmp_path, recipes=None, rounds=rounds, placement=load_placement("gke"), parallelism=2)
    tasks = pipeline["root"]["dag"]["tasks"]
    loops_ = {task["taskInfo"]["name"]: task for task in tasks.values() if "parameterIterator" in task}
    # Round-1 channel pruning rides in the fine-tuning loop (the plan step adds it when objective and model call
    # for it); no loop exists for it alone, so none runs a no-op item on the accelerator pool.
    assert set(loops_) == {"fine-tuning-recipes", "post-training-recipes"} | {
        f"round-{n}-recipes" for n in range(2, rounds + 2)
    }
    fine_tuning = loops_["fine-tuning-recipes"]
    assert fine_tuning["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--plan-search-Output"
    training, _ = split_by_pool(load_search())
    assert [i["recipe"]["name"] for i in _plan_items(tasks)] == [r.label for r in training]
    # The plan step and the layer sensitivity run on the CPU pool; only optimize steps of fine-tuning loops on GPUs.
    for name in ("plan-search", "layer-sensitivity", "select", "report", "promote"):
        if name in tasks:
            assert executor_of(pipeline, tasks[name]["componentRef"]["name"]) not in k8s, name
    accelerated = {
        name
        for name, task in loops_.items()
        for inner in pipeline["components"][task["componentRef"]["name"]]["dag"]["tasks"].values()
        if executor_of(pipeline, inner["componentRef"]["name"]) in k8s
    }
    assert accelerated == set(loops_) - {"post-training-recipes"}
    assert "channel_candidates" not in tasks["select"]["inputs"]["artifacts"]


@pytest.mark.slow
def test_kfp_local_run_adds_round_one_channel_pruning_for_latency_on_a_conv_model_without_refinement(tmp_path):
    from kfopt.pipelines.runners import run_local

    result = run_local(
        ["quantize(mode=dynamic)"],
        model="demo:cnn",
        out=tmp_path / "run",
        epochs=2,
        objective="latency",
        max_accuracy_drop=0.5,
        rounds=0,  # round 1 is the same with or without refinement rounds
        channels=True,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    assert [c["recipe"] for c in result["candidates"]][0] == "quantize(mode=dynamic)"
    channel = [c for c in result["candidates"] if "method=channels" in c["recipe"]]
    assert len(channel) == 1 and "channel pruning for latency" in channel[0]["why"], result["candidates"]
    assert channel[0]["round"] == 1 and channel[0]["status"] == "ok", channel[0].get("reason")
    assert result["best_same_architecture"] is not None


def test_promote_declares_the_winners_confusion_matrix_and_select_needs_no_data(tmp_path):
    pipeline = yaml.safe_load(
        Path(compile_pipeline(tmp_path / "p.yaml", ["quantize(mode=int8)"], rounds=1)).read_text()
    )
    components = pipeline["components"]
    tasks = pipeline["root"]["dag"]["tasks"]
    promote = components[tasks["promote"]["componentRef"]["name"]]
    confusion = promote["outputDefinitions"]["artifacts"]["confusion"]["artifactType"]
    assert confusion["schemaTitle"] == "system.ClassificationMetrics"
    # Promote runs the winner on the prepared data (it loads TensorFlow for MLflow anyway); select and report,
    # which never run a model, get no data, so their processes never import TensorFlow.
    assert tasks["promote"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"]["producerTask"] == "prepare"
    for name in ("select", "select-2", "report"):
        assert "dataset" not in tasks[name]["inputs"]["artifacts"], name


def test_select_and_report_steps_run_without_tensorflow(tmp_path):
    """select, report and a size-objective plan are cheap steps: a fresh process for each must not pay for TensorFlow."""
    code = f"""
import json, sys
from pathlib import Path
from kfopt.components import steps
base = Path({str(tmp_path)!r}) / "baseline"
base.mkdir()
(base / steps.BASELINE_MODEL).write_bytes(b"keras")
(base / steps.BASELINE_FILE).write_text(json.dumps(
    {{"model": "demo:mlp", "data": "digits", "seed": 0, "input_shape": [64], "metrics": {{"accuracy": 0.97}}}}
))
steps.plan_search_step(base, base.parent / "plan", rounds=0, objective="size", channels_at=3)
steps.select_step(base, [], base.parent / "results", max_accuracy_drop=0.01)
steps.report_step(base.parent / "results", base.parent / "report.html", base.parent / "summary.md")
print(json.dumps(sorted(m for m in ("tensorflow", "tf_keras", "sklearn") if m in sys.modules)))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == []


@pytest.mark.slow
def test_the_winners_confusion_matrix_counts_every_test_sample(prepared, tmp_path):
    root, baseline = prepared
    steps.optimize_group_step(
        [{"position": 0, "recipe": "quantize(mode=dynamic)"}], root / "baseline", root / "data", tmp_path / "group"
    )
    result = steps.select_step(root / "baseline", [tmp_path / "group"], tmp_path / "results", max_accuracy_drop=0.2)
    assert result.winner == "quantize(mode=dynamic)"
    matrix = steps.confusion_step(tmp_path / "results", root / "baseline", root / "data")
    assert matrix.recipe == result.winner and matrix.categories == [str(c) for c in range(10)]
    assert sum(map(sum, matrix.matrix)) == baseline["splits"]["test"]
    correct = sum(matrix.matrix[c][c] for c in range(10))
    assert correct / baseline["splits"]["test"] == pytest.approx(result.winning_candidate.accuracy)
    # Rows are the true classes (a transposed matrix has the same total and diagonal, not the same rows).
    import numpy as np

    truth = steps.load_step_data(root / "data", baseline["input_shape"]).test.y
    assert [sum(row) for row in matrix.matrix] == np.bincount(np.asarray(truth).astype(int), minlength=10).tolist()
