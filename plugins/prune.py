"""Built-in ``prune`` technique: magnitude, structured m:n, L1-then-threshold, or channel pruning."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pydantic
from pydantic import Field

from kfopt import _tf
from kfopt.errors import KfoptError, did_you_mean
from kfopt.models import copy_model
from kfopt.sparsity import weight_sparsity
from kfopt.training import fine_tune, task_loss

from . import channels as _channels
from .layers import all_layers, has_layer_graph, note, require_layer_graph, with_note
from .layers import kernels as _kernels
from .spec import hookimpl
from .technique import LayerNames, ModelHandle, StepContext, Technique

BATCH_SIZE = 32
#: Fraction of the fine-tuning steps over which sparsity ramps up; the rest lets
#: the network recover at the final sparsity before the masks are frozen.
RAMP_FRACTION = 0.75
#: How many times the magnitude masks are recomputed during the ramp.
MASK_UPDATES = 16
#: Facts of the input model that no longer hold once channels are removed (widths, counts, earlier notes' keys).
STALE_AFTER_CHANNELS = ("left_dense", "full_width", "channels", "params", "flops")
#: How many layer names an unknown keep_dense/float_layers name's error lists.
LAYERS_LISTED = 12


class Prune(Technique):
    """Zero out weights so the model compresses well (and can run sparse kernels).

    ``magnitude``: tfmot low-magnitude pruning, sparsity ramping from 0 to
    ``target_sparsity`` on a polynomial schedule during fine-tuning.
    ``structured``: tfmot m:n sparsity (e.g. 2 zeros in every 4 consecutive
    input weights), the pattern sparse tensor cores and XNNPACK accelerate;
    kernels with fewer than n inputs (a first conv on grey images) stay dense.
    ``l1``: fine-tune with an L1 penalty on the kernels, then zero the
    smallest weights model-wide until ``target_sparsity`` is reached; works on
    any layer type, including those tfmot cannot wrap.
    ``channels``: removes the ``target_sparsity`` fraction of the filters of
    Conv layers, channels of DepthwiseConv2D and units of Dense layers with the
    smallest L1 (or L2, see ``norm``) norm times BatchNorm ``|gamma|``, following
    the graph (layers joined by Add, Multiply, Concatenate, BatchNorm and depthwise
    convs lose the same channels; see :mod:`kfopt.plugins.channels`), rebuilds
    a smaller dense model of the same architecture and fine-tunes it. The
    model's inputs and outputs keep their shapes; layers it cannot follow keep
    their widths and are named in ``info["notes"]``, as are the layers that
    shrank (``info["channels"]``: name -> [width before, after]). Every
    group loses ``target_sparsity`` of its channels (``allocation=uniform``,
    the default); with ``allocation=sensitivity`` each group's fraction comes
    from what removing ``target_sparsity`` of it alone costs the task's metric
    on the validation split for the MACs it saves: costly groups lose fewer
    channels, the others more, and the model keeps the multiply-accumulates
    uniform removal would leave.

    ``keep_dense`` names layers left dense (every method): tfmot wraps only the
    other layers (per-layer pruning through ``clone_model``), l1 neither
    penalises nor thresholds them. ``target_sparsity`` is then the sparsity of
    the pruned layers (each of them for magnitude, together for l1), so the
    whole model's sparsity (``info["sparsity"]``, measured) is lower.

    magnitude and structured prune the layers tfmot can prune (Dense, Conv,
    SeparableConv's pointwise kernel, Embedding, LSTM/GRU/SimpleRNN, those in
    Bidirectional/TimeDistributed, MultiHeadAttention's projections; structured: 2-D and 4-D kernels of matrix
    multiplies) and leave every other layer as it is: layers without weights
    (Rescaling, Normalization, Reshape, Add, ...) never block pruning, and
    layers with kernels tfmot cannot prune (DepthwiseConv2D, custom layers)
    stay dense. ``info["left_dense"]`` maps each layer with kernels left dense to
    why, and ``info["notes"]`` says it in one line.

    The input model is never modified; the returned model has no pruning wrappers.
    """

    name = "prune"
    kind = "prune"
    accepts = {"keras"}
    produces = "keras"
    trains = True

    class Config(Technique.Config):
        method: Literal["magnitude", "structured", "l1", "channels"] = Field(
            "magnitude",
            description="magnitude: tfmot low-magnitude pruning with a polynomial schedule; "
            "structured: m:n sparsity (see m_by_n); l1: L1-regularised fine-tuning, then thresholding; "
            "channels: remove whole filters/units and rebuild a smaller dense model, then fine-tune.",
        )
        target_sparsity: float = Field(
            0.8,
            gt=0,
            lt=1,
            description="Fraction of kernel weights to zero (magnitude and l1; structured gets m/n); "
            "with keep_dense, of the pruned layers' weights (the whole model's sparsity is lower); "
            "channels: fraction of each prunable layer's filters/units removed (allocation=uniform), or the "
            "MACs of removing that fraction, shared out by sensitivity (allocation=sensitivity).",
        )
        # 20 epochs at Adam's default rate (tfmot's own guide fine-tunes at 1e-3) let demo:mlp
        # reach 90% sparsity + int8 within ~0.5 points; lower rates left it 1-2 points short.
        epochs: int = Field(20, ge=1, description="Fine-tuning epochs while pruning.")
        learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate for fine-tuning.")
        m_by_n: str = Field(
            "2:4",
            description="structured only: 'm:n' = m zeros in every n consecutive weights along each "
            "kernel's input axis (tfmot semantics; 2:4 gives 50% sparsity).",
        )
        # 3e-4 kept demo:mlp within ~0.5 points at 80-90% sparsity; 1e-4 and below left
        # too many mid-sized weights, so thresholding at 90% cost 1-4 points.
        l1: float = Field(
            3e-4,
            ge=0,
            description="l1 only: strength of the L1 penalty on kernels (as keras.regularizers.L1).",
        )
        norm: Literal["l1", "l2"] = Field(
            "l1",
            description="channels only: the norm of a filter that ranks it (times |gamma| of a BatchNorm after it).",
        )
        # uniform by default: on bench/channels.py (ResNet, MobileNetV2, demo:cnn at 0.5 and 0.75, fine-tuned)
        # sensitivity allocation at the same MACs lost more accuracy than uniform removal: what one group alone
        # costs before fine-tuning does not tell which widths fine-tuning needs (see the module doc of channels).
        allocation: Literal["uniform", "sensitivity"] = Field(
            "uniform",
            description="channels only: uniform: every channel group loses target_sparsity of its channels; "
            "sensitivity: each group's fraction is set by what removing it alone costs the task's metric on the "
            "validation split for the MACs it saves (costly groups lose fewer channels, the others more, at the "
            "MACs uniform removal would leave).",
        )
        keep_dense: LayerNames = Field(
            [],
            description="Names of layers not to prune (e.g. the most sensitive ones); target_sparsity is then "
            "the sparsity of each pruned layer, not of the whole model. channels: these layers keep all their "
            "filters/units (their inputs still lose the channels removed before them).",
        )

        @pydantic.field_validator("m_by_n")
        @classmethod
        def _check_m_by_n(cls, value: str) -> str:
            match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
            if not match or not 0 < int(match[1]) < int(match[2]):
                raise ValueError(f"m_by_n must look like '2:4' with 0 < m < n, got {value!r}")
            return f"{int(match[1])}:{int(match[2])}"

        @pydantic.model_validator(mode="after")
        def _structured_has_no_target(self):
            # Silently ignoring a sparsity the user asked for would mislead them.
            if self.method == "structured" and "target_sparsity" in self.model_fields_set:
                raise ValueError(
                    "target_sparsity does not apply to method=structured (its sparsity is m/n); "
                    "set m_by_n instead, or use method=magnitude"
                )
            if self.method != "channels" and "norm" in self.model_fields_set:
                raise ValueError("norm applies to method=channels only (it ranks whole filters)")
            if self.method != "channels" and "allocation" in self.model_fields_set:
                raise ValueError("allocation applies to method=channels only (it shares out whole filters)")
            return self

        def m_n(self) -> tuple[int, int]:
            m, n = self.m_by_n.split(":")
            return int(m), int(n)

    def check(self, model, config: Prune.Config) -> None:
        """Refuse, before any work, a model with no layer graph, unknown keep_dense names or nothing to prune.

        method=channels also rebuilds the model's structure at the planned widths (fresh weights, none copied), so
        a model it cannot rebuild is refused here, in one line, not after the baseline is measured.
        """
        if not model.has_keras_layers:
            return  # the recipe check refuses the format itself
        keras_model = model.keras()
        require_layer_graph(keras_model, f"prune(method={config.method})")
        check_layer_names(keras_model, config.keep_dense, "prune", "keep_dense")
        if config.method == "channels":
            _channels.rebuild(keras_model, _channel_plan(keras_model, config))
        else:
            dense_layers(keras_model, config)

    def apply(self, model: ModelHandle, config: Prune.Config, ctx: StepContext) -> ModelHandle:
        keras = _tf.keras()
        source = model.keras()
        keras.utils.set_random_seed(ctx.seed)
        require_layer_graph(source, f"prune(method={config.method})")
        # The model's compiled loss, else the task's; decided on the plain model (wrappers hide the activation).
        loss = task_loss(source, ctx)
        check_layer_names(source, config.keep_dense, "prune", "keep_dense")
        if config.method == "channels":
            return _prune_channels(model, source, config, ctx, loss)
        left_dense = dense_layers(source, config)
        if config.method == "l1":
            pruned = _prune_l1(source, config, ctx, loss)
        else:
            pruned = _prune_tfmot(source, config, ctx, loss)
        info = {key: value for key, value in model.info.items() if key != "left_dense"}
        info["sparsity"] = weight_sparsity(pruned)
        if left_dense:
            info["left_dense"] = left_dense
            total = len(kernel_layers(source))
            info["notes"] = with_note(
                model.info, note(f"prune(method={config.method})", left_dense, total, "dense", "layers with weights")
            )
        return ModelHandle.from_keras(pruned, info=info)


def _channel_plan(keras_model, config: Prune.Config) -> _channels.ChannelPlan:
    """The channels ``config`` removes from ``keras_model``; a KfoptError when it would remove none."""
    plan = _channels.plan_channels(keras_model, config.target_sparsity, config.keep_dense, config.norm)
    if not plan.shrunk:
        listed = "; ".join(f"{name}: {why}" for name, why in list(plan.left.items())[:3])
        raise KfoptError(
            f"prune(method=channels) finds no layer of '{keras_model.name}' whose channels it can remove "
            f"at target_sparsity={config.target_sparsity:g} ({listed or 'every width is tied to its input or output'}).",
            "use prune(method=magnitude) or prune(method=l1), a larger target_sparsity, or fewer keep_dense names.",
        )
    return plan


def _by_sensitivity(source, plan: _channels.ChannelPlan, config: Prune.Config, ctx: StepContext):
    """``plan`` with per-group fractions from each group's sensitivity on the validation split
    (:func:`kfopt.plugins.channels.allocate`), and the metric they were measured with; ``(plan, None)`` when there
    is no validation split to measure on (every group then loses ``target_sparsity``)."""
    from kfopt.data import labels
    from kfopt.recipe_search.sensitivity import _task_and_metric
    from kfopt.training import scored_output, task_of

    try:
        x, y = ctx.validation.arrays() if ctx.validation is not None else ((), ())
    except ValueError:  # an empty tf.data split
        x, y = (), ()
    if not len(x):
        return plan, None
    x, y = x[: _channels.SENSITIVITY_SAMPLES], labels(y[: _channels.SENSITIVITY_SAMPLES])
    task, metric = _task_and_metric(source, y, task_of(source, ctx), None)
    copy = copy_model(source)  # masked() assigns kernels: never the caller's
    reporter = ctx.progress
    if reporter is not None:
        reporter.say(f"prune(method=channels): measuring {len(plan.free)} channel groups' sensitivity")
    sensitivity = _channels.measure_sensitivity(
        copy, plan, config.target_sparsity, x, task.targets(y), task, metric, scored_output(source, ctx)
    )
    return _channels.allocate(plan, config.target_sparsity, sensitivity), f"validation {sensitivity.metric}"


def _prune_channels(model: ModelHandle, source, config: Prune.Config, ctx: StepContext, loss) -> ModelHandle:
    """Remove channels (see :mod:`kfopt.plugins.channels`), then fine-tune the smaller model with the task's loss."""
    plan = _channel_plan(source, config)
    by, uniform_why = None, None
    if config.allocation == "sensitivity":
        plan, by = _by_sensitivity(source, plan, config, ctx)
        if by is None:
            uniform_why = "no validation split to measure layer sensitivity on: every layer lost the same fraction"
    with ctx.strategy.scope():
        smaller = _channels.remove_channels(source, plan)
    fine_tune(
        smaller,
        ctx,
        epochs=config.epochs,
        learning_rate=config.learning_rate,
        description=f"fine-tuning after removing {plan.removed_fraction():.0%} of the channels",
        loss=loss,
        batch_size=BATCH_SIZE,
    )
    info = {key: value for key, value in model.info.items() if key not in STALE_AFTER_CHANNELS}
    info["sparsity"] = weight_sparsity(smaller)
    info["channels"] = {name: list(widths) for name, widths in plan.shrunk.items()}
    notes = with_note(model.info, _channels.note_line(plan, config.target_sparsity, by))
    if uniform_why:
        notes = with_note({"notes": notes}, f"prune(method=channels): {uniform_why}")
    if plan.left:
        info["full_width"] = plan.left
        notes = with_note({"notes": notes}, note("prune(method=channels)", plan.left, len(plan.widths), "full width"))
    info["notes"] = notes
    return ModelHandle.from_keras(smaller, info=info)


