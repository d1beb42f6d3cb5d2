"""Keras 3 models in, the user's Keras out.

The models are built and saved by Keras 3 in a separate process, as a user's
``import keras`` (or ``tf.keras`` on TensorFlow 2.16+) would, with that
process's own predictions kept as the reference. kfopt must load them as
tf_keras models that compute the same outputs, write candidates back as files
Keras 3 loads, and refuse what it cannot convert in one line naming the layer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from kfopt import keras3
from kfopt.errors import KfoptError
from kfopt.models import load_keras
from kfopt.plugins import ModelHandle

# Built by Keras 3 in a process of its own; each model's predictions on fixed inputs saved beside it.
ZOO_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    from keras import layers as L

    assert keras.__version__.startswith("3."), keras.__version__
    out = sys.argv[1]
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)

    def perturb(model):
        # Random weights everywhere (BatchNorm statistics too), so copying the wrong weight shows.
        for layer in model.layers:
            values = []
            for w, v in zip(layer.get_weights(), layer.weights):
                if "variance" in v.path:
                    values.append(rng.uniform(0.5, 1.5, w.shape).astype(w.dtype))
                else:
                    values.append((w + rng.normal(0, 0.05, w.shape)).astype(w.dtype))
            layer.set_weights(values)
        return model

    def seq_mlp():
        return keras.Sequential([keras.Input((64,)), L.Dense(128, activation="relu"), L.Dense(10, activation="softmax")])

    def func_mlp():
        i = keras.Input((64,))
        x = L.BatchNormalization()(L.Dense(32, activation="relu")(i))
        return keras.Model(i, L.Dense(10, activation="softmax")(L.Dropout(0.2)(x)))

    def cnn():
        i = keras.Input((16, 16, 3))
        x = L.Conv2D(8, 3, padding="same")(L.Rescaling(1 / 255.0)(i))
        x = L.ReLU(6.0)(L.BatchNormalization()(x))
        y = L.Activation("relu")(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same")(x)))
        x = L.Add()([x, y])
        gate = L.Conv2D(8, 1, activation="sigmoid")(L.GlobalAveragePooling2D(keepdims=True)(x))
        x = L.Multiply()([x, gate])
        x = L.Dropout(0.1)(L.Concatenate()([L.MaxPooling2D(2)(x), L.AveragePooling2D(2)(x)]))
        x = L.Concatenate()([L.Flatten()(x), L.GlobalAveragePooling2D()(x)])
        return keras.Model(i, L.Dense(10, activation="softmax")(x))

    def text_rnn():
        i = keras.Input((12,), dtype="int32")
        x = L.GRU(8)(L.LSTM(8, return_sequences=True)(L.Embedding(50, 8)(i)))
        return keras.Model(i, L.Dense(3, activation="softmax")(x))

    def transformer():
        i = keras.Input((10,), dtype="int32")
        x = L.Embedding(40, 16, mask_zero=True)(i)
        x = L.LayerNormalization()(x + L.MultiHeadAttention(num_heads=2, key_dim=8)(x, x))
        x = L.LayerNormalization()(L.Add()([x, L.Dense(16)(L.Dense(32, activation="gelu")(x))]))
        return keras.Model(i, L.Dense(2, activation="softmax")(L.GlobalAveragePooling1D()(x)))

    def two_in_two_out():
        a, b = keras.Input((8,), name="features"), keras.Input((4,), name="extra")
        x = L.Concatenate()([L.Dense(16, activation="relu")(a), b])
        return keras.Model([a, b], [L.Dense(3, activation="softmax", name="label")(x), L.Dense(1, name="score")(x)])

    def mobilenet_v2():
        return keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10)

    def with_lambda():
        i = keras.Input((4,))
        return keras.Model(i, L.Dense(2)(L.Lambda(lambda t: t * 2.0, name="doubler")(i)))

    def with_unsupported_op():
        i = keras.Input((4,))
        return keras.Model(i, keras.ops.cumsum(L.Dense(4)(i), axis=1))

    def with_hard_sigmoid():
        i = keras.Input((4,))
        return keras.Model(i, L.Dense(4, activation="hard_sigmoid", name="gate")(i))

    @keras.saving.register_keras_serializable(package="user")
    class Twice(L.Layer):
        def call(self, x):
            return x * 2.0

    def with_custom_layer():
        i = keras.Input((4,))
        return keras.Model(i, Twice(name="twice")(L.Dense(4)(i)))

    def inputs_for(model):
        arrays = []
        for t in model.inputs:
            shape = (6, *t.shape[1:])
            if "int" in str(t.dtype):
                arrays.append(rng.integers(0, 40, shape).astype(t.dtype))
            else:
                arrays.append(rng.standard_normal(shape).astype("float32"))
        return arrays

    for name, build in dict(
        seq_mlp=seq_mlp, func_mlp=func_mlp, cnn=cnn, text_rnn=text_rnn, transformer=transformer,
        two_in_two_out=two_in_two_out, mobilenet_v2=mobilenet_v2,
    ).items():
        model = perturb(build())
        model.save(f"{out}/{name}.keras")
        x = inputs_for(model)
        y = model.predict(x if len(x) > 1 else x[0], verbose=0)
        y = y if isinstance(y, list) else [y]
        np.savez(f"{out}/{name}.npz", **{f"x{i}": v for i, v in enumerate(x)}, **{f"y{i}": v for i, v in enumerate(y)})
    for build in (with_lambda, with_unsupported_op, with_hard_sigmoid, with_custom_layer):
        build().save(f"{out}/{build.__name__}.keras")

    # A digits classifier as a Keras 3 user trains it (for the end-to-end test).
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    digits = keras.Sequential([keras.Input((64,)), L.Dense(64, activation="relu"), L.Dense(10, activation="softmax")])
    digits.compile("adam", "sparse_categorical_crossentropy")
    digits.fit((x / 16.0).astype("float32"), y, epochs=5, verbose=0)
    digits.save(f"{out}/digits_mlp.keras")
    """
)

