"""The cluster plugin, tested with the kit kfopt ships (kfopt.testing fixtures and check_technique)."""

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution

import kfopt_cluster
import numpy as np
import pytest
from kfopt_cluster import Cluster

from kfopt.plugins import weight_sparsity
from kfopt.testing import check_technique


def kernels(keras_model):
    return [w for w in keras_model.get_weights() if w.ndim >= 2]


def zero_smallest(weights, fraction):
    """Each kernel with its ``fraction`` smallest-magnitude weights set to zero, as magnitude pruning leaves it."""
    return [np.where(np.abs(w) < np.quantile(np.abs(w), fraction), 0, w) if w.ndim >= 2 else w for w in weights]


def test_meets_the_plugin_contract(tmp_path):
    check = check_technique(
        Cluster(),
        {"clusters": 8, "epochs": 1},
        bad_configs=[{"clusters": 1}, {"init": "nearest"}, {"epochs": -1}, {"learning_rate": 0}],
        max_accuracy_drop=0.05,
        workdir=tmp_path,
    )
    assert check.metrics["compression_ratio"] > 1.5  # 8 shared values per kernel gzip far better than floats
    assert check.result.info["clusters"] == 8


@pytest.mark.parametrize("init", ["linear", "kmeans_plus_plus", "density_based", "random"])
def test_each_kernel_keeps_at_most_clusters_values(init, kfopt_keras_model, kfopt_ctx):
    technique = Cluster()
    result = technique.apply(kfopt_keras_model, Cluster.Config(clusters=4, init=init, epochs=0), kfopt_ctx)
    for kernel in kernels(result.keras()):
        assert len(np.unique(kernel)) <= 4
    # Biases are not clustered (tfmot clusters kernels only).
    assert any(len(np.unique(w)) > 4 for w in result.keras().get_weights() if w.ndim == 1)


def test_fine_tuning_keeps_the_clusters(kfopt_keras_model, kfopt_ctx):
    result = Cluster().apply(kfopt_keras_model, Cluster.Config(clusters=6, epochs=2, learning_rate=1e-3), kfopt_ctx)
    assert all(len(np.unique(k)) <= 6 for k in kernels(result.keras()))


def test_a_pruned_input_keeps_its_zeros(kfopt_keras_model, kfopt_ctx):
    pruned = kfopt_keras_model.keras()
    pruned.set_weights(zero_smallest(pruned.get_weights(), 0.7))
    zeros_before = [k == 0 for k in kernels(pruned)]
    assert weight_sparsity(pruned) == pytest.approx(0.7, abs=0.01)

    result = Cluster().apply(kfopt_keras_model, Cluster.Config(clusters=8, epochs=2, learning_rate=1e-3), kfopt_ctx)
    clustered = result.keras()
    for was_zero, kernel in zip(zeros_before, kernels(clustered)):
        assert (kernel[was_zero] == 0).all()  # sparsity-preserving clustering: pruned weights stay pruned
        assert len(np.unique(kernel)) <= 8
    assert result.info["sparsity"] >= 0.7 - 0.01


def test_registers_next_to_the_builtins(kfopt_registry):
    techniques = kfopt_registry(kfopt_cluster)
    assert techniques.get("cluster").kind == "compress"
    assert {"prune", "quantize", "cluster"} <= {t.name for t in techniques}


def _installed() -> bool:
    try:
        distribution("kfopt-cluster")
    except PackageNotFoundError:
        return False
    return True


needs_install = pytest.mark.skipif(not _installed(), reason="needs `pip install -e examples/kfopt-cluster`")


@needs_install
def test_installed_package_is_found_through_its_entry_point(kfopt_registry, monkeypatch):
    monkeypatch.delenv("KFOPT_PLUGINS", raising=False)
    techniques = kfopt_registry(entry_points=True)
    assert techniques.owners["cluster"] == "kfopt-cluster"

    monkeypatch.setenv("KFOPT_PLUGINS", "someotherplugin")  # the allow-list leaves it out
    assert "cluster" not in [t.name for t in kfopt_registry(entry_points=True)]


def _kfopt(*args, **env):
    kfopt = shutil.which("kfopt", path=os.path.dirname(sys.executable)) or "kfopt"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KFOPT_")}
    return subprocess.run([kfopt, *args], capture_output=True, text=True, env={**environ, **env}, timeout=600)


@needs_install
def test_kfopt_plugins_lists_it_with_its_package():
    done = _kfopt("plugins", "--json")
    assert done.returncode == 0, done.stderr
    cluster = next(t for t in json.loads(done.stdout) if t["name"] == "cluster")
    assert cluster["package"] == "kfopt-cluster"
    assert set(cluster["config_schema"]["properties"]) == {"clusters", "init", "epochs", "learning_rate"}


@needs_install
@pytest.mark.slow
def test_prune_cluster_quantize_recipe_runs_through_the_cli(tmp_path):
    recipe = "prune(epochs=2)>cluster(clusters=16,epochs=1)>quantize(mode=int8)"
    done = _kfopt(
        "optimize",
        "--model",
        "demo:mlp",
        "--data",
        "digits",
        "--epochs",
        "5",
        "--recipe",
        recipe,
        "--out",
        str(tmp_path),
        "--json",
        "--no-tracking",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    candidate = json.loads(done.stdout)["candidates"][0]
    assert candidate["status"] == "ok", candidate.get("reason")
    assert candidate["format"] == "tflite"
    assert candidate["sparsity"] > 0.7  # pruning's zeros survived clustering and int8
    assert candidate["compression_ratio"] > 5