def dense_layers(keras_model, config: Prune.Config) -> dict[str, str]:
    """The layers with kernels ``config`` leaves dense, each with why (keep_dense, or tfmot cannot prune it).

    Raises a KfoptError when that leaves nothing to prune.
    """
    keep = set(config.keep_dense)
    left, pruned = {}, 0
    for layer in kernel_layers(keras_model):
        why = _kept_dense_because(layer, config.method, keep)
        if why:
            left[layer.name] = why
        else:
            pruned += 1
    if not pruned:
        listed = "; ".join(f"{name}: {why}" for name, why in list(left.items())[:3]) or "it has no layer with kernels"
        fix = (
            "drop keep_dense names so some layers remain to prune."
            if config.method == "l1"
            else "use prune(method=l1), which prunes the kernels of any layer, or keep fewer layers dense."
        )
        raise KfoptError(
            f"prune(method={config.method}) has no layer of '{keras_model.name}' to prune ({listed}).", fix
        )
    return left


def _prune_registry():
    """tfmot's registry of the Keras layers it can prune (not public API: tfmot exposes no other way to ask)."""
    _tf.tfmot()
    from tensorflow_model_optimization.python.core.sparsity.keras.prune_registry import PruneRegistry

    return PruneRegistry


def _unprunable(layer) -> str | None:
    """Why tfmot's registry of built-in layers does not prune ``layer``'s kernels; None when it does."""
    registry = _prune_registry()
    kind = type(layer).__name__
    if not registry.supports(layer):
        return f"tfmot cannot prune {kind} layers"
    if type(layer) in registry._LAYERS_WEIGHTS_MAP and not registry._LAYERS_WEIGHTS_MAP[type(layer)]:
        return f"tfmot does not prune {kind} kernels"
    return None