ZOO = ["seq_mlp", "func_mlp", "cnn", "text_rnn", "transformer", "two_in_two_out", "mobilenet_v2"]


def _keras3_python(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``script`` the way a Keras 3 user's program runs: TF_USE_LEGACY_KERAS unset, ``import keras``."""
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("keras3_zoo")
    _keras3_python(ZOO_SCRIPT, str(folder))
    return folder


def _reference(zoo: Path, name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    with np.load(zoo / f"{name}.npz") as saved:
        xs = [saved[k] for k in sorted(k for k in saved.files if k.startswith("x"))]
        ys = [saved[k] for k in sorted(k for k in saved.files if k.startswith("y"))]
    return xs, ys


def _predict(model, xs: list[np.ndarray]) -> list[np.ndarray]:
    out = model(xs if len(xs) > 1 else xs[0], training=False)
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def _assert_same(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    assert len(got) == len(want)
    worst = 0.0
    for g, w in zip(got, want):
        assert g.shape == w.shape
        diff = float(np.abs(g.astype(np.float64) - w).max())
        assert diff <= 1e-5 * max(1.0, float(np.abs(w).max())), diff
        worst = max(worst, diff)
    return worst


def test_keras3_files_are_told_apart_from_tf_keras_files(zoo, tmp_path):
    from kfopt import _tf

    assert keras3.is_keras3_file(zoo / "seq_mlp.keras")
    tk = _tf.keras()
    tk.Sequential([tk.Input((4,)), tk.layers.Dense(2)]).save(tmp_path / "tf_keras.keras")
    assert not keras3.is_keras3_file(tmp_path / "tf_keras.keras")
    assert keras3.keras3_input_shape(zoo / "cnn.keras") == (16, 16, 3)


@pytest.mark.parametrize("name", ZOO)
def test_keras3_model_loads_as_tf_keras_with_the_same_outputs(zoo, name):
    model = load_keras(zoo / f"{name}.keras")
    assert type(model).__module__.startswith("tf_keras")
    assert keras3.flavor_of(model) == keras3.KERAS3
    proof = keras3.proof_of(model)
    assert proof.max_abs_diff <= keras3.TOLERANCE and proof.inputs == "generated"
    # Against the predictions Keras 3 made in the user's own process, not only kfopt's proof.
    xs, ys = _reference(zoo, name)
    _assert_same(_predict(model, xs), ys)


@pytest.mark.parametrize("name", ["func_mlp", "transformer", "two_in_two_out"])
def test_candidate_is_written_back_for_keras3_and_kfopt_reads_it(zoo, tmp_path, name):
    handle = ModelHandle.from_keras(load_keras(zoo / f"{name}.keras"))
    assert handle.info["keras_flavor"] == "keras3"
    path = handle.save(tmp_path)
    with zipfile.ZipFile(path) as archive:
        assert json.loads(archive.read("metadata.json"))["keras_version"].startswith("3.")
    again = ModelHandle.load(path)
    xs, ys = _reference(zoo, name)
    _assert_same(_predict(again.keras(), xs), ys)
    assert again.info["keras_flavor"] == "keras3"


def test_keras3_model_object_from_python(zoo):
    import keras  # Keras 3 itself, even with TF_USE_LEGACY_KERAS=1 set by kfopt

    assert keras.__version__.startswith("3.")
    user_model = keras.saving.load_model(zoo / "two_in_two_out.keras")
    handle = ModelHandle.from_keras(user_model)
    assert handle.info["keras_flavor"] == "keras3"
    assert type(handle.keras()).__module__.startswith("tf_keras")
    xs, ys = _reference(zoo, "two_in_two_out")
    _assert_same(_predict(handle.keras(), xs), ys)
    # Given data, the proof runs on it.
    assert keras3.proof_of(keras3.to_tf_keras(user_model, sample=xs)).inputs == "given"


@pytest.mark.parametrize(
    ("name", "unsafe", "message"),
    [
        ("with_lambda", False, r"Lambda layer 'doubler'.*--unsafe"),
        ("with_lambda", True, r"layer 'doubler' \(Lambda\).*cannot be rebuilt in tf_keras"),
        ("with_unsupported_op", False, r"layer 'cumsum' \(keras.ops Cumsum\).*Fix: use a keras.layers layer"),
        ("with_hard_sigmoid", False, r"layer 'gate' \(Dense\) uses activation='hard_sigmoid'.*Fix:"),
        ("with_custom_layer", False, r"could not be loaded by Keras 3.*Twice.*register_keras_serializable"),
    ],
)
def test_what_cannot_be_converted_is_refused_in_one_line(zoo, name, unsafe, message):
    with pytest.raises(KfoptError, match=message) as refused:
        load_keras(zoo / f"{name}.keras", unsafe=unsafe)
    assert "\n" not in refused.value.one_line()


@pytest.mark.slow
def test_a_pruned_keras3_model_is_saved_for_keras3_with_the_predictions_kfopt_measured(zoo, tmp_path):
    import kfopt
    from kfopt.data import load_data

    result = kfopt.optimize(
        str(zoo / "digits_mlp.keras"),
        "digits",
        "prune(target_sparsity=0.5, epochs=1)",
        out=tmp_path / "out",
        tracking=False,
        progress=False,
    )
    candidate = result.candidates[0]
    assert candidate.status == "ok", candidate.reason
    assert candidate.sparsity == pytest.approx(0.5, abs=0.02)
    artifact = Path(candidate.artifact)
    assert keras3.is_keras3_file(artifact)

    # The test split kfopt measured on (a user's model: validation held out of the test side).
    x_test, y_test = load_data("digits", input_shape=(64,), seed=0).test.arrays()
    np.save(tmp_path / "x_test.npy", x_test)
    _keras3_python(
        "import sys, numpy as np, keras\n"
        "model = keras.saving.load_model(sys.argv[1])\n"
        "np.save(sys.argv[3], model.predict(np.load(sys.argv[2]), verbose=0))\n",
        str(artifact),
        str(tmp_path / "x_test.npy"),
        str(tmp_path / "keras3_predictions.npy"),
    )
    in_keras3 = np.load(tmp_path / "keras3_predictions.npy")
    assert float((in_keras3.argmax(axis=1) == y_test).mean()) == pytest.approx(candidate.accuracy, abs=1e-9)
    # What kfopt reads back from the file is what Keras 3 computes.
    _assert_same(_predict(load_keras(artifact), [x_test]), [in_keras3])


def _optimize_exit(model: Path, data: Path, out: Path) -> tuple[int, str]:
    from click.testing import CliRunner

    from kfopt.cli import main

    args = ["optimize", "--model", str(model), "--data", str(data), "--recipe", "quantize(mode=dynamic)"]
    done = CliRunner().invoke(main, [*args, "--out", str(out), "--no-tracking"])
    return done.exit_code, done.output


def test_data_that_does_not_fit_a_keras3_model_is_refused_in_one_line(zoo, tmp_path):
    # The conversion is proven on the user's rows only when they fit; misfit data gets the data check's line.
    rng = np.random.default_rng(0)
    wrong = tmp_path / "seven_features.npz"
    x, y = rng.normal(size=(40, 7)).astype("float32"), np.arange(40) % 10
    np.savez(wrong, x_train=x, y_train=y, x_test=x, y_test=y)
    code, output = _optimize_exit(zoo / "digits_mlp.keras", wrong, tmp_path / "out")
    assert code == 2 and "has inputs of shape (7,)" in output and "(64,)" in output, output
    assert len(output.strip().splitlines()) <= 2, output


@pytest.mark.parametrize("bad_id, where", [(50, 0), (-1, 35)])  # in the rows a conversion is proven on, or not
def test_token_ids_an_embedding_never_learned_are_refused_in_one_line(zoo, tmp_path, bad_id, where):
    x = np.random.default_rng(0).integers(0, 50, (40, 12)).astype("int32")
    x[where, 3] = bad_id
    data = tmp_path / "tokens.npz"
    np.savez(data, x_train=x, y_train=np.arange(40) % 3, x_test=x, y_test=np.arange(40) % 3)
    code, output = _optimize_exit(zoo / "text_rnn.keras", data, tmp_path / "out")
    assert code == 2 and "an Embedding of 50 ids reads (0 to 49)" in output, output
