"""kfopt plugin: weight clustering with tensorflow-model-optimization.

Registered with kfopt through the ``kfopt`` entry-point group (see pyproject.toml).
Everything it uses from kfopt comes from ``kfopt.plugins``, the plugin
author's import surface. TensorFlow, tf_keras and tfmot are reached only inside
``apply``, through ``kfopt.plugins.tfmot()`` and ``keras()`` (they select Keras 2
first), so ``kfopt plugins`` stays fast.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kfopt.plugins import (
    KfoptError,
    ModelHandle,
    StepContext,
    Technique,
    classifier_loss,
    copy_model,
    fine_tune,
    hookimpl,
    keras,
    tfmot,
    weight_sparsity,
)

__version__ = "0.1.0"

#: Above this kernel sparsity the input counts as pruned, and clustering keeps its zeros.
PRUNED_SPARSITY = 0.1
#: Config ``init`` values -> tfmot CentroidInitialization member names.
INITS = {
    "linear": "LINEAR",
    "kmeans_plus_plus": "KMEANS_PLUS_PLUS",
    "density_based": "DENSITY_BASED",
    "random": "RANDOM",
}


class Cluster(Technique):
    """Share weights: each kernel keeps at most ``clusters`` distinct values.

    tfmot's ``cluster_weights`` wraps every Dense/Conv layer, the centroids are
    fine-tuned on ``ctx.train`` and the wrappers stripped, so the result is a
    plain Keras model. Few distinct values compress well and survive int8
    quantization. A pruned input (more than 10% zero kernel weights) keeps its
    zeros: tfmot's sparsity-preserving clustering masks them during
    fine-tuning. The input model is never modified.
    """

    name = "cluster"
    kind = "compress"
    accepts = {"keras"}
    produces = "keras"
    trains = True

    class Config(Technique.Config):
        clusters: int = Field(16, ge=2, le=256, description="Distinct values per kernel (number of centroids).")
        # linear, not tfmot's default kmeans_plus_plus: on demo:mlp it compressed 10-15% better
        # (cluster>quantize(int8): 6.0x vs 5.3x; after prune: 12.0x vs 11.2x) at the same accuracy.
        init: Literal["linear", "kmeans_plus_plus", "density_based", "random"] = Field(
            "linear",
            description="Centroid initialisation: linear (evenly spaced between min and max), kmeans_plus_plus, "
            "density_based (evenly spaced on the weights' CDF), random (uniform between min and max).",
        )
        epochs: int = Field(
            3, ge=0, description="Fine-tuning epochs of the centroids (0: cluster without fine-tuning)."
        )
        learning_rate: float = Field(1e-4, gt=0, description="Adam learning rate for fine-tuning.")

    def trains_for(self, config: Cluster.Config) -> bool:
        return config.epochs > 0

    def apply(self, model: ModelHandle, config: Cluster.Config, ctx: StepContext) -> ModelHandle:
        clustering = tfmot().clustering.keras  # TensorFlow is first imported here, with Keras 2 selected
        source = model.keras()
        keras().utils.set_random_seed(ctx.seed)
        input_sparsity = weight_sparsity(source)
        preserve = input_sparsity > PRUNED_SPARSITY
        params = {
            "number_of_clusters": config.clusters,
            "cluster_centroids_init": getattr(clustering.CentroidInitialization, INITS[config.init]),
        }
        # Decide the loss from the plain model: cluster wrappers hide the softmax.
        loss = classifier_loss(source)
        with ctx.strategy.scope():
            copy = copy_model(source)  # tfmot wraps the layers it is given: never train the caller's
            try:
                if preserve:
                    # Sparsity-preserving clustering (a zero centroid, and masks that keep zeros at zero)
                    # is experimental in tfmot 0.8 and not exported as tfmot.clustering.keras.experimental;
                    # tfmot's "Sparsity preserving clustering" guide imports it from here.
                    from tensorflow_model_optimization.python.core.clustering.keras.experimental import (
                        cluster as experimental,
                    )

                    wrapped = experimental.cluster_weights(copy, preserve_sparsity=True, **params)
                else:
                    wrapped = clustering.cluster_weights(copy, **params)
            except ValueError as exc:
                raise KfoptError(
                    f"cluster cannot wrap this model: {exc}",
                    "use a Sequential or functional model of layers tfmot can cluster (Dense, Conv, ...).",
                ) from None
        if config.epochs:
            fine_tune(
                wrapped,
                ctx,
                epochs=config.epochs,
                learning_rate=config.learning_rate,
                description=f"clustering to {config.clusters} centroids",
                loss=loss,
            )
        clustered = clustering.strip_clustering(wrapped)
        info = {**model.info, "sparsity": weight_sparsity(clustered), "clusters": config.clusters}
        return ModelHandle.from_keras(clustered, info=info)


@hookimpl
def kfopt_register_techniques(register):
    register(Cluster())