def _wrapped_layers(layer) -> list:
    """The layers a Keras wrapper (Bidirectional, TimeDistributed) wraps; [] for any other layer."""
    keras = _tf.keras()
    if isinstance(layer, keras.layers.Bidirectional):
        return [layer.forward_layer, layer.backward_layer]
    if isinstance(layer, keras.layers.TimeDistributed):
        return [layer.layer]
    return []


def _kept_dense_because(layer, method: str, keep: set[str]) -> str | None:
    """Why ``method`` leaves the kernels of ``layer`` (a layer with kernels) dense; None when it prunes them."""
    if layer.name in keep:
        return "kept dense by keep_dense"
    if method == "l1":  # l1 penalises and thresholds any layer's kernels
        return None
    kind = type(layer).__name__
    prunable = _tf.tfmot().sparsity.keras.PrunableLayer
    wrapped = _wrapped_layers(layer)
    if wrapped:  # Bidirectional(LSTM), TimeDistributed(Dense): prunable when what they wrap is
        why = next((_unprunable(inner) for inner in wrapped if _unprunable(inner)), None)
        if why:
            return f"{why}, which {kind} wraps"
    elif not (isinstance(layer, prunable) or hasattr(layer, "get_prunable_weights")):
        why = _unprunable(layer)
        if why:
            return why
    if method == "structured":
        if kind == "Embedding":
            return "m:n sparsity speeds up matrix multiplies, not an Embedding's lookup table"
        ranks = sorted({len(w.shape) for w in _kernels(layer)} - {2, 4})
        if ranks:
            return f"tfmot's m:n pruning takes 2-D and 4-D kernels, {kind} has {ranks[0]}-D ones"
    return None


