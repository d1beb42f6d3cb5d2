"""kfopt.testing: the fixtures and contract checks plugin authors test their techniques with."""

import subprocess
import sys

import numpy as np
import pydantic
import pytest
from conftest import RoundWeights
from pydantic import Field

from kfopt.plugins import ModelHandle, Technique, TechniqueSkipped, copy_model, hookimpl, tf
from kfopt.testing import TechniqueContractError, TechniqueContractWarning, check_technique


class SavedModelToTFLite(Technique):
    """Converts a SavedModel to fp32 TFLite: a technique whose input is not Keras."""

    name = "saved_model_to_tflite"
    kind = "convert"
    accepts = {"saved_model"}
    produces = "tflite"

    class Config(Technique.Config):
        pass

    def apply(self, model, config, ctx):
        converter = tf().lite.TFLiteConverter.from_saved_model(str(model.saved_model_path()))
        return ModelHandle.from_tflite(converter.convert())


class CopyTFLite(Technique):
    name = "copy_tflite"
    kind = "convert"
    accepts = {"tflite"}
    produces = "tflite"

    class Config(Technique.Config):
        pass

    def apply(self, model, config, ctx):
        return ModelHandle.from_tflite(model.tflite())


# -- the fixtures ---------------------------------------------------------------------
def test_pytest_loads_the_kit_through_its_entry_point(request):
    assert request.config.pluginmanager.has_plugin("kfopt")


def test_importing_the_kit_does_not_import_tensorflow():
    code = "import sys, kfopt.testing; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_tiny_models_in_every_format_evaluate_well(
    kfopt_keras_model, kfopt_tflite_model, kfopt_saved_model, kfopt_evaluator
):
    for handle, fmt in (
        (kfopt_keras_model, "keras"),
        (kfopt_tflite_model, "tflite"),
        (kfopt_saved_model, "saved_model"),
    ):
        assert handle.format == fmt
        metrics = kfopt_evaluator.evaluate(handle)
        assert metrics["accuracy"] > 0.85, fmt
        assert abs(metrics["accuracy_drop"]) < 0.01, fmt  # the same model in three formats
    assert kfopt_keras_model.keras().count_params() < 5000  # tiny, so it trains in about a second


def test_every_test_gets_its_own_copy_of_the_tiny_model(kfopt_keras_model):
    from kfopt.testing import tiny_model

    kfopt_keras_model.keras().set_weights([np.zeros_like(w) for w in kfopt_keras_model.keras().get_weights()])
    assert any(w.any() for w in tiny_model("keras").keras().get_weights())


def test_step_context_is_in_a_temporary_directory(kfopt_ctx, kfopt_digits, tmp_path):
    assert kfopt_ctx.workdir.is_relative_to(tmp_path) and kfopt_ctx.workdir.is_dir()
    assert kfopt_ctx.train is kfopt_digits.train and kfopt_ctx.validation is kfopt_digits.validation
    assert not hasattr(kfopt_ctx, "test")  # techniques never see the test split
    assert (kfopt_ctx.seed, kfopt_ctx.device, kfopt_ctx.num_classes) == (0, "cpu", 10)
    assert next(kfopt_ctx.representative(2)())[0].shape == (1, 64)


def test_registry_fixture_adds_plugins_and_bare_techniques(kfopt_registry):
    class Plugin:
        @hookimpl
        def kfopt_register_techniques(self, register):
            register(RoundWeights())

    techniques = kfopt_registry(Plugin(), CopyTFLite())
    assert {"round_weights", "copy_tflite", "prune", "quantize"} <= {t.name for t in techniques}
    assert "round_weights" not in {t.name for t in kfopt_registry()}


def test_registry_fixture_refuses_a_misspelt_hook(kfopt_registry):
    class Typo:
        @hookimpl
        def kfopt_register_technique(self, register):  # missing "s"
            pass

    with pytest.raises(Exception, match="kfopt_register_technique"):
        kfopt_registry(Typo())


# -- check_technique on good techniques ------------------------------------------------------
def test_check_technique_passes_a_good_keras_technique(tmp_path):
    check = check_technique(
        RoundWeights(), {"decimals": 1}, bad_configs=[{"decimals": -1}], max_accuracy_drop=0.05, workdir=tmp_path
    )
    assert check.passed == [
        "declaration",
        "config",
        "recipe",
        "apply returns the declared format",
        "input unchanged",
        "evaluates",
        "accuracy",
        "deterministic",
    ]
    assert check.config.decimals == 1 and check.result.format == "keras"
    assert check.metrics["accuracy"] > 0.85


