"""The optimize-and-promote pipeline: prepare -> optimize every recipe in parallel -> select -> report, promote.

The recipes of round 1 are fixed when the pipeline is built (compile time):
each recipe's node pool depends on whether it fine-tunes, and a
``dsl.ParallelFor`` runs every iteration with the same resources, so the search
is split into two loops, fine-tuning recipes on the accelerator pool and
post-training recipes on the CPU pool. Everything about the run (model, data,
budget, objective, search bounds, MLflow) stays a runtime parameter. Models and
data travel as artifacts.

Fine-tuning recipes run one per step (each is minutes of work and may need its
own accelerator). Post-training recipes take seconds, less than a step's start
(a fresh Python that imports TensorFlow), so they run in a few grouped
``optimize-group`` steps (:func:`post_training_groups`): no more steps than the
pool's parallelism, each with at least :data:`RECIPES_PER_STEP` recipes where
there are enough. A grouped step writes one candidate record per recipe, and a
failing recipe in it is a failed candidate. Without placement (``kfp.local``)
every step runs on the same machine, so there is one loop: each fine-tuning
recipe a step of its own, the post-training ones grouped into the slots of
``parallelism`` the fine-tuning ones leave, or riding along after a
fine-tuning recipe when they leave none (:func:`one_pool_steps`).

Every step is a fresh process, and most import TensorFlow (seconds each), so
only the steps that run a model do: fingerprint, the search plan (unless it
looks at a model for channel pruning), select and report never import it; the
winner's confusion matrix is logged by the promote step, which loads
TensorFlow for MLflow anyway.

Caching keys on content: a ``fingerprint`` step that is never cached digests
the model and data (:mod:`kfopt.components.fingerprint`) and ``prepare`` takes
the digest as an input, so a model replaced in place gets a new cache key, and
so does every step downstream of the new baseline.

With ``rounds`` > 0 the search refines itself (KFP has no recursion, so each
round is its own part of the graph): a ``layer-sensitivity`` step measures the
baseline beside round 1, a ``propose`` step reads every candidate so far and
the layer sensitivity, and a ``ParallelFor`` over its output runs the proposed
recipes on the accelerator pool (refinements fine-tune: pruning, distillation,
QAT); that round's ``select`` merges them with the earlier rounds' results.
The last select's results feed the report and promotion; promote logs the
winner's confusion matrix (a classifier's) as ``ClassificationMetrics``. With
``until_no_gain`` the rounds stop once one does not gain (the later ones are
no-op steps), as ``kfopt search`` does.

With the built-in search space, round 1 also gets channel pruning for
objective latency or mix on a conv model, as ``kfopt search`` adds it, with or
without refinement rounds: objective and model are run parameters, so a
``search plan`` step decides (with the in-process search's own function) and
hands the round-1 loop that runs fine-tuning recipes its items, its own plus
the channel recipe. No loop exists just for it, so none starts a no-op pod on
the accelerator pool when there is nothing to prune.

Every step also writes a ``status`` output (:mod:`kfopt.components.status`),
so a step's return value is ``task.outputs["Output"]``, not ``task.output``.
"""

# No `from __future__ import annotations`: KFP reads the pipeline's real annotation objects.
import json
import math
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Markdown

from kfopt.components import DEFAULT_IMAGE
from kfopt.components.ops import build_components
from kfopt.errors import KfoptError
from kfopt.recipe_search import SearchRecipe, load_search, split_by_pool

from .placement import Placement, apply_pool

PIPELINE_NAME = "kfopt-optimize-and-promote"
DESCRIPTION = (
    "Optimize a Keras model with every recipe of a search space, measure all candidates alike, pick the "
    "best within the accuracy budget, report the trade-offs, and register/promote it in MLflow."
)

#: Retries of the MLflow step: the tracking server may be briefly unreachable.
PROMOTE_RETRIES = 3
#: Retries of the optimize and evaluate steps: a preemptible (spot) GPU node may go away under them.
STEP_RETRIES = 2

#: The image's non-root user (Dockerfile: `useradd --uid 1000 kfopt`); step containers run as it on a cluster.
STEP_USER = 1000

#: Fewest post-training recipes a grouped step gets where there are enough: a step's start (Python,
#: kfp and TensorFlow imports, loading the baseline and data, converting its references) costs
#: about as much as three such recipes on the digits demo.
RECIPES_PER_STEP = 3