def steps_per_epoch(train) -> int:
    """Optimizer steps in one epoch over ``train`` (a :class:`kfopt.data.Split`), as fine_tune runs it."""
    if train.x is not None:
        return max(1, -(-len(train.x) // BATCH_SIZE))
    # A tf.data split is fitted in its own batches, not BATCH_SIZE ones.
    cardinality = int(train.dataset.cardinality())
    return cardinality if cardinality > 0 else max(1, sum(1 for _ in train.dataset))


def _prune_tfmot(source, config: Prune.Config, ctx: StepContext, loss):
    tfmot = _tf.tfmot()
    sparsity = tfmot.sparsity.keras
    if config.method == "structured":
        # tfmot computes m:n masks once, on the first step; the schedule is required but unused.
        params = {"pruning_schedule": sparsity.ConstantSparsity(0.5, begin_step=0), "sparsity_m_by_n": config.m_n()}
        description = f"pruning {config.m_by_n} structured"
    else:
        total = config.epochs * steps_per_epoch(ctx.train)
        frequency = max(1, int(total * RAMP_FRACTION) // MASK_UPDATES)
        # PolynomialDecay only reaches final_sparsity on a step that is a multiple of frequency.
        end_step = max(frequency, int(total * RAMP_FRACTION) // frequency * frequency)
        params = {
            "pruning_schedule": sparsity.PolynomialDecay(
                initial_sparsity=0.0,
                final_sparsity=config.target_sparsity,
                begin_step=0,
                end_step=end_step,
                frequency=frequency,
            )
        }
        description = f"pruning to {config.target_sparsity:.0%} sparsity"

    keras = _tf.keras()
    keep = set(config.keep_dense)

    def wrap(layer):
        # Only layers whose kernels tfmot prunes get a wrapper: weightless layers (Rescaling, Reshape, Add, ...)
        # and unsupported ones stay as they are, so they never block pruning the others.
        if isinstance(layer, keras.Model) and has_layer_graph(layer):  # a nested model: its layers one by one
            return keras.models.clone_model(layer, clone_function=wrap)
        if not _kernels(layer) or _kept_dense_because(layer, config.method, keep):
            return layer
        if _wrapped_layers(layer):
            # tfmot's registry knows the wrapped layers, not the wrappers; a layer that names its prunable
            # weights is pruned as it says (tfmot's own hook for custom layers): the wrapped kernels.
            layer.get_prunable_weights = lambda layer=layer: _kernels(layer)
        return sparsity.prune_low_magnitude(layer, **params)

    with ctx.strategy.scope():
        copy = copy_model(source)  # the wrappers wrap these layers: never the caller's
        try:
            wrapped = keras.models.clone_model(copy, clone_function=wrap)
        except ValueError as exc:
            raise KfoptError(
                f"prune(method={config.method}) cannot wrap this model: {str(exc).splitlines()[0]}",
                "use prune(method=l1), which works with any layer, or keep_dense=NAME for the layer it names.",
            ) from None
    fine_tune(
        wrapped,
        ctx,
        epochs=config.epochs,
        learning_rate=config.learning_rate,
        description=description,
        loss=loss,
        batch_size=BATCH_SIZE,
        callbacks=[sparsity.UpdatePruningStep()],
    )
    return sparsity.strip_pruning(wrapped)


def _prune_l1(source, config: Prune.Config, ctx: StepContext, loss):
    tf = _tf.tf()
    with ctx.strategy.scope():
        copy = copy_model(source)
        kernels = [w for layer in kernel_layers(copy) if layer.name not in config.keep_dense for w in _kernels(layer)]
        strength = config.l1
        for kernel in kernels:
            # Callable losses are re-evaluated each step on the current weights.
            copy.add_loss(lambda kernel=kernel: strength * tf.reduce_sum(tf.abs(kernel)))
    fine_tune(
        copy,
        ctx,
        epochs=config.epochs,
        learning_rate=config.learning_rate,
        description=f"L1 fine-tuning (l1={config.l1:g})",
        loss=loss,
        batch_size=BATCH_SIZE,
    )

    # The penalty lives on the copy; hand back a plain model without it.
    result = copy_model(copy)
    pruned = [layer for layer in kernel_layers(result) if layer.name not in config.keep_dense]
    weights = [layer.get_weights() for layer in pruned]
    thresholded = iter(threshold_global([w for ws in weights for w in ws], config.target_sparsity))
    for layer, ws in zip(pruned, weights):
        layer.set_weights([next(thresholded) for _ in ws])
    return result


def kernel_layers(keras_model) -> list:
    """The model's layers with kernels (trainable weights of ndim >= 2), nested models' included: what pruning
    acts on."""
    return [layer for layer in all_layers(keras_model) if _kernels(layer)]


@dataclass
class LayerKernels:
    """One layer pruning acts on, and its kernel variables (biases and normalisation weights are never pruned)."""

    name: str
    variables: list

    def values(self) -> list[np.ndarray]:
        """The kernels' current values."""
        return [v.numpy() for v in self.variables]

    def pruned(self, sparsity: float) -> list[np.ndarray]:
        """The kernels' values with the smallest-magnitude ``sparsity`` fraction of this layer's weights zeroed.

        The same global thresholding as ``prune(method=l1)``, over this one layer, with no fine-tuning.
        """
        return threshold_global(self.values(), sparsity)


def layer_kernels(keras_model) -> list[LayerKernels]:
    """Every layer pruning acts on, with its kernels: what a layer-at-a-time sensitivity pass varies.

    The variables are the model's own: assigning to them changes ``keras_model``.
    """
    return [LayerKernels(layer.name, _kernels(layer)) for layer in kernel_layers(keras_model)]


def check_layer_names(keras_model, names: list[str], technique: str, key: str) -> None:
    """Raise a KfoptError naming the first of ``names`` that is not a layer with kernels of the model."""
    valid = [layer.name for layer in kernel_layers(keras_model)]
    for name in names:
        if name not in valid:
            # A large model has hundreds: the first ones show what the names look like.
            listed = ", ".join(valid[:LAYERS_LISTED])
            more = f" and {len(valid) - LAYERS_LISTED} more" if len(valid) > LAYERS_LISTED else ""
            raise KfoptError(
                f"{technique}({key}=...): the model has no layer with weights named '{name}'."
                f"{did_you_mean(name, valid)} Layers with weights: {listed}{more}.",
                f"name layers of this model in {key} (see model.summary() or the layer sensitivity table of kfopt search).",
            )


def threshold_global(weights: list[np.ndarray], target_sparsity: float) -> list[np.ndarray]:
    """Zero the ``target_sparsity`` fraction of smallest-magnitude kernel weights (ndim >= 2), model-wide.

    Uses a rank rather than a value threshold so ties cannot over- or under-shoot.
    """
    is_kernel = [w.ndim >= 2 for w in weights]
    flat = np.concatenate([np.abs(w).ravel() for w, k in zip(weights, is_kernel) if k] or [np.zeros(0)])
    count = int(round(target_sparsity * flat.size))
    keep = np.ones(flat.size, dtype=bool)
    if count:
        keep[np.argpartition(flat, count - 1)[:count]] = False
    out, offset = [], 0
    for w, k in zip(weights, is_kernel):
        if k:
            mask = keep[offset : offset + w.size].reshape(w.shape)
            offset += w.size
            w = np.where(mask, w, 0).astype(w.dtype)
        out.append(w)
    return out


@hookimpl
def kfopt_register_techniques(register):
    register(Prune())