def test_check_technique_uses_a_tiny_model_in_a_format_the_technique_accepts(tmp_path):
    check = check_technique(SavedModelToTFLite(), workdir=tmp_path)
    assert check.input.format == "saved_model" and check.result.format == "tflite"
    assert abs(check.metrics["accuracy_drop"]) < 0.01
    assert check_technique(CopyTFLite(), workdir=tmp_path / "tflite").input.format == "tflite"


# -- check_technique catches each broken rule, with a message that says how to fix it -----
def _broken(**overrides):
    return type("Broken", (RoundWeights,), overrides)()


def _fails(technique, match, **kwargs):
    with pytest.raises(TechniqueContractError, match=match) as caught:
        check_technique(technique, **kwargs)
    assert "Fix:" in str(caught.value)


def test_missing_declarations_are_named():
    _fails(_broken(kind=""), "kind must be a non-empty string")
    _fails(_broken(accepts={"onnx"}), "accepts .* must be a non-empty set of formats")
    _fails(_broken(produces="onnx"), "produces 'onnx' must be one of")
    _fails(_broken(name="two words"), "name 'two words' must be")


@pytest.mark.filterwarnings("ignore::kfopt.testing.TechniqueContractWarning")
def test_a_config_that_accepts_unknown_keys_is_refused():
    class Loose(pydantic.BaseModel):  # not Technique.Config: extra keys are ignored
        decimals: int = 2

    _fails(_broken(Config=Loose), "unknown config key 'kfopt_no_such_key' was silently accepted")


def test_a_bad_config_that_validates_is_reported():
    class Unbounded(Technique.Config):
        decimals: int = Field(2, description="Decimals kept (no lower bound: -1 slips through).")

    _fails(_broken(Config=Unbounded), r"bad config \{'decimals': -1\} was accepted", bad_configs=[{"decimals": -1}])


def test_wrong_output_format_is_refused():
    def apply(self, model, config, ctx):
        from kfopt.convert import to_tflite

        return ModelHandle.from_tflite(to_tflite(model.keras()))

    _fails(_broken(apply=apply), "apply returned a tflite model, but produces_for")


def test_returning_the_input_is_refused():
    _fails(_broken(apply=lambda self, model, config, ctx: model), "apply returned its input model")


def test_mutating_the_input_is_refused():
    def apply(self, model, config, ctx):
        keras_model = model.keras()
        keras_model.set_weights([np.round(w, 1) for w in keras_model.get_weights()])
        return ModelHandle.from_keras(copy_model(keras_model))

    _fails(_broken(apply=apply), "apply changed its input model")


def test_nondeterminism_is_caught():
    def apply(self, model, config, ctx):
        rng = np.random.default_rng()  # not seeded from ctx.seed
        copy = copy_model(model.keras())
        copy.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in copy.get_weights()])
        return ModelHandle.from_keras(copy)

    _fails(_broken(apply=apply), "two runs with seed 0 predict differently")
    check_technique(_broken(apply=apply), deterministic=False)  # an author may opt out, with a reason


def test_a_large_accuracy_drop_is_reported_when_a_budget_is_given():
    def apply(self, model, config, ctx):
        copy = copy_model(model.keras())
        copy.set_weights([np.zeros_like(w) for w in copy.get_weights()])
        return ModelHandle.from_keras(copy)

    _fails(_broken(apply=apply), "accuracy dropped by", max_accuracy_drop=0.05, deterministic=False)


def test_a_technique_that_cannot_run_here_skips_the_test():
    def apply(self, model, config, ctx):
        raise TechniqueSkipped("needs a TPU")

    with pytest.raises(pytest.skip.Exception, match="needs a TPU"):
        check_technique(_broken(apply=apply))


def test_undocumented_config_fields_warn():
    class Bare(Technique.Config):
        decimals: int = 2

    with pytest.warns(TechniqueContractWarning, match="decimals have no description"):
        check_technique(_broken(Config=Bare), deterministic=False)


def test_a_name_taken_by_a_builtin_is_refused():
    _fails(_broken(name="prune"), "cannot be planned in a recipe next to the built-ins.*registered twice")