#: Keys of an MLflow login Secret, and the variables MLflow's client reads them from (basic auth).
MLFLOW_SECRET_KEYS = {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"}


def build_pipeline(
    recipes: "str | list | None" = None,
    *,
    rounds: int = 1,
    until_no_gain: bool = False,
    channels: "bool | None" = None,
    image: str = DEFAULT_IMAGE,
    accelerator_image: "str | None" = None,
    placement: "Placement | None" = None,
    parallelism: int = 0,
    group_post_training: bool = True,
    promote_retries: int = PROMOTE_RETRIES,
    step_retries: int = STEP_RETRIES,
    registry=None,
    mlflow_secret: "str | None" = None,
    run_as_user: "int | None" = None,
):
    """Build the pipeline for a search space.

    Args:
        recipes: A search YAML file, a list of recipes (inline strings, mappings or
            :class:`~kfopt.recipe_search.SearchRecipe`), or None for the built-in search.
        rounds: Refinement rounds after round 1 (see the module docstring); 0 = round 1 only.
        until_no_gain: Refine while a round gains, ``rounds`` being the most (as ``kfopt search`` without
            ``--rounds``); False: every round runs unless nothing is left to refine.
        channels: Let the search plan add channel pruning to round 1 for objective latency or mix on a conv model,
            as ``kfopt search`` does for its built-in space (with or without refinement rounds); None: when
            ``recipes`` is the built-in search space.
        image: Image every step runs in.
        accelerator_image: Image of the fine-tuning steps (e.g. the GPU variant); default ``image``.
        placement: Node pools; None leaves resources unset (``kfp.local``, where they have no effect).
            With an accelerator pool, candidates optimized there are measured by a separate
            evaluate step on the CPU pool, so every candidate is measured on the same kind of node.
        parallelism: Most recipes optimized at once per pool (0 = no limit); also the most grouped steps
            the post-training recipes are split into.
        group_post_training: Run post-training recipes in a few grouped steps (see the module docstring);
            False: one step per recipe.
        promote_retries: Retries of the MLflow step (with exponential backoff from 30 s).
        step_retries: Retries of every optimize and evaluate step (with exponential backoff from 60 s), for
            preemptible nodes; 0 = none.
        registry: Techniques to plan with (default: the installed plugins).
        mlflow_secret: Kubernetes Secret whose ``username``/``password`` the steps that talk to MLflow
            (those taking a ``tracking_uri``) get as MLFLOW_TRACKING_USERNAME/PASSWORD (kfp-kubernetes).
        run_as_user: UID (and GID) every step container runs as, with runAsNonRoot; None leaves it to the image.

    Returns:
        The ``@dsl.pipeline`` function ``optimize_and_promote``.
    """
    if rounds < 0:
        raise KfoptError(
            f"rounds={rounds} is negative.", "pass 0 for the search space only, or 1, 2, ... refinement rounds."
        )
    if step_retries < 0 or promote_retries < 0:
        raise KfoptError(
            f"retries={min(step_retries, promote_retries)} is negative.", "pass 0 (no retries) or a positive count."
        )
    search = recipes if _planned(recipes) else load_search(recipes, registry)
    if channels is None:
        channels = is_built_in(search, registry)
    positions = {id(r): i for i, r in enumerate(search)}
    training, post_training = split_by_pool(search)
    ops = build_components(image)
    training_ops = build_components(accelerator_image or image)
    measure_apart = placement is not None and placement.accelerator is not None

    def place(task, trains: bool):
        if placement is not None:
            apply_pool(task, placement.pool_for(trains))
        return _secure(task, mlflow_secret, run_as_user)

    def retried(task):
        """An optimize or evaluate task: retried with backoff (a preempted node fails the pod, not the recipe)."""
        if step_retries:
            task.set_retry(step_retries, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="900s")
        return task

    def item(recipe: SearchRecipe) -> dict:
        return {"position": positions[id(recipe)], "recipe": recipe.to_dict()}

    def items(group: list[SearchRecipe]) -> list[str]:
        # JSON strings: kfp.local and the compiler handle string loop items most reliably.
        return [json.dumps(item(r)) for r in group]

    def group_items(group: list[SearchRecipe]) -> list[str]:
        return [json.dumps([item(r) for r in part]) for part in post_training_groups(group, parallelism)]

    # Without placement (kfp.local, or a cluster's default pool) and one image, every recipe runs alike.
    one_pool = placement is None and (accelerator_image or image) == image
    one_loop_items = [
        json.dumps([item(r) for r in part]) for part in one_pool_steps(training, post_training, parallelism)
    ]

    outputs = NamedTuple(  # noqa: UP014
        "Outputs",
        [
            ("results", Artifact),
            ("report", HTML),
            ("summary", Markdown),
            ("registered_model", str),
            ("version", str),
            ("promoted", bool),
            ("alias", str),
        ],
    )

    @dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)
    def optimize_and_promote(
        model: str = "demo:mlp",
        data: str = "digits",
        max_accuracy_drop: str = "0.01",
        objective: str = "size",
        metric: str = "",
        output: str = "",
        registered_model: str = "",
        tracking_uri: str = "",
        experiment: str = "kfopt",
        seed: int = 0,
        epochs: int = 40,
        unsafe: bool = False,
        max_trials: int = 4,
        max_time: float = 0.0,
        target: float = 0.0,
        stop_when_met: bool = False,
        sensitivity: float = 0.9,
    ) -> outputs:
        """Optimize a model with every recipe of the search, select the best within the budget, register it.

        Args:
            model: A .keras/.h5 file, a SavedModel directory, a gs:// or s3:// URI of one, or demo:mlp / demo:cnn.
            data: An .npz file or URI (x_train, y_train, x_test, y_test; optional x_val, y_val),
                'py:module:function' (run anew every time unless its module defines kfopt_fingerprint(), a string
                that changes when its data does), or 'digits'.
            max_accuracy_drop: Largest drop of the budgeted metric a winner may have: absolute ('0.01', one
                point of accuracy) or relative to the baseline's value ('1%').
            objective: What the winner minimises within the budget: 'size' (gzip bytes), 'latency' (p50 ms),
                or 'mix' / 'mix:W' (a weighted mix).
            metric: The budgeted metric (accuracy, binary_accuracy, top_k_accuracy, macro_f1, auc, mae, rmse, or
                a plugin's); empty: the task's default.
            output: For a model with several outputs, the output the metric is computed on and fine-tuning
                trains on, by name or index; empty: the first.
            registered_model: MLflow registered model name; empty: 'kfopt-' + the model's name.
            tracking_uri: MLflow tracking URI; empty: MLFLOW_TRACKING_URI of the step, else a local store.
            experiment: MLflow experiment of the run.
            seed: Seed for data splits, training and calibration.
            epochs: Epochs to train a demo baseline (early stopping on validation).
            unsafe: Allow models with Lambda layers (they run arbitrary code when loaded).
            max_trials: Most recipes per refinement round.
            max_time: Optimization seconds (summed over candidates) after which no refinement round starts;
                0 = no limit.
            target: compression_ratio (objective size) or speedup (latency) to reach; 0 = none.
            stop_when_met: Stop refining once a candidate within the budget reaches the target.
            sensitivity: Sparsity each layer alone is pruned to when measuring layer sensitivity; 0 = skip.
        """
        # Never cached: it looks at the model and data now, and prepare's cache key includes what it found,
        # so a model or data file replaced in place is measured anew (and every step after it runs again).
        content = ops.fingerprint(model=model, data=data)
        place(content.set_display_name("fingerprint model and data").set_caching_options(False), trains=False)
        prepare = ops.prepare(
            model=model,
            data=data,
            seed=seed,
            epochs=epochs,
            unsafe=unsafe,
            metric=metric,
            output=output,
            fingerprint=content.outputs["Output"],
        )
        place(prepare.set_display_name("prepare baseline").set_caching_options(True), trains=False)
        baseline, dataset = prepare.outputs["baseline"], prepare.outputs["dataset"]

        grouped_loop = one_pool and group_post_training
        # The round-1 loop channel pruning joins (it fine-tunes): the one loop, or the fine-tuning one.
        static_items = one_loop_items if grouped_loop else items(training)
        search_plan = round_one = None
        if rounds or channels:
            # Round 1 is the same with or without refinement rounds: the plan step decides on channel pruning
            # (objective and model are run parameters) and hands the loop its items, so no loop of its own
            # ever starts a no-op step on the accelerator pool.
            plan = ops.plan_search(
                rounds=rounds,
                max_trials=max_trials,
                max_time=max_time,
                target=target,
                stop_when_met=stop_when_met,
                max_accuracy_drop=max_accuracy_drop,
                objective=objective,
                baseline=baseline,
                items=static_items if channels else [],
                until_no_gain=until_no_gain,
                channels_at=len(search) if channels else -1,
                groups=grouped_loop,
            )
            place(plan.set_display_name("search plan").set_caching_options(True), trains=False)
            if channels:
                round_one = plan.outputs["Output"]
            if rounds:
                # Beside round 1, not before it: only the refinement rounds use it, and on a big model it is slow.
                sensitive = ops.layer_sensitivity(
                    sensitivity=sensitivity, seed=seed, baseline=baseline, dataset=dataset, plan=plan.outputs["search"]
                )
                place(sensitive.set_display_name("layer sensitivity").set_caching_options(True), trains=False)
                search_plan = sensitive.outputs["search"]

        def optimize_on_accelerator(loop_items, name: str):
            """A ParallelFor of fine-tuning recipes; returns the task whose 'candidate' is measured."""
            with dsl.ParallelFor(loop_items, name=name, parallelism=parallelism) as item:
                optimize = training_ops.optimize(
                    recipe=item, seed=seed, measure=not measure_apart, baseline=baseline, dataset=dataset
                )
                place(
                    retried(
                        optimize.set_display_name("optimize (fine-tuning, accelerator pool)").set_caching_options(True)
                    ),
                    trains=True,
                )
                candidate = optimize
                if measure_apart:
                    candidate = ops.evaluate(
                        seed=seed, unmeasured=optimize.outputs["candidate"], baseline=baseline, dataset=dataset
                    )
                    place(
                        retried(candidate.set_display_name("evaluate (CPU pool)").set_caching_options(True)),
                        trains=False,
                    )
            return candidate

        def select_round(number: int, previous, **collected):
            select = ops.select(
                max_accuracy_drop=max_accuracy_drop,
                objective=objective,
                baseline=baseline,
                number=number,
                **collected,
                **({"previous": previous} if previous is not None else {}),
                **({"search": search_plan} if search_plan is not None else {}),
            )
            place(
                select.set_display_name(
                    f"select winner (round {number})" if rounds else "select winner"
                ).set_caching_options(True),
                trains=False,
            )
            return select.outputs["results"]

        collected = {}
        if grouped_loop:
            # Every step runs on one machine (kfp.local) or one pool: one loop, so fine-tuning recipes and the
            # groups of post-training ones share its parallelism instead of waiting for each other's loop.
            loop_items = one_loop_items if round_one is None else round_one
            with dsl.ParallelFor(loop_items, name="recipes", parallelism=parallelism) as group:
                optimize = ops.optimize_group(recipes=group, seed=seed, baseline=baseline, dataset=dataset)
                place(retried(optimize.set_display_name("optimize recipes").set_caching_options(True)), trains=False)
            collected["cpu_candidates"] = dsl.Collected(optimize.outputs["candidates"])
        else:
            if training or round_one is not None:
                candidate = optimize_on_accelerator(
                    items(training) if round_one is None else round_one, "fine-tuning-recipes"
                )
                collected["accelerator_candidates"] = dsl.Collected(candidate.outputs["candidate"])
            if post_training and group_post_training:
                with dsl.ParallelFor(
                    group_items(post_training), name="post-training-recipes", parallelism=parallelism
                ) as group:
                    optimize = ops.optimize_group(recipes=group, seed=seed, baseline=baseline, dataset=dataset)
                    place(
                        retried(
                            optimize.set_display_name("optimize post-training recipes (CPU pool)").set_caching_options(
                                True
                            )
                        ),
                        trains=False,
                    )
                collected["cpu_candidates"] = dsl.Collected(optimize.outputs["candidates"])
            elif post_training:
                with dsl.ParallelFor(
                    items(post_training), name="post-training-recipes", parallelism=parallelism
                ) as one:
                    optimize = ops.optimize(recipe=one, seed=seed, measure=True, baseline=baseline, dataset=dataset)
                    place(
                        retried(
                            optimize.set_display_name("optimize (post-training, CPU pool)").set_caching_options(True)
                        ),
                        trains=False,
                    )
                collected["cpu_candidates"] = dsl.Collected(optimize.outputs["candidate"])
        results = select_round(1, None, **collected)

        for number in range(2, rounds + 2):
            propose = ops.propose(number=number, results=results, search=search_plan)
            place(propose.set_display_name(f"propose round {number}").set_caching_options(True), trains=False)
            candidate = optimize_on_accelerator(propose.outputs["Output"], f"round-{number}-recipes")
            results = select_round(
                number, results, accelerator_candidates=dsl.Collected(candidate.outputs["candidate"])
            )

        report = ops.report(results=results)
        place(report.set_display_name("HTML report").set_caching_options(True), trains=False)
        promote = ops.promote(
            registered_model=registered_model,
            tracking_uri=tracking_uri,
            max_accuracy_drop=max_accuracy_drop,
            objective=objective,
            experiment=experiment,
            results=results,
            baseline=baseline,
            dataset=dataset,
            seed=seed,
            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )
        # Registration has side effects (a new model version), so it is never cached.
        promote.set_display_name("register and promote (MLflow)").set_caching_options(False)
        if promote_retries:
            promote.set_retry(promote_retries, backoff_duration="30s", backoff_factor=2.0, backoff_max_duration="600s")
        place(promote, trains=False)
        return outputs(
            results=results,
            report=report.outputs["report"],
            summary=report.outputs["summary"],
            registered_model=promote.outputs["registered_model"],
            version=promote.outputs["version"],
            promoted=promote.outputs["promoted"],
            alias=promote.outputs["alias"],
        )

    return optimize_and_promote


def is_built_in(search: list[SearchRecipe], registry=None) -> bool:
    """Whether ``search`` is the built-in search space (``kfopt run`` passes it planned): the recipes ``kfopt
    search`` adds round-1 channel pruning to."""
    return [r.recipe.label for r in search] == [r.recipe.label for r in load_search(None, registry)]


def one_pool_steps(training: list, post_training: list, parallelism: int = 0) -> list[list]:
    """The recipes of each step of the one loop a pipeline without placement runs (kfp.local, one pool).

    Each fine-tuning recipe gets a step of its own. The post-training ones are
    grouped (:func:`post_training_groups`) into the slots of ``parallelism`` the
    fine-tuning steps leave free; when they leave none, they ride along after
    a fine-tuning recipe (dealt round-robin from the first step, which starts first), since a step of
    their own would start one more TensorFlow process and wait for a slot anyway.
    """
    steps = [[recipe] for recipe in training]
    free = parallelism - len(training) if parallelism > 0 else 0
    if not post_training:
        return steps
    if parallelism <= 0 or free > 0 or not steps:
        return steps + post_training_groups(post_training, max(free, 1) if parallelism > 0 else 0)
    for index, recipe in enumerate(post_training):
        steps[index % len(steps)].append(recipe)
    return steps


def post_training_groups(recipes: list, parallelism: int = 0) -> list[list]:
    """Split post-training recipes into the groups that share a step.

    At most ``parallelism`` groups (0 = no limit), each of at least
    :data:`RECIPES_PER_STEP` recipes where there are enough; recipes are dealt
    round-robin, so every group gets a mix of cheap and dearer ones and keeps the search's order.
    """
    if not recipes:
        return []
    count = math.ceil(len(recipes) / RECIPES_PER_STEP)
    if parallelism > 0:
        count = min(count, parallelism)
    return [recipes[index::count] for index in range(count)]


def _secure(task, mlflow_secret: "str | None", run_as_user: "int | None"):
    """The MLflow login for a step that talks to MLflow (it takes a tracking_uri), and a non-root user."""
    if not mlflow_secret and run_as_user is None:
        return task
    from kfp import kubernetes

    if mlflow_secret and "tracking_uri" in (task.component_spec.inputs or {}):
        kubernetes.use_secret_as_env(task, secret_name=mlflow_secret, secret_key_to_env=MLFLOW_SECRET_KEYS)
    if run_as_user is not None:
        kubernetes.set_security_context(task, run_as_user=run_as_user, run_as_group=run_as_user, run_as_non_root=True)
    return task


def _planned(recipes) -> bool:
    return isinstance(recipes, list) and bool(recipes) and all(isinstance(r, SearchRecipe) for r in recipes)


def compile_pipeline(output, recipes=None, **options) -> str:
    """Compile the pipeline (options as :func:`build_pipeline`) to KFP IR YAML at ``output``."""
    from kfp import compiler

    pipeline = build_pipeline(recipes, **options)
    compiler.Compiler().compile(pipeline, package_path=str(output))
    return str(output)
